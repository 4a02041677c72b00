//! `meshctl demo`: the local quick start. Starts the control plane on its embedded store, the
//! example services `frontend` (v1) and `backend` (v1 and v2) each behind a sidecar, a client
//! sidecar on the usual outbound port, and a load generator that shows the v1/v2 split.
//! Ctrl-C stops everything it started.

use super::client::connect_with;
use crate::process::{Process, bin_dir, proxy_command, sibling};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Data directory of the demo's control plane (kept between runs).
    #[arg(long, default_value = ".mesh")]
    pub data_dir: PathBuf,
    /// Requests per second the load generator sends to `frontend`.
    #[arg(long, default_value_t = 20)]
    pub rps: u32,
}

struct Workload {
    service: &'static str,
    version: &'static str,
    app_port: u16,
    /// outbound, inbound and admin ports of its sidecar
    proxy_ports: (u16, u16, u16),
    calls: Option<&'static str>,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        service: "backend",
        version: "v1",
        app_port: 18081,
        proxy_ports: (15201, 15206, 15200),
        calls: None,
    },
    Workload {
        service: "backend",
        version: "v2",
        app_port: 18082,
        proxy_ports: (15301, 15306, 15300),
        calls: None,
    },
    Workload {
        service: "frontend",
        version: "v1",
        app_port: 18080,
        proxy_ports: (15101, 15106, 15100),
        calls: Some("backend"),
    },
];

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let p = dir.join(format!("{name}.log"));
    std::fs::File::create(&p).with_context(|| p.display().to_string())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let (cp_bin, proxy_bin, example_bin) = (
        sibling(&bins, "mesh-control-plane")?,
        sibling(&bins, "mesh-proxy")?,
        sibling(&bins, "mesh-example")?,
    );
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut procs: Vec<Process> = Vec::new();

    let mut cmd = Command::new(&cp_bin);
    cmd.arg("--data-dir")
        .arg(&args.data_dir)
        .stderr(log_file(&logs, "control-plane")?);
    let (cp, ready) = Process::spawn_ready("control plane", cmd, READY_TIMEOUT).await?;
    procs.push(cp);
    let grpc = ready["grpc"]
        .as_str()
        .unwrap_or("127.0.0.1:15010")
        .to_string();
    let admin_addr = ready["admin"]
        .as_str()
        .unwrap_or("127.0.0.1:15011")
        .to_string();
    println!(
        "control plane   grpc {grpc}  admin {admin_addr}  data {}",
        args.data_dir.display()
    );

    let ca_file = args.data_dir.join("ca").join("bundle.pem");
    let token = std::fs::read_to_string(args.data_dir.join("admin-token"))?
        .trim()
        .to_string();
    let ca = std::fs::read_to_string(&ca_file)?;
    let mut admin = connect_with(&format!("https://{admin_addr}"), &token, &ca).await?;

    let result = start_workloads(
        &mut procs,
        &mut admin,
        &proxy_bin,
        &example_bin,
        &ca_file,
        &grpc,
        &logs,
    )
    .await;
    // Start from every request on v1: the split the load generator prints stays put until
    // `route set` moves it. With no route the balancer picks by latency across versions, and
    // the split swings.
    let result = match result {
        Ok(()) => admin
            .set_route(mesh_proto::v1::SetRouteRequest {
                service: "backend".into(),
                route: Some(mesh_proto::v1::Route {
                    backends: crate::parse_weights("v1=100,v2=0").map_err(anyhow::Error::msg)?,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|_| println!("route           backend v1=100,v2=0 (every request to v1)"))
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        stop(procs).await;
        return Err(e);
    }
    println!(
        "\nTraffic: load generator -> client sidecar :15001 -> mTLS -> frontend -> its sidecar -> mTLS -> backend v1|v2\n\
         Dashboard: http://127.0.0.1:15014/ (metrics: http://127.0.0.1:15014/metrics)\n\
         Logs in {logs}. Try, in another terminal:\n  \
         target/release/meshctl services\n  \
         target/release/meshctl top\n  \
         target/release/meshctl tap backend\n  \
         target/release/meshctl proxies\n  \
         target/release/meshctl route set backend --weights v1=50,v2=50\n  \
         target/release/meshctl route set backend --weights v1=0,v2=100\n  \
         curl -s -x http://127.0.0.1:15001 http://backend/hello\n\
         Ctrl-C stops everything.\n",
        logs = logs.display()
    );

    let mut load = Command::new(&example_bin);
    load.args([
        "load",
        "--proxy",
        "127.0.0.1:15001",
        "--url",
        "http://frontend/",
        "--rps",
        &args.rps.to_string(),
    ])
    .kill_on_drop(true);
    let mut load = load.spawn().context("starting the load generator")?;
    tokio::select! {
        _ = super::shutdown_signal() => {}
        s = load.wait() => { eprintln!("load generator exited: {s:?}"); }
    }
    let _ = load.start_kill();
    println!("\nstopping…");
    stop(procs).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn start_workloads(
    procs: &mut Vec<Process>,
    admin: &mut super::client::Admin,
    proxy_bin: &Path,
    example_bin: &Path,
    ca_file: &Path,
    grpc: &str,
    logs: &Path,
) -> anyhow::Result<()> {
    for w in &WORKLOADS {
        let name = format!("{}-{}", w.service, w.version);
        let mut app = Command::new(example_bin);
        app.args(["serve", "--service", w.service, "--version", w.version])
            .args(["--listen", &format!("127.0.0.1:{}", w.app_port)])
            .stderr(log_file(logs, &format!("{name}-app"))?);
        if let Some(target) = w.calls {
            app.args([
                "--call",
                target,
                "--proxy",
                &format!("127.0.0.1:{}", w.proxy_ports.0),
            ]);
        }
        let (p, _) = Process::spawn_ready(&format!("{name} app"), app, READY_TIMEOUT).await?;
        procs.push(p);

        let mut c = proxy_command(proxy_bin, grpc, ca_file, admin, w.service).await?;
        c.args([
            "--service",
            w.service,
            "--service-version",
            w.version,
            "--node-id",
            &name,
        ])
        .args(["--app-port", &w.app_port.to_string()])
        .args(["--inbound-addr", &format!("127.0.0.1:{}", w.proxy_ports.1)])
        .args(["--outbound-addr", &format!("127.0.0.1:{}", w.proxy_ports.0)])
        .args(["--admin-addr", &format!("127.0.0.1:{}", w.proxy_ports.2)])
        .stderr(log_file(logs, &format!("{name}-proxy"))?);
        let (p, _) = Process::spawn_ready(&format!("{name} sidecar"), c, READY_TIMEOUT).await?;
        procs.push(p);
        println!(
            "{:<15} app :{}  sidecar inbound :{} outbound :{} admin :{}",
            name, w.app_port, w.proxy_ports.1, w.proxy_ports.0, w.proxy_ports.2
        );
    }
    let mut c = proxy_command(proxy_bin, grpc, ca_file, admin, "demo-client").await?;
    c.args([
        "--node-id",
        "demo-client",
        "--outbound-addr",
        "127.0.0.1:15001",
        "--admin-addr",
        "127.0.0.1:15000",
    ])
    .stderr(log_file(logs, "client-proxy")?);
    let (p, _) = Process::spawn_ready("client sidecar", c, READY_TIMEOUT).await?;
    procs.push(p);
    println!(
        "{:<15} outbound :15001 (HTTP proxy for any mesh service)  admin :15000",
        "client"
    );
    Ok(())
}

/// Stops sidecars first (they deregister and drain), then apps, then the control plane.
async fn stop(mut procs: Vec<Process>) {
    while let Some(mut p) = procs.pop() {
        p.terminate(Duration::from_secs(8)).await;
    }
}
