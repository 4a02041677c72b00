//! `gateway-bench`: the mesh's ingress gateway against Envoy as an edge proxy, in one run, on
//! loopback. Both terminate TLS 1.3 from the load tool (oha) with the same operator
//! certificate, and both send over mTLS (TLS 1.3, HTTP/2, the backend's SPIFFE id checked) to
//! the same mesh sidecar in front of the app: only the gateway differs, and only the gateway's
//! CPU and memory are counted.
//!
//! Per gateway: TLS handshakes per second per core (a new connection per request:
//! handshakes / gateway CPU seconds); requests/s and CPU per request over keep-alive at
//! saturation; p99 at 1,000 rps over keep-alive, and what it adds over calling the app
//! directly; RSS idle after warm-up and after the loads, MiB. Writes a Markdown table
//! (`--out`) with the mesh/Envoy ratios.

use anyhow::Context;
use mesh_benches::mesh::{
    Mesh, READY, certify_files, envoy_mtls_cluster, free_port, proxy_bin, wait_listening,
};
use mesh_proto::v1 as pb;
use meshctl::process::{Process, bin_dir, proxy_command};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

#[derive(clap::Parser)]
struct Args {
    /// Seconds of each saturation run.
    #[arg(long, default_value_t = 8)]
    secs: u64,
    /// Seconds of each 1,000 rps run.
    #[arg(long, default_value_t = 20)]
    fixed_secs: u64,
    /// Connections of the saturation runs.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    #[arg(long, default_value = "target/bench-venv/bin/envoy")]
    envoy: PathBuf,
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    /// The gateway binary (default: `mesh-proxy` beside this one).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// Worker threads of each gateway (`--workers`, `--concurrency`); 0: each one's default.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value = "target/gateway-bench.md")]
    out: PathBuf,
}

/// The name the gateways serve, and the load tool calls.
const HOST: &str = "shop.bench";

/// One gateway under test.
struct Gateway {
    name: &'static str,
    port: u16,
    pid: u32,
}

impl Gateway {
    fn cpu(&self) -> f64 {
        mesh_benches::cpu_secs(self.pid).unwrap_or(f64::NAN)
    }
    fn rss_mib(&self) -> f64 {
        mesh_benches::rss_kib(self.pid).unwrap_or(f64::NAN) / 1024.0
    }
}

/// What one gateway measured.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    handshakes_per_core_s: f64,
    handshake_errors: u64,
    rps: f64,
    cpu_us_per_req: f64,
    p99_fixed_ms: f64,
    errors: u64,
    rss_idle: f64,
    rss_load: f64,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// oha against `port` as `https://shop.bench`, with `extra` flags.
async fn oha_https(
    args: &Args,
    port: u16,
    extra: &[&str],
) -> anyhow::Result<mesh_benches::oha::Counted> {
    let mut a = s(&["--insecure", "--connect-to"]);
    a.push(format!("{HOST}:443:127.0.0.1:{port}"));
    a.extend(s(extra));
    a.push(format!("https://{HOST}/hello"));
    let v = mesh_benches::oha::report(&args.oha, &a).await?;
    Ok(mesh_benches::oha::counted(&v, &format!("port {port}")))
}

async fn measure(args: &Args, g: &Gateway) -> anyhow::Result<Measured> {
    let (secs, fixed) = (format!("{}s", args.secs), format!("{}s", args.fixed_secs));
    let conns = args.connections.to_string();
    // Warm-up, then the idle footprint.
    oha_https(args, g.port, &["-z", "2s", "-c", &conns]).await?;
    let rss_idle = g.rss_mib();
    // A new TLS connection per request.
    let cpu0 = g.cpu();
    let h = oha_https(
        args,
        g.port,
        &["-z", &secs, "-c", &conns, "--disable-keepalive"],
    )
    .await?;
    let handshakes_per_core_s = h.ok as f64 / (g.cpu() - cpu0);
    // Keep-alive at saturation.
    let cpu0 = g.cpu();
    let k = oha_https(args, g.port, &["-z", &secs, "-c", &conns]).await?;
    let cpu_us_per_req = (g.cpu() - cpu0) * 1e6 / k.ok.max(1) as f64;
    // 1,000 rps over keep-alive.
    let f = oha_https(args, g.port, &["-z", &fixed, "-c", "4", "-q", "1000"]).await?;
    Ok(Measured {
        handshakes_per_core_s,
        handshake_errors: h.errors,
        rps: k.rps,
        cpu_us_per_req,
        p99_fixed_ms: f.percentiles[2],
        errors: k.errors + f.errors,
        rss_idle,
        rss_load: g.rss_mib(),
    })
}

/// Envoy as the edge: TLS 1.3 from clients with the operator's certificate (ALPN h2 and
/// http/1.1), then HTTP/2 over mTLS to the backend's sidecar with a mesh certificate, saying
/// the client's protocol as the mesh's gateway does (`x-mesh-orig-proto`), nothing else added.
fn envoy_edge(dir: &Path, port: u16, admin: u16, backend: u16) -> String {
    let f = |n: &str| dir.join(n).display().to_string();
    let (gw_crt, gw_key) = (f("gateway.crt"), f("gateway.key"));
    let cluster = envoy_mtls_cluster(dir, "edge-envoy", backend);
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: edge
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{{certificate_chain: {{filename: "{gw_crt}"}}, private_key: {{filename: "{gw_key}"}}}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          codec_type: AUTO
          generate_request_id: false
          server_header_transformation: PASS_THROUGH
          route_config: {{virtual_hosts: [{{name: shop, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}, request_headers_to_add: [{{header: {{key: x-mesh-orig-proto, value: "%PROTOCOL%"}}}}]}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppress_envoy_headers: true}}}}]
{cluster}"#
    )
}

/// The operator's certificate for `shop.bench` from a CA of its own.
fn operator_certificate(dir: &Path) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(p, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec![HOST.to_string()])?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("gateway.crt"), leaf.pem())?;
    std::fs::write(dir.join("gateway.key"), key.serialize_pem())?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let tmp = tempfile::tempdir()?;
    let d = tmp.path();
    let bins = bin_dir()?;
    let proxy = proxy_bin(args.proxy.clone(), &bins)?;
    let log = |n: &str| std::fs::File::create(d.join(format!("{n}.log")));
    let mut mesh = Mesh::start(d, &bins, &proxy, None, args.workers).await?;
    operator_certificate(d)?;
    let cert = format!(
        "{}:{}",
        d.join("gateway.crt").display(),
        d.join("gateway.key").display()
    );

    // The mesh's gateway, routing everything to `backend`.
    let mesh_port = free_port()?;
    let mut cmd = proxy_command(
        &proxy,
        &mesh.grpc.to_string(),
        &d.join("ca.pem"),
        &mut mesh.admin,
        "edge",
    )
    .await?;
    cmd.args(["--service", "edge", "--gateway-cert", &cert])
        .args(["--gateway-https-addr", &format!("127.0.0.1:{mesh_port}")])
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ]);
    if args.workers > 0 {
        cmd.args(["--workers", &args.workers.to_string()]);
    }
    cmd.env("RUST_LOG", "warn").stderr(log("gateway")?);
    let (gw_proc, _) = Process::spawn_ready("mesh gateway", cmd, READY).await?;
    let gw_pid = gw_proc.pid().context("gateway pid")?;
    let route = pb::Route {
        backends: vec![pb::WeightedBackend {
            service: "backend".into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + READY;
    while let Err(e) = mesh
        .admin
        .set_route(pb::SetRouteRequest {
            service: "edge".into(),
            route: Some(route.clone()),
            ..Default::default()
        })
        .await
    {
        // The gateway declares its service once it has its certificate.
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gateway's route: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Envoy as the edge, with a mesh certificate for its upstream hop.
    let (grpc, ca_pem) = (mesh.grpc, mesh.ca_pem.clone());
    certify_files(&mut mesh.admin, grpc, &ca_pem, d, "edge-envoy").await?;
    let envoy_port = free_port()?;
    std::fs::write(
        d.join("envoy-edge.yaml"),
        envoy_edge(d, envoy_port, free_port()?, mesh.backend_inbound),
    )?;
    let mut cmd = Command::new(&args.envoy);
    if args.workers > 0 {
        cmd.args(["--concurrency", &args.workers.to_string()]);
    }
    let envoy = cmd
        .arg("-c")
        .arg(d.join("envoy-edge.yaml"))
        .args(["-l", "warning", "--base-id", &envoy_port.to_string()])
        .stdout(log("envoy")?)
        .stderr(log("envoy.err")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.envoy.display()))?;
    let envoy_pid = envoy.id().context("envoy pid")?;
    wait_listening(envoy_port, "envoy").await?;

    let gateways = [
        Gateway {
            name: "mesh",
            port: mesh_port,
            pid: gw_pid,
        },
        Gateway {
            name: "envoy",
            port: envoy_port,
            pid: envoy_pid,
        },
    ];
    // Each answers through the backend's sidecar before anything is measured.
    for g in &gateways {
        let deadline = tokio::time::Instant::now() + READY;
        loop {
            let c = oha_https(&args, g.port, &["-n", "10", "-c", "1"]).await?;
            if c.ok == 10 {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} does not answer 200; logs in {}",
                g.name,
                d.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The app called directly at 1,000 rps: the p99 the gateways add to.
    let mut a = s(&[
        "-z",
        &format!("{}s", args.fixed_secs),
        "-c",
        "4",
        "-q",
        "1000",
    ]);
    a.push(format!("http://127.0.0.1:{}/hello", mesh.app_port));
    let direct =
        mesh_benches::oha::counted(&mesh_benches::oha::report(&args.oha, &a).await?, "the app");
    let mut results = Vec::new();
    for g in &gateways {
        eprintln!("measuring {}", g.name);
        results.push(measure(&args, g).await?);
    }
    let md = table(&args, &proxy, direct.percentiles[2], &results)?;
    std::fs::write(&args.out, &md)?;
    print!("{md}");
    drop(envoy);
    drop(gw_proc);
    mesh.stop();
    Ok(())
}

fn table(args: &Args, proxy: &Path, direct_p99: f64, r: &[Measured]) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "Gateway bench: {} workers each ({}), mesh gateway {}, {} s saturation runs over {} connections, {} s at 1,000 rps; direct p99 {:.3} ms\n",
        args.workers,
        if args.workers == 0 {
            "each one's default"
        } else {
            "as given"
        },
        proxy.display(),
        args.secs,
        args.connections,
        args.fixed_secs,
        direct_p99
    )?;
    writeln!(
        md,
        "| gateway | TLS 1.3 handshakes/s per core | req/s keep-alive | CPU µs/req | p99 at 1,000 rps (ms) | p99 added (ms) | RSS idle after warm-up (MiB) | RSS after load (MiB) | errors |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (name, m) in ["mesh", "envoy"].iter().zip(r) {
        writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1} | {} |",
            m.handshakes_per_core_s,
            m.rps,
            m.cpu_us_per_req,
            m.p99_fixed_ms,
            m.p99_fixed_ms - direct_p99,
            m.rss_idle,
            m.rss_load,
            m.errors + m.handshake_errors
        )?;
    }
    if let [m, e] = r {
        writeln!(
            md,
            "| mesh / envoy | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | |",
            m.handshakes_per_core_s / e.handshakes_per_core_s,
            m.rps / e.rps,
            m.cpu_us_per_req / e.cpu_us_per_req,
            m.p99_fixed_ms / e.p99_fixed_ms,
            (m.p99_fixed_ms - direct_p99) / (e.p99_fixed_ms - direct_p99),
            m.rss_idle / e.rss_idle,
            m.rss_load / e.rss_load
        )?;
    }
    Ok(md)
}
