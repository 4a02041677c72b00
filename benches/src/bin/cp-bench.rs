//! `cp-bench`: the control plane under many proxies, on loopback. For each N (1,000 and
//! 10,000 by default) it starts a real `mesh-control-plane` (the build beside this binary),
//! opens N simulated proxies on the real discovery stream (mTLS with a workload certificate,
//! many streams per HTTP/2 connection, each subscribed to one service and ACKing every push),
//! then changes that service's route several times and measures, per change, the time from
//! sending the admin call until each proxy has the new route: p50 and p99 over all proxies
//! and changes, and the time until the last one has it. Also: the control plane's RSS per
//! connected proxy, CSRs signed per second of control-plane CPU (renewals over mTLS), and
//! sidecar start to ready. Writes a Markdown table (`--out`).

use anyhow::Context;
use mesh_benches::{cpu_secs, rss_kib};
use mesh_proto::v1 as pb;
use meshctl::client::{bootstrap_token, connect_with};
use meshctl::process::{Process, bin_dir, proxy_command, sibling};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const READY: Duration = Duration::from_secs(30);
const IDENTITY: &str = "spiffe://mesh.local/ns/default/sa/bench";

#[derive(clap::Parser)]
struct Args {
    /// Simulated proxy counts, one control plane each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    proxies: Vec<usize>,
    /// Route changes measured per count.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Discovery streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_conn: usize,
    /// CSRs signed for the signing rate.
    #[arg(long, default_value_t = 2000)]
    csrs: usize,
    /// Sidecar starts timed.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Give every simulated proxy its own mTLS connection (from source addresses 127.0.0.2 to
    /// 127.0.0.201 in turn) and a telemetry stream reporting every second, as real sidecars
    /// have, instead of sharing connections (`--streams-per-conn`) without telemetry.
    #[arg(long)]
    real_connections: bool,
    /// Proxies on quota streams (replicas of one service with a global rate limit), one
    /// control plane each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    quota_proxies: Vec<usize>,
    /// Seconds the quota streams are measured.
    #[arg(long, default_value_t = 10)]
    quota_secs: u64,
    #[arg(long, default_value = "target/cp-bench-results.md")]
    out: PathBuf,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A control plane in `dir`, its admin client, gRPC address and CA.
struct ControlPlane {
    proc: Process,
    grpc: SocketAddr,
    admin: meshctl::client::Admin,
    ca_pem: String,
}

async fn control_plane(dir: &Path) -> anyhow::Result<ControlPlane> {
    let (grpc, admin_addr) = (free_addr()?, free_addr()?);
    let mut cmd = Command::new(sibling(&bin_dir()?, "mesh-control-plane")?);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--admin-addr", &admin_addr.to_string()])
        .args(["--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.with_extension("log"))?);
    let (proc, _) = Process::spawn_ready("control plane", cmd, READY).await?;
    let ca_pem = std::fs::read_to_string(dir.join("ca/bundle.pem"))?;
    let token = std::fs::read_to_string(dir.join("admin-token"))?;
    let admin = connect_with(&format!("https://{admin_addr}"), token.trim(), &ca_pem).await?;
    Ok(ControlPlane {
        proc,
        grpc,
        admin,
        ca_pem,
    })
}

fn csr() -> anyhow::Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(IDENTITY.try_into()?)];
    let pem = p.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

/// A channel to the control plane's gRPC port, with the workload certificate when given.
async fn channel(cp: &ControlPlane, identity: Option<&Identity>) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cp.ca_pem))
        .domain_name("mesh-control-plane");
    if let Some(i) = identity {
        tls = tls.identity(i.clone());
    }
    Ok(Endpoint::from_shared(format!("https://{}", cp.grpc))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// A workload certificate for the simulated proxies (one identity, as replicas of a service).
async fn workload_identity(cp: &mut ControlPlane) -> anyhow::Result<(Identity, String)> {
    let token = bootstrap_token(&mut cp.admin, "default/bench", 0).await?;
    let (key, csr_pem) = csr()?;
    let r = pb::identity_client::IdentityClient::new(channel(cp, None).await?)
        .certify(pb::CertifyRequest { csr_pem, token })
        .await?
        .into_inner();
    Ok((
        Identity::from_pem(&r.cert_chain_pem, key.serialize_pem()),
        r.signer,
    ))
}

/// The v2 weight of `backend` in a push, if the push carries backend.
fn v2_weight(resp: &pb::DiscoveryResponse) -> Option<u32> {
    resp.resources.iter().find_map(|r| match &r.kind {
        Some(pb::resource::Kind::Service(s)) if s.name == "backend" => Some(
            s.route
                .as_ref()
                .and_then(|r| r.backends.iter().find(|b| b.version == "v2"))
                .map_or(0, |b| b.weight),
        ),
        _ => None,
    })
}

/// One simulated proxy: subscribes to backend, ACKs every push, reports each backend route
/// (its v2 weight) with the time it arrived.
async fn simulated_proxy(
    ch: Channel,
    id: usize,
    signer: String,
    seen: mpsc::UnboundedSender<(usize, u32, Instant)>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::DiscoveryRequest {
        node: Some(pb::Node {
            id: format!("sim-{id}"),
            ..Default::default()
        }),
        subscribe: vec!["service/backend".into()],
        cert_signer: signer,
        ..Default::default()
    })?;
    let mut stream = pb::discovery_client::DiscoveryClient::new(ch)
        .stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = stream.message().await? {
        let at = Instant::now();
        tx.send(pb::DiscoveryRequest {
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })?;
        if let Some(w) = v2_weight(&resp) {
            let _ = seen.send((id, w, at));
        }
    }
    Ok(())
}

/// One simulated replica on its quota stream: a report every 100 ms (as the proxy sends), with
/// a demand of 0..100 requests; each grant's share is sent to `shares` (by replica id).
async fn quota_proxy(
    ch: Channel,
    id: usize,
    shares: mpsc::UnboundedSender<(usize, f64)>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    let mut grants = pb::discovery_client::DiscoveryClient::new(ch)
        .quota(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let report = pb::QuotaReport {
                node: format!("quota-{id}"),
                demands: vec![pb::QuotaDemand {
                    service: "api".into(),
                    caller: String::new(),
                    asked: (id as u64 * 7919) % 100,
                    admitted: 0,
                    window_ms: 100,
                }],
            };
            if tx.send(report).await.is_err() {
                break;
            }
        }
    });
    while let Some(g) = grants.message().await? {
        if let Some(s) = g.grants.first() {
            let _ = shares.send((id, s.per_second));
        }
    }
    Ok(())
}

struct QuotaResult {
    proxies: usize,
    reports_per_sec: f64,
    cpu_percent: f64,
    us_per_report: f64,
    kib_per_stream: f64,
    shares_sum: f64,
}

/// Quota leases at scale: `n` replicas of one service with a global limit of 10,000/s, each
/// on its own quota stream; the control plane's CPU and RSS for them, and whether the shares
/// it hands out add up to the limit.
async fn quota_bench(args: &Args, dir: &Path, n: usize) -> anyhow::Result<QuotaResult> {
    let mut cp = control_plane(&dir.join(format!("quota-{n}"))).await?;
    let pid = cp.proc.pid().context("pid")?;
    cp.admin
        .add_endpoint(pb::AddEndpointRequest {
            service: "api".into(),
            namespace: "default".into(),
            service_account: "bench".into(),
            endpoint: Some(pb::Endpoint {
                id: "api-0".into(),
                address: "127.0.0.1:20000".into(),
                ready: true,
                ..Default::default()
            }),
        })
        .await?;
    cp.admin
        .set_policy(pb::SetPolicyRequest {
            service: "api".into(),
            policy: Some(pb::Policy {
                rate_limit: Some(pb::RateLimit {
                    global: Some(pb::Rate {
                        per_second: 10_000,
                        burst: 0,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            skip_validation: false,
        })
        .await?;
    let (identity, _) = workload_identity(&mut cp).await?;
    let rss_before = rss_kib(pid)?;
    let (shares_tx, mut shares) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..n.div_ceil(args.streams_per_conn) {
        let ch = channel(&cp, Some(&identity)).await?;
        for id in (c * args.streams_per_conn)..((c + 1) * args.streams_per_conn).min(n) {
            tasks.spawn(quota_proxy(ch.clone(), id, shares_tx.clone()));
        }
    }
    // Warm-up: every replica holds a share.
    let mut last = vec![0.0; n];
    let mut have = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while have < n {
        let (id, s) = tokio::time::timeout_at(deadline.into(), shares.recv())
            .await
            .context("not every replica got a share within 60 s")?
            .context("all quota streams ended")?;
        if last[id] == 0.0 {
            have += 1;
        }
        last[id] = s;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok((id, s)) = shares.try_recv() {
        last[id] = s;
    }
    let (cpu0, t0) = (cpu_secs(pid)?, Instant::now());
    let mut grants = 0u64;
    let end = t0 + Duration::from_secs(args.quota_secs);
    while let Ok(Some((id, s))) = tokio::time::timeout_at(end.into(), shares.recv()).await {
        last[id] = s;
        grants += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid)? - cpu0;
    let kib_per_stream = (rss_kib(pid)? - rss_before) / n as f64;
    tasks.abort_all();
    Ok(QuotaResult {
        proxies: n,
        reports_per_sec: grants as f64 / wall,
        cpu_percent: cpu / wall * 100.0,
        us_per_report: cpu / grants.max(1) as f64 * 1e6,
        kib_per_stream,
        shares_sum: last.iter().sum(),
    })
}

struct PushResult {
    proxies: usize,
    connect_secs: f64,
    p50: Duration,
    p99: Duration,
    last: Duration,
    kib_per_proxy: f64,
    /// With real connections: the control plane's CPU (% of a core) while every proxy
    /// reports telemetry each second and nothing else happens.
    telemetry_cpu_percent: Option<f64>,
}

/// A simulated proxy's own mTLS connection, from `127.0.0.(2 + id % 200)`: the connection is
/// made when its first stream opens.
fn own_channel(cp: &ControlPlane, identity: &Identity, id: usize) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cp.ca_pem))
        .domain_name("mesh-control-plane")
        .identity(identity.clone());
    let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (id % 200) as u8);
    Ok(Endpoint::from_shared(format!("https://{}", cp.grpc))?
        .tls_config(tls)?
        .local_address(Some(source.into()))
        .connect_lazy())
}

/// A proxy's telemetry stream: a report every second, as a sidecar sends with traffic (one
/// backend version's requests and latency buckets).
async fn telemetry_proxy(ch: Channel, id: usize) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let report = pb::TelemetryReport {
                node_id: format!("sim-{id}"),
                backends: vec![pb::BackendStats {
                    service: "backend".into(),
                    version: "v1".into(),
                    requests: 100,
                    failures: 1,
                    latency_buckets: vec![10, 60, 20, 8, 2],
                }],
                source_service: "bench".into(),
                ..Default::default()
            };
            if tx.send(report).await.is_err() {
                break;
            }
        }
    });
    let mut directives = pb::telemetry_client::TelemetryClient::new(ch)
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while directives.message().await?.is_some() {}
    Ok(())
}

async fn push_bench(args: &Args, dir: &Path, n: usize) -> anyhow::Result<PushResult> {
    let mut cp = control_plane(&dir.join(format!("cp-{n}"))).await?;
    let pid = cp.proc.pid().context("pid")?;
    for (i, v) in ["v1", "v2"].into_iter().enumerate() {
        cp.admin
            .add_endpoint(pb::AddEndpointRequest {
                service: "backend".into(),
                namespace: "default".into(),
                service_account: "backend".into(),
                endpoint: Some(pb::Endpoint {
                    id: format!("backend-{v}"),
                    address: format!("127.0.0.1:{}", 20000 + i),
                    labels: [("version".to_string(), v.to_string())].into(),
                    ready: true,
                    ..Default::default()
                }),
            })
            .await?;
    }
    let (identity, signer) = workload_identity(&mut cp).await?;
    let rss_before = rss_kib(pid)?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    if args.real_connections {
        for id in 0..n {
            let ch = own_channel(&cp, &identity, id)?;
            tasks.spawn(simulated_proxy(
                ch.clone(),
                id,
                signer.clone(),
                seen_tx.clone(),
            ));
            tasks.spawn(telemetry_proxy(ch, id));
        }
    } else {
        for c in 0..n.div_ceil(args.streams_per_conn) {
            let ch = channel(&cp, Some(&identity)).await?;
            for id in (c * args.streams_per_conn)..((c + 1) * args.streams_per_conn).min(n) {
                tasks.spawn(simulated_proxy(
                    ch.clone(),
                    id,
                    signer.clone(),
                    seen_tx.clone(),
                ));
            }
        }
    }
    // Everyone has its first config.
    let mut first = vec![false; n];
    let mut have = 0;
    while have < n {
        let (id, _, _) = tokio::time::timeout(Duration::from_secs(120), seen.recv())
            .await
            .context("proxies did not all get their first config within 120 s")?
            .context("all proxies ended")?;
        if !std::mem::replace(&mut first[id], true) {
            have += 1;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // With real connections, every proxy's telemetry stream is open and reporting: the
    // control plane's steady cost of that, over 10 s with nothing else happening.
    let telemetry_cpu_percent = if args.real_connections {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu0, t0) = (cpu_secs(pid)?, Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        Some((cpu_secs(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0)
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        None
    };
    let kib_per_proxy = (rss_kib(pid)? - rss_before) / n as f64;

    let mut all = Vec::new();
    let mut last = Duration::ZERO;
    for change in 0..args.changes {
        let w = 10 + 10 * u32::try_from(change % 8).unwrap_or(0);
        let t0 = Instant::now();
        cp.admin
            .set_route(pb::SetRouteRequest {
                service: "backend".into(),
                route: Some(pb::Route {
                    backends: vec![
                        pb::WeightedBackend {
                            version: "v1".into(),
                            weight: 100 - w,
                            ..Default::default()
                        },
                        pb::WeightedBackend {
                            version: "v2".into(),
                            weight: w,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        let written = Instant::now();
        let mut got = vec![false; n];
        let mut count = 0;
        while count < n {
            let (id, weight, at) = tokio::time::timeout(Duration::from_secs(60), seen.recv())
                .await
                .context("the route change did not reach every proxy within 60 s")?
                .context("all proxies ended")?;
            if weight == w && !std::mem::replace(&mut got[id], true) {
                count += 1;
                let d = at.saturating_duration_since(t0);
                all.push(d);
                last = last.max(d);
            }
        }
        eprintln!(
            "{n} proxies, change {change}: all had it {:?} after the write returned ({:?} after it was sent)",
            written.elapsed(),
            t0.elapsed()
        );
    }
    tasks.abort_all();
    all.sort();
    Ok(PushResult {
        proxies: n,
        connect_secs,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        last,
        kib_per_proxy,
        telemetry_cpu_percent,
    })
}

/// CSRs signed per second of control-plane CPU: renewals (the caller's certificate is the
/// credential), 64 in flight.
async fn signing_rate(args: &Args, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let mut cp = control_plane(&dir.join("cp-csr")).await?;
    let pid = cp.proc.pid().context("pid")?;
    let (identity, _) = workload_identity(&mut cp).await?;
    let ch = channel(&cp, Some(&identity)).await?;
    let csrs: Vec<String> = (0..args.csrs)
        .map(|_| csr().map(|c| c.1))
        .collect::<anyhow::Result<_>>()?;
    let cpu0 = cpu_secs(pid)?;
    let t0 = Instant::now();
    let mut pending = futures_util::stream::iter(csrs.into_iter().map(|csr_pem| {
        let mut c = pb::identity_client::IdentityClient::new(ch.clone());
        async move {
            c.certify(pb::CertifyRequest {
                csr_pem,
                token: String::new(),
            })
            .await
        }
    }))
    .buffer_unordered(64);
    let mut signed = 0usize;
    use futures_util::StreamExt;
    while let Some(r) = pending.next().await {
        r?;
        signed += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid)? - cpu0;
    Ok((signed as f64 / cpu.max(1e-9), signed as f64 / wall))
}

/// Sidecar start to ready (its readiness line: certificate and first config), median and max.
async fn start_to_ready(args: &Args, dir: &Path) -> anyhow::Result<(Duration, Duration)> {
    let mut cp = control_plane(&dir.join("cp-start")).await?;
    std::fs::write(dir.join("ca.pem"), &cp.ca_pem)?;
    let proxy = sibling(&bin_dir()?, "mesh-proxy")?;
    let mut times = Vec::new();
    for _ in 0..args.starts {
        let mut c = proxy_command(
            &proxy,
            &cp.grpc.to_string(),
            &dir.join("ca.pem"),
            &mut cp.admin,
            "web",
        )
        .await?;
        c.args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn");
        let t0 = Instant::now();
        let (mut p, _) = Process::spawn_ready("sidecar", c, READY).await?;
        times.push(t0.elapsed());
        p.terminate(Duration::from_secs(5)).await;
    }
    times.sort();
    Ok((
        percentile(&times, 0.5),
        times.last().copied().unwrap_or_default(),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = clap::Parser::parse();
    let dir = tempfile::tempdir()?;
    let mut pushes = Vec::new();
    for &n in &args.proxies {
        pushes.push(push_bench(&args, dir.path(), n).await?);
    }
    let mut quotas = Vec::new();
    for &n in &args.quota_proxies {
        quotas.push(quota_bench(&args, dir.path(), n).await?);
    }
    let (per_cpu_sec, per_wall_sec) = signing_rate(&args, dir.path()).await?;
    let (start_p50, start_max) = start_to_ready(&args, dir.path()).await?;

    let mut out = String::new();
    let connections = if args.real_connections {
        "one mTLS connection per proxy (sources 127.0.0.2–201), discovery + telemetry stream each, a report per second".to_string()
    } else {
        format!(
            "{} discovery streams per mTLS connection, no telemetry",
            args.streams_per_conn
        )
    };
    writeln!(out, "Proxies: {connections}.\n")?;
    writeln!(
        out,
        "| connected proxies | all connected in, s | route change to proxy, p50 ms | p99 ms | last proxy, ms | control-plane RSS per proxy, KiB | control-plane CPU with telemetry, % of a core |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for p in &pushes {
        writeln!(
            out,
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            p.proxies,
            p.connect_secs,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            p.last.as_secs_f64() * 1e3,
            p.kib_per_proxy,
            p.telemetry_cpu_percent
                .map_or_else(|| "-".to_string(), |c| format!("{c:.1}"))
        )?;
    }
    writeln!(
        out,
        "\n| replicas on quota streams (global limit 10,000/s) | reports/s | control-plane CPU, % of a core | CPU per report, µs | RSS per stream, KiB | shares handed out, /s |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    for q in &quotas {
        writeln!(
            out,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
            q.proxies,
            q.reports_per_sec,
            q.cpu_percent,
            q.us_per_report,
            q.kib_per_stream,
            q.shares_sum
        )?;
    }
    writeln!(
        out,
        "\nCSR signing (renewals, 64 in flight, {} CSRs): {per_cpu_sec:.0} per second of control-plane CPU ({per_wall_sec:.0} per second of wall time on the whole machine).",
        args.csrs
    )?;
    writeln!(
        out,
        "\nSidecar start to ready ({} starts, loopback): median {:.1} ms, max {:.1} ms.",
        args.starts,
        start_p50.as_secs_f64() * 1e3,
        start_max.as_secs_f64() * 1e3
    )?;
    print!("{out}");
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, out)?;
    Ok(())
}
