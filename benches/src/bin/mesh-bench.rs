//! `mesh-bench`: load benchmarks side by side in one run, on loopback:
//!
//! - `direct`: load tool → app
//! - `mesh-1` / `envoy-1`: load tool → one proxy (plaintext, the inbound side) → app
//! - `mesh`: load tool → mesh-proxy (outbound) → mTLS HTTP/2 → mesh-proxy (inbound) → app
//! - `envoy`: the same sidecar pair with Envoy (mTLS, SPIFFE SAN checks, HTTP/2 between them)
//! - `l5d-1` / `l5d`: the same with linkerd2-proxy, when its binary is there
//!   (`benches/build-linkerd2-proxy.sh`): sidecars that find their traffic by iptables
//!   redirection, under a minimal controller (`mesh_benches::linkerd`), mTLS checked by their
//!   own metrics
//!
//! Each proxy runs one worker thread. Load comes from `oha` (or, for HTTP/2 and gRPC,
//! `h2load` with `--h2-tool h2load`): closed-loop saturation over HTTP/1.1, HTTP/2 and gRPC
//! unary (1 KiB each way), and a fixed rate (1,000 rps over 4 connections); the saturation
//! loads again with each proxy held to `--cpu-limit` CPU (a CFS quota, as Kubernetes enforces
//! a limit), so that the proxy and not the load tool or the app saturates. Per topology:
//! requests/s, p50/p90/p99, p99 added over direct, proxy CPU µs per request (utime+stime from
//! /proc), proxy RSS idle and after load. `--rounds N` repeats the whole matrix and reports
//! each cell's median. Writes a Markdown table (`--out`) with the mesh/Envoy ratios.

use anyhow::Context;
use mesh_benches::cpu_limit::CpuLimit;
use mesh_benches::cpu_pin::CpuSplit;
use mesh_benches::linkerd::{self, Linkerd};
use mesh_benches::mesh::{
    Mesh, READY, TRUST_DOMAIN, app_view_check, certify_files, envoy_mtls_cluster, free_port,
    grpc_check, grpc_request, proxy_bin, wait_listening,
};
use meshctl::process::bin_dir;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

#[derive(clap::Parser)]
struct Args {
    /// Seconds per load run.
    #[arg(long, default_value_t = 8)]
    secs: u64,
    /// Seconds of each 1,000 rps run, at least `--secs`: its p99 is read against a target, and
    /// over 5 s it would be the 50th-worst of 5,000 requests.
    #[arg(long, default_value_t = 20)]
    fixed_secs: u64,
    /// Rounds of the whole matrix; the table has each cell's median over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Connections for the saturation runs.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Body size of each response, bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// Envoy binary.
    #[arg(long, default_value = "target/bench-venv/bin/envoy")]
    envoy: PathBuf,
    /// oha binary.
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    /// The load tool of the HTTP/2 and gRPC saturation loads. h2load (nghttp2) takes about
    /// half the CPU per request that oha does, which leaves more of a small machine to the
    /// proxy under test; the HTTP/1.1 loads always use oha.
    #[arg(long, value_enum, default_value_t = H2Tool::Oha)]
    h2_tool: H2Tool,
    /// h2load binary.
    #[arg(long, default_value = "h2load")]
    h2load: PathBuf,
    /// Where the Markdown table goes.
    #[arg(long, default_value = "target/bench-results.md")]
    out: PathBuf,
    /// linkerd2-proxy binary (`benches/build-linkerd2-proxy.sh` builds it at its pinned tag).
    /// The `l5d` topologies run when it is given or when that script's output is there.
    #[arg(long)]
    linkerd2_proxy: Option<PathBuf>,
    /// Measure only these topologies (direct, relay, mesh-1, envoy-1, l5d-1, mesh, envoy, l5d),
    /// e.g. to profile one; the ratios then lack their other side. `relay` is the floor: two
    /// plain TCP relays in a chain, the pair's hops with no TLS and no HTTP.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these loads (h1, h2, grpc, fixed, h1-limited, h2-limited, grpc-limited).
    #[arg(long, value_delimiter = ',')]
    loads: Vec<String>,
    /// The sidecar binary (default: `mesh-proxy` beside this one); `benches/run.sh` passes
    /// the profile-guided build, `target/pgo/mesh-proxy`.
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// CPU each proxy process is held to (cores, as a Kubernetes limit) in the `*-limited`
    /// loads, so that the proxy, not the load tool or the app, is what saturates.
    #[arg(long, default_value_t = 0.5)]
    cpu_limit: f64,
    /// In the unlimited saturation loads, run the proxies on a core of their own (the last
    /// this process may use) and the app, the load tool and this bench on the others, so that
    /// a proxy's neighbours do not take its core. Needs two cores; more, so that the app and
    /// the load tool do not saturate theirs first.
    #[arg(long)]
    pin: bool,
    /// The app's runtime threads (default: the app's own, one per core). The unlimited
    /// saturation cells move with it, Envoy's and the mesh's differently (BENCHMARKS.md).
    #[arg(long)]
    app_threads: Option<std::num::NonZeroUsize>,
    /// Worker threads of each proxy: `mesh-proxy --workers`, `envoy --concurrency`,
    /// `LINKERD2_PROXY_CORES`. 0 runs each with its own default, as users run them (the mesh
    /// and linkerd2-proxy 1, Envoy one per core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Run no loads: keep the topologies up this many seconds after the warm-up, each one's
    /// address and proxy pids printed, for tools from outside (perf, strace, `oha --db-url`).
    #[arg(long)]
    hold: Option<u64>,
    /// The gRPC request body file (written at start).
    #[arg(skip)]
    grpc_body: PathBuf,
}

use mesh_benches::cpu_secs;
use mesh_benches::oha::{Counted, run_load_tool};

/// Where `benches/build-linkerd2-proxy.sh` puts the binary.
const LINKERD2_PROXY: &str = "target/linkerd2-proxy/linkerd2-proxy";

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum H2Tool {
    Oha,
    H2load,
}

/// Resident set size, MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(mesh_benches::rss_kib(pid)? / 1024.0)
}

/// A topology under test: where the load goes and which processes are "the proxy".
struct Topology {
    name: &'static str,
    addr: SocketAddr,
    proxies: Vec<u32>,
}

impl Topology {
    /// RSS of its proxies together, MiB.
    fn rss(&self) -> f64 {
        self.proxies
            .iter()
            .map(|p| rss_mib(*p).unwrap_or(0.0))
            .sum()
    }

    /// CPU seconds its proxies have used so far.
    fn cpu(&self) -> f64 {
        self.proxies
            .iter()
            .map(|p| cpu_secs(*p).unwrap_or(0.0))
            .sum()
    }
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    errors: u64,
    cpu_us_per_req: f64,
    rss_idle: f64,
    rss_load: f64,
}

impl Run {
    /// Each figure's median over the rounds (errors: their sum).
    fn median(runs: &[Run]) -> Run {
        let med = |f: fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        Run {
            rps: med(|r| r.rps),
            p50: med(|r| r.p50),
            p90: med(|r| r.p90),
            p99: med(|r| r.p99),
            errors: runs.iter().map(|r| r.errors).sum(),
            cpu_us_per_req: med(|r| r.cpu_us_per_req),
            rss_idle: med(|r| r.rss_idle),
            rss_load: med(|r| r.rss_load),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    H1Saturation,
    H2Saturation,
    GrpcUnary,
    H1Fixed1000,
    H1Limited,
    H2Limited,
    GrpcLimited,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::H1Saturation => "HTTP/1.1 saturation",
            Load::H2Saturation => "HTTP/2 saturation",
            Load::GrpcUnary => "gRPC unary saturation",
            Load::H1Fixed1000 => "HTTP/1.1 1,000 rps, 4 conns",
            Load::H1Limited => "HTTP/1.1 saturation, proxy CPU-limited",
            Load::H2Limited => "HTTP/2 saturation, proxy CPU-limited",
            Load::GrpcLimited => "gRPC unary saturation, proxy CPU-limited",
        }
    }

    /// A cell where each proxy is held to `--cpu-limit` (the load is its unlimited twin's).
    fn limited(self) -> bool {
        matches!(self, Load::H1Limited | Load::H2Limited | Load::GrpcLimited)
    }

    /// A closed-loop load with nothing limited (the cells `--pin` pins).
    fn unlimited_saturation(self) -> bool {
        matches!(
            self,
            Load::H1Saturation | Load::H2Saturation | Load::GrpcUnary
        )
    }

    /// gRPC unary calls, limited or not.
    fn grpc(self) -> bool {
        matches!(self, Load::GrpcUnary | Load::GrpcLimited)
    }

    /// Spoken over HTTP/2 (so `--h2-tool` picks its load tool).
    fn http2(self) -> bool {
        self.grpc() || matches!(self, Load::H2Saturation | Load::H2Limited)
    }

    /// What each request asks for.
    fn path(self, body: usize) -> String {
        if self.grpc() {
            "/mesh.example.v1.Echo/Unary".to_string()
        } else {
            format!("/bytes/{body}")
        }
    }

    fn short(self) -> &'static str {
        match self {
            Load::H1Saturation => "h1",
            Load::H2Saturation => "h2",
            Load::GrpcUnary => "grpc",
            Load::H1Fixed1000 => "fixed",
            Load::H1Limited => "h1-limited",
            Load::H2Limited => "h2-limited",
            Load::GrpcLimited => "grpc-limited",
        }
    }
}

/// Streams per connection of the HTTP/2 loads: `--connections` over 4 connections.
fn streams_per_conn(args: &Args) -> String {
    (args.connections / 4).max(1).to_string()
}

async fn oha(
    args: &Args,
    addr: SocketAddr,
    load: Load,
    secs: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut a: Vec<String> = vec![
        "-z".into(),
        format!("{secs}s"),
        "--connect-to".into(),
        format!("backend:80:{}:{}", addr.ip(), addr.port()),
    ];
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if load.http2() {
        a.extend(s(&["--http2", "-c", "4", "-p", &streams_per_conn(args)]));
    } else if load == Load::H1Fixed1000 {
        a.extend(s(&["-c", "4", "-q", "1000"]));
    } else {
        a.extend(s(&["-c", &args.connections.to_string()]));
    }
    if load.grpc() {
        a.extend(s(&["-m", "POST", "-H", "content-type: application/grpc"]));
        a.extend(s(&["-H", "te: trailers", "-D"]));
        a.push(args.grpc_body.display().to_string());
    }
    a.push(format!("http://backend{}", load.path(args.body)));
    mesh_benches::oha::report(&args.oha, &a).await
}

/// An oha run, counted. Requests still in flight when a timed run ends are cut by oha, not
/// failed by the proxy.
async fn oha_counted(
    args: &Args,
    addr: SocketAddr,
    load: Load,
    secs: u64,
) -> anyhow::Result<Counted> {
    let v = oha(args, addr, load, secs).await?;
    Ok(mesh_benches::oha::counted(&v, &addr.to_string()))
}

/// An h2load run (HTTP/2 or gRPC), counted. h2load prints no percentiles, so they come from
/// its per-request log; its successes are HTTP statuses (the gRPC status of every topology is
/// checked before the runs, `grpc_check`).
async fn h2load_counted(
    args: &Args,
    addr: SocketAddr,
    load: Load,
    secs: u64,
) -> anyhow::Result<Counted> {
    let log = args.grpc_body.with_file_name("h2load.log");
    // h2load appends to its log.
    match std::fs::remove_file(&log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut cmd = Command::new(&args.h2load);
    cmd.args(["-c", "4", "-m", &streams_per_conn(args)])
        .args(["-D", &secs.to_string(), "-H", ":authority: backend"])
        .arg(format!("--log-file={}", log.display()));
    if load.grpc() {
        cmd.args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
        ])
        .arg(&args.grpc_body);
    }
    cmd.arg(format!("http://{addr}{}", load.path(args.body)));
    let out = run_load_tool(&mut cmd, &args.h2load).await?;
    let stdout = String::from_utf8_lossy(&out);
    let summary = H2loadSummary::parse(&stdout)?;
    let mut ms: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t').skip(1);
            let status = f.next()?;
            let us: f64 = f.next()?.parse().ok()?;
            (status == "200").then_some(us / 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| match ms.len() {
        0 => f64::NAN,
        n => ms[(((n as f64) * p).ceil() as usize).clamp(1, n) - 1],
    };
    if summary.errors > 0 {
        eprintln!("  errors on {addr}: {stdout}");
    }
    Ok(Counted {
        ok: summary.ok,
        errors: summary.errors,
        rps: summary.ok as f64 / summary.secs,
        percentiles: [q(0.50), q(0.90), q(0.99)],
    })
}

/// The figures of h2load's summary the table needs.
#[derive(Debug, PartialEq)]
struct H2loadSummary {
    secs: f64,
    ok: u64,
    errors: u64,
}

impl H2loadSummary {
    /// From `finished in 5.00s, ...`, `requests: N total, ... K succeeded, F failed,
    /// E errored, T timeout` and `status codes: A 2xx, B 3xx, C 4xx, D 5xx`. Requests still in
    /// flight at the deadline are neither succeeded nor failed. `succeeded` counts any
    /// status, so the 2xx count is what succeeded.
    fn parse(out: &str) -> anyhow::Result<Self> {
        let line = |prefix: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .with_context(|| format!("no `{prefix}` line in h2load's output: {out}"))
        };
        // "N word" pairs of a comma-separated line, by word.
        let count = |text: &str, word: &str| -> anyhow::Result<u64> {
            text.split(',')
                .find_map(|part| {
                    let mut it = part.split_whitespace();
                    let n = it.next()?;
                    (it.next()? == word).then(|| n.parse().ok()).flatten()
                })
                .with_context(|| format!("no `{word}` count in h2load's `{text}`"))
        };
        let secs: f64 = line("finished in ")?
            .split('s')
            .next()
            .and_then(|v| v.parse().ok())
            .context("h2load's duration")?;
        let requests = line("requests: ")?;
        let codes = line("status codes: ")?;
        let ok = count(codes, "2xx")?;
        let not_ok = ["3xx", "4xx", "5xx"]
            .iter()
            .map(|w| count(codes, w))
            .sum::<anyhow::Result<u64>>()?;
        let errors = ["failed", "errored", "timeout"]
            .iter()
            .map(|w| count(requests, w))
            .sum::<anyhow::Result<u64>>()?;
        anyhow::ensure!(secs > 0.0, "h2load ran for {secs} s");
        Ok(Self {
            secs,
            ok,
            errors: errors + not_ok,
        })
    }
}

async fn measure(args: &Args, t: &Topology, load: Load) -> anyhow::Result<Run> {
    let (rss_idle, cpu0) = (t.rss(), t.cpu());
    let secs = match load {
        Load::H1Fixed1000 => args.secs.max(args.fixed_secs),
        _ => args.secs,
    };
    let c = if load.http2() && args.h2_tool == H2Tool::H2load {
        h2load_counted(args, t.addr, load, secs).await?
    } else {
        oha_counted(args, t.addr, load, secs).await?
    };
    let (cpu1, rss_load) = (t.cpu(), t.rss());
    let [p50, p90, p99] = c.percentiles;
    Ok(Run {
        rps: c.rps,
        p50,
        p90,
        p99,
        errors: c.errors,
        cpu_us_per_req: if t.proxies.is_empty() || c.ok == 0 {
            0.0
        } else {
            (cpu1 - cpu0) * 1e6 / c.ok as f64
        },
        rss_idle,
        rss_load,
    })
}

fn envoy_tls_files(dir: &Path, name: &str) -> (String, String) {
    (
        dir.join(format!("{name}.crt")).display().to_string(),
        dir.join(format!("{name}.key")).display().to_string(),
    )
}

/// The header the Envoy pair carries the caller's protocol in (`%PROTOCOL%`), as the mesh's
/// sidecars carry theirs in `x-mesh-orig-proto`.
const ORIG_PROTO: &str = "x-bench-orig-proto";

// Both Envoys add only what the mesh's sidecars add: no request id, no `x-envoy-*` fields
// (`suppress_envoy_headers`), the upstream's `server` field kept; and the inbound one tells
// the app who called in `x-forwarded-client-cert`, as the inbound sidecar does. (Istio's
// sidecars set that field too.)

/// Envoy as the inbound sidecar: TLS with a required client certificate from the mesh CA whose
/// SPIFFE id is in the trust domain (`mtls`; else plaintext, as the one-proxy topology), then
/// to the app in the caller's protocol, as the mesh does: the one the outbound Envoy says
/// (`ORIG_PROTO`) on the pair, the downstream's own as one proxy. (Istio's Envoy and Linkerd
/// also keep the caller's protocol.)
fn envoy_inbound(dir: &Path, port: u16, admin: u16, app: u16, mtls: bool) -> String {
    let (crt, key) = envoy_tls_files(dir, "backend");
    let ca = dir.join("ca.pem").display().to_string();
    let transport = if mtls {
        format!(
            r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            alpn_protocols: [h2]
            tls_certificates: [{{certificate_chain: {{filename: "{crt}"}}, private_key: {{filename: "{key}"}}}}]
            validation_context:
              trusted_ca: {{filename: "{ca}"}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: "spiffe://{TRUST_DOMAIN}/"}}}}]
      "#
        )
    } else {
        String::new()
    };
    let endpoint = format!(
        "{{cluster_name: app, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app}}}}}}}}}]}}]}}"
    );
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - {transport}filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          generate_request_id: false
          server_header_transformation: PASS_THROUGH
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: {ORIG_PROTO}, string_match: {{exact: HTTP/1.1}}}}]}}
                route: {{cluster: app}}
                request_headers_to_remove: [{ORIG_PROTO}]
              - match: {{prefix: "/", headers: [{{name: {ORIG_PROTO}, present_match: true}}]}}
                route: {{cluster: app_h2}}
                request_headers_to_remove: [{ORIG_PROTO}]
              - match: {{prefix: "/"}}
                route: {{cluster: app_as_called}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppress_envoy_headers: true}}}}]
  clusters:
  - name: app
    type: STATIC
    load_assignment: {endpoint}
  - name: app_h2
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {endpoint}
  - name: app_as_called
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{http_protocol_options: {{}}, http2_protocol_options: {{}}}}
    load_assignment: {endpoint}
"#
    )
}

/// Envoy as the outbound sidecar: plain HTTP from the app, HTTP/2 over mTLS to the peer, whose
/// certificate must carry the backend's SPIFFE id.
fn envoy_outbound(dir: &Path, port: u16, admin: u16, peer: u16) -> String {
    let cluster = envoy_mtls_cluster(dir, "web", peer);
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          codec_type: AUTO
          generate_request_id: false
          server_header_transformation: PASS_THROUGH
          route_config: {{virtual_hosts: [{{name: backend, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}, request_headers_to_add: [{{header: {{key: {ORIG_PROTO}, value: "%PROTOCOL%"}}}}]}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppress_envoy_headers: true}}}}]
{cluster}"#
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted, the run is dropped: every process it started is killed and every proxy is
    // moved out of its CPU-limit cgroup, which is removed.
    tokio::select! {
        r = run() => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args: Args = clap::Parser::parse();
    let bins = bin_dir()?;
    let proxy = proxy_bin(args.proxy.clone(), &bins)?;
    // Taken before anything starts: a machine with one CPU cannot be split.
    let split = args.pin.then(CpuSplit::of_this_process).transpose()?;
    // Kept, run or failed: the processes' logs are in it.
    let dir = tempfile::tempdir()?.keep();
    eprintln!("process logs in {}", dir.display());
    let d = dir.as_path();
    args.grpc_body = d.join("grpc-echo.bin");
    std::fs::write(&args.grpc_body, grpc_request(args.body))?;
    let log = |n: &str| std::fs::File::create(d.join(format!("{n}.log")));
    let mut mesh = Mesh::start(d, &bins, &proxy, args.app_threads, args.workers).await?;
    eprintln!("mesh sidecars: {}", proxy.display());
    let (grpc, app_port) = (mesh.grpc, mesh.app_port);
    let ca_pem = mesh.ca_pem.clone();

    // The Envoy sidecar pair, with certificates from the same CA.
    certify_files(&mut mesh.admin, grpc, &ca_pem, d, "backend").await?;
    certify_files(&mut mesh.admin, grpc, &ca_pem, d, "web").await?;
    let (e_in_port, e_out_port, e_single_port) = (free_port()?, free_port()?, free_port()?);
    std::fs::write(
        d.join("envoy-in.yaml"),
        envoy_inbound(d, e_in_port, free_port()?, app_port, true),
    )?;
    std::fs::write(
        d.join("envoy-1.yaml"),
        envoy_inbound(d, e_single_port, free_port()?, app_port, false),
    )?;
    std::fs::write(
        d.join("envoy-out.yaml"),
        envoy_outbound(d, e_out_port, free_port()?, e_in_port),
    )?;
    let mut envoy_pids = Vec::new();
    let mut envoys = Vec::new();
    for (name, port) in [
        ("envoy-in", e_in_port),
        ("envoy-out", e_out_port),
        ("envoy-1", e_single_port),
    ] {
        let mut cmd = Command::new(&args.envoy);
        if args.workers > 0 {
            cmd.args(["--concurrency", &args.workers.to_string()]);
        }
        let child = cmd
            .arg("-c")
            .arg(d.join(format!("{name}.yaml")))
            .args(["-l", "warning", "--base-id", &port.to_string()])
            .stdout(log(name)?)
            .stderr(log(&format!("{name}.err"))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run scripts/install-bench-tools.sh)",
                    args.envoy.display()
                )
            })?;
        envoy_pids.push(child.id().context("pid")?);
        wait_listening(port, &format!("{name} (logs in {})", d.display())).await?;
        envoys.push(child);
    }

    // The floor: two plain TCP relays chained in front of the app, the pair's hops without
    // anything a proxy does (`tcp-relay`).
    let (r_out_port, r_in_port) = (free_port()?, free_port()?);
    let mut relays = Vec::new();
    for (name, port, upstream) in [
        ("relay-in", r_in_port, app_port),
        ("relay-out", r_out_port, r_in_port),
    ] {
        let child = Command::new(bins.join("tcp-relay"))
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{upstream}"))
            .stderr(log(name)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting tcp-relay (cargo build --release -p mesh-benches)")?;
        wait_listening(port, &format!("{name} (logs in {})", d.display())).await?;
        relays.push(child);
    }
    let relay_pids = relays
        .iter()
        .map(|c| c.id().context("pid"))
        .collect::<anyhow::Result<Vec<u32>>>()?;

    // linkerd2-proxy's pair and single sidecar, with certificates from the same CA.
    let l5d_bin = args.linkerd2_proxy.clone().or_else(|| {
        let p = PathBuf::from(LINKERD2_PROXY);
        p.exists().then_some(p)
    });
    let linkerd = match &l5d_bin {
        Some(bin) => {
            let l = Linkerd::start(bin, d, &d.join("cp"), &ca_pem, app_port, args.workers)
                .await
                .context("linkerd2-proxy")?;
            eprintln!("linkerd2-proxy sidecars: {}", bin.display());
            Some(l)
        }
        None => {
            eprintln!(
                "linkerd2-proxy not run: no {LINKERD2_PROXY} (benches/build-linkerd2-proxy.sh) and no --linkerd2-proxy"
            );
            None
        }
    };

    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut topologies = vec![
        Topology {
            name: "direct",
            addr: local(app_port),
            proxies: vec![],
        },
        Topology {
            name: "relay",
            addr: local(r_out_port),
            proxies: relay_pids,
        },
        Topology {
            name: "mesh-1",
            addr: local(mesh.single_port),
            proxies: vec![mesh.single_pid],
        },
        Topology {
            name: "envoy-1",
            addr: local(e_single_port),
            proxies: envoy_pids[2..].to_vec(),
        },
        Topology {
            name: "mesh",
            addr: local(mesh.pair_port),
            proxies: mesh.pair_pids.clone(),
        },
        Topology {
            name: "envoy",
            addr: local(e_out_port),
            proxies: envoy_pids[..2].to_vec(),
        },
    ];
    if let Some(l) = &linkerd {
        topologies.insert(
            4,
            Topology {
                name: "l5d-1",
                addr: l.single,
                proxies: vec![l.single_pid],
            },
        );
        topologies.push(Topology {
            name: "l5d",
            addr: l.pair,
            proxies: l.pair_pids.clone(),
        });
    }

    // Warm up connections and the mesh's on-demand discovery; check that gRPC is answered OK
    // end to end (the PERMISSIVE mode has reached the backend's sidecar once mesh-1 answers).
    let deadline = tokio::time::Instant::now() + READY;
    for t in &topologies {
        loop {
            let warm = oha(&args, t.addr, Load::H1Saturation, 1).await;
            let all_ok = warm.as_ref().is_ok_and(|v| {
                v["statusCodeDistribution"]
                    .as_object()
                    .is_some_and(|m| m.contains_key("200") && m.len() == 1)
            });
            if all_ok {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not answer 200 to the warm-up: {warm:?}",
                t.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        grpc_check(t.addr, args.body)
            .await
            .with_context(|| format!("gRPC through {}", t.name))?;
        // Through a sidecar pair the app learns the caller's identity; else there is none.
        let caller = match t.name {
            "mesh" | "envoy" => format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/web"),
            "l5d" => linkerd::identity("web"),
            _ => String::new(),
        };
        app_view_check(t.addr, &caller)
            .await
            .with_context(|| format!("what the app sees through {}", t.name))?;
    }
    // The Linkerd pair's traffic went over its mTLS, by both proxies' own counts.
    let l5d_mtls_before = match &linkerd {
        Some(l) => Some(l.mtls_requests().await?),
        None => None,
    };

    // Each proxy's RSS idle after the warm-up traffic (what a sidecar holds between bursts;
    // before any request it has not yet grown its buffers and pools).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_warm: Vec<f64> = topologies.iter().map(Topology::rss).collect();
    if let Some(secs) = args.hold {
        for t in &topologies {
            eprintln!("held: {} {} pids {:?}", t.name, t.addr, t.proxies);
        }
        eprintln!("held: app pid {}; {secs} s", mesh.app_pid);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        drop((envoys, relays));
        mesh.stop();
        return Ok(());
    }

    let loads = [
        Load::H1Saturation,
        Load::H2Saturation,
        Load::GrpcUnary,
        Load::H1Fixed1000,
        Load::H1Limited,
        Load::H2Limited,
        Load::GrpcLimited,
    ];
    let chosen = |names: &[String], name: &str| names.is_empty() || names.iter().any(|n| n == name);
    // Every round runs the whole matrix, so slow drifts of the shared machine hit all cells alike.
    let mut rounds: Vec<(Load, &str, Vec<Run>)> = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for load in loads {
            if !chosen(&args.loads, load.short()) {
                continue;
            }
            for t in &topologies {
                if !chosen(&args.only, t.name) || (load.limited() && t.proxies.is_empty()) {
                    continue;
                }
                let limit = if load.limited() {
                    match CpuLimit::new(t.name, &t.proxies, args.cpu_limit) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            eprintln!("{} not run: {e:#}", load.label());
                            continue;
                        }
                    }
                } else {
                    None
                };
                let pin = match &split {
                    Some(s) if load.unlimited_saturation() => {
                        Some(s.pin(&t.proxies, &[mesh.app_pid, std::process::id()])?)
                    }
                    _ => None,
                };
                let r = measure(&args, t, load).await?;
                drop((limit, pin));
                eprintln!(
                    "round {round} {:<40} {:<7} {:>9.0} rps  p50 {:.3} ms  p99 {:.3} ms  cpu {:.1} µs/req ({:.2} cores)  errors {}",
                    load.label(),
                    t.name,
                    r.rps,
                    r.p50,
                    r.p99,
                    r.cpu_us_per_req,
                    r.cpu_us_per_req * r.rps / 1e6,
                    r.errors
                );
                match rounds
                    .iter_mut()
                    .find(|(l, n, _)| *l == load && *n == t.name)
                {
                    Some((_, _, runs)) => runs.push(r),
                    None => rounds.push((load, t.name, vec![r])),
                }
            }
        }
    }
    drop((envoys, relays));
    // Every request the load runs sent through the Linkerd pair went over its mTLS.
    let l5d_mtls = match (&linkerd, l5d_mtls_before) {
        (Some(l), Some(before)) => Some(l.mtls_requests().await? - before),
        _ => None,
    };
    drop(linkerd);
    let results: Vec<(Load, &str, Run)> = rounds
        .iter()
        .map(|(l, n, runs)| (*l, *n, Run::median(runs)))
        .collect();

    // None: the cell was not run (`--only`, `--loads`).
    let get = |load: Load, name: &str| {
        results
            .iter()
            .find(|(l, n, _)| *l == load && *n == name)
            .map(|(_, _, r)| r.clone())
    };
    let mut md = String::new();
    writeln!(
        md,
        "{} round(s) of {} s per cell ({} s at 1,000 rps); each figure is its cell's median over \
         the rounds. Mesh sidecar: `{}`. Load: oha, and {} for HTTP/2 and gRPC. In the \
         CPU-limited loads each proxy process is held to {} CPU (CFS quota, 100 ms period).\n",
        args.rounds.max(1),
        args.secs,
        args.secs.max(args.fixed_secs),
        proxy.display(),
        match args.h2_tool {
            H2Tool::Oha => "oha",
            H2Tool::H2load => "h2load (percentiles from its per-request log)",
        },
        args.cpu_limit
    )?;
    if let Some(cpu) = split.as_ref().map(|s| s.proxy_cpu) {
        writeln!(
            md,
            "Pinned (`--pin`): in the saturation loads that are not CPU-limited, the proxies ran \
             on CPU {cpu} alone, and the app, the load tool and the bench on the other CPUs.\n"
        )?;
    }
    if let Some(n) = args.app_threads {
        writeln!(
            md,
            "The app ran on {n} runtime thread(s) (`--app-threads`).\n"
        )?;
    }
    writeln!(
        md,
        "| load | topology | req/s | p50 ms | p90 ms | p99 ms | p99 added over direct, ms | proxy CPU µs/req | proxy RSS idle / after, MiB | errors |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for load in loads {
        let direct = get(load, "direct");
        for t in &topologies {
            let Some(r) = get(load, t.name) else {
                continue;
            };
            let added = match &direct {
                Some(d) if t.name != "direct" => format!("{:.3}", r.p99 - d.p99),
                _ => "-".to_string(),
            };
            let cpu = if t.proxies.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", r.cpu_us_per_req)
            };
            let rss = if t.proxies.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1} / {:.1}", r.rss_idle, r.rss_load)
            };
            writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {added} | {cpu} | {rss} | {} |",
                load.label(),
                t.name,
                r.rps,
                r.p50,
                r.p90,
                r.p99,
                r.errors
            )?;
        }
    }
    writeln!(md, "\nRatios mesh / Envoy (targets in parentheses):\n")?;
    let times = |x: Option<f64>| x.map_or_else(|| "not run".to_string(), |x| format!("{x:.2}×"));
    let ratio = |load: Load, t: (&str, &str), f: fn(&Run) -> f64| {
        times(
            get(load, t.0)
                .zip(get(load, t.1))
                .map(|(a, b)| f(&a) / f(&b)),
        )
    };
    let (pair, single) = (("mesh", "envoy"), ("mesh-1", "envoy-1"));
    let cpu = |r: &Run| r.cpu_us_per_req;
    let rps = |r: &Run| r.rps;
    let saturation = [Load::H1Saturation, Load::H2Saturation, Load::GrpcUnary];
    let limited = [Load::H1Limited, Load::H2Limited, Load::GrpcLimited];
    // One ratio per protocol, for the three saturation loads or their CPU-limited runs.
    let by_protocol = |loads: [Load; 3], t: (&str, &str), f: fn(&Run) -> f64| {
        format!(
            "HTTP/1.1 {}, HTTP/2 {}, gRPC {}",
            ratio(loads[0], t, f),
            ratio(loads[1], t, f),
            ratio(loads[2], t, f)
        )
    };
    let direct_p99 = get(Load::H1Fixed1000, "direct").map(|r| r.p99);
    let added = |t: &str| Some(get(Load::H1Fixed1000, t)?.p99 - direct_p99?);
    // A topology's runs at 1,000 rps, round by round: a round's cells run minutes apart at
    // most, so a ratio within a round shows how much of the spread is the machine's.
    let by_round = |t: &str| {
        rounds
            .iter()
            .find(|(l, n, _)| *l == Load::H1Fixed1000 && *n == t)
            .map(|(_, _, runs)| runs)
    };
    // The median ratio, and with more than one round each round's own.
    let added_ratio = |t: (&str, &str)| {
        let median = times(added(t.0).zip(added(t.1)).map(|(a, b)| a / b));
        match (by_round("direct"), by_round(t.0), by_round(t.1)) {
            (Some(d), Some(a), Some(b)) if d.len() > 1 && a.len() == d.len() => {
                let each: Vec<String> = d
                    .iter()
                    .zip(a.iter().zip(b))
                    .map(|(d, (a, b))| format!("{:.2}", (a.p99 - d.p99) / (b.p99 - d.p99)))
                    .collect();
                format!("{median} (by round {})", each.join(", "))
            }
            _ => median,
        }
    };
    writeln!(
        md,
        "- CPU per request, mTLS pair (≤ 0.4×): at saturation {}; HTTP/1.1 at 1,000 rps {}",
        by_protocol(saturation, pair, cpu),
        ratio(Load::H1Fixed1000, pair, cpu),
    )?;
    writeln!(
        md,
        "- p99 added at 1,000 rps (≤ 0.33×): mTLS pair {}, one proxy {}",
        added_ratio(pair),
        added_ratio(single),
    )?;
    let ms = |x: Option<f64>| x.map_or_else(|| "not run".to_string(), |x| format!("{x:.3} ms"));
    writeln!(
        md,
        "- the floor, two plain TCP relays (`relay`: the pair's hops, no TLS, no HTTP): p99 added \
         at 1,000 rps {} (the mesh pair {}, Envoy's {}); relay / Envoy {}: no pair can beat that",
        ms(added("relay")),
        ms(added(pair.0)),
        ms(added(pair.1)),
        added_ratio(("relay", pair.1)),
    )?;
    writeln!(
        md,
        "- saturation throughput through one proxy (≥ 2×): {}",
        by_protocol(saturation, single, rps),
    )?;
    writeln!(
        md,
        "- the same, each proxy held to {} CPU, so that the proxy is what saturates: {}",
        args.cpu_limit,
        by_protocol(limited, single, rps),
    )?;
    writeln!(
        md,
        "- saturation throughput through the mTLS pair: {}; each sidecar held to {} CPU: {}",
        by_protocol(saturation, pair, rps),
        args.cpu_limit,
        by_protocol(limited, pair, rps),
    )?;
    let started = |name: &str| {
        topologies
            .iter()
            .zip(&rss_warm)
            .find(|(t, _)| t.name == name)
            .map_or(0.0, |(_, r)| *r)
    };
    let loaded = |name: &str| {
        get(Load::H1Fixed1000, name)
            .map_or_else(|| "-".to_string(), |r| format!("{:.1}", r.rss_load))
    };
    writeln!(
        md,
        "- RSS of one proxy, idle after warm-up traffic / after all runs (idle ≤ 10 MB, loaded ≤ 20 MB): mesh {:.1} / {} MiB, Envoy {:.1} / {} MiB",
        started("mesh-1"),
        loaded("mesh-1"),
        started("envoy-1"),
        loaded("envoy-1"),
    )?;
    if let Some(n) = l5d_mtls {
        let l5d = ("mesh", "l5d");
        writeln!(
            md,
            "\nRatios mesh / linkerd2-proxy (targets in parentheses); the Linkerd pair carried \
             {n} requests of the runs over its mTLS, by both proxies' metrics:\n"
        )?;
        writeln!(
            md,
            "- CPU per request, mTLS pair (≤ 0.7×): at saturation {}; HTTP/1.1 at 1,000 rps {}; \
             each sidecar held to {} CPU: {}",
            by_protocol(saturation, l5d, cpu),
            ratio(Load::H1Fixed1000, l5d, cpu),
            args.cpu_limit,
            by_protocol(limited, l5d, cpu),
        )?;
        writeln!(
            md,
            "- p99 added at 1,000 rps (≤ 0.8×): mTLS pair {}, one proxy {}",
            added_ratio(l5d),
            added_ratio(("mesh-1", "l5d-1")),
        )?;
        writeln!(
            md,
            "- saturation throughput through the mTLS pair: {}; each sidecar held to {} CPU: {}",
            by_protocol(saturation, l5d, rps),
            args.cpu_limit,
            by_protocol(limited, l5d, rps),
        )?;
        writeln!(
            md,
            "- RSS of one proxy, idle after warm-up traffic / after all runs (≤ 1×): mesh {:.1} / {} MiB, linkerd2-proxy {:.1} / {} MiB = {:.2}×",
            started("mesh-1"),
            loaded("mesh-1"),
            started("l5d-1"),
            loaded("l5d-1"),
            started("mesh-1") / started("l5d-1"),
        )?;
    }
    println!("{md}");
    if let Some(p) = args.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&args.out, &md)?;
    eprintln!(
        "table written to {}; process logs in {} (kept)",
        args.out.display(),
        d.display()
    );
    mesh.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::H2loadSummary;

    /// The summary of an h2load 1.52 run, trimmed to the lines it is read from and one beside.
    const OUT: &str = "Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 5.00s, 85762.60 req/s, 85.96MB/s
requests: 428813 total, 428829 started, 428813 done, 428810 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 428805 2xx, 0 3xx, 4 4xx, 1 5xx
traffic: 429.81MB (450683303) total, 3.68MB (3859937) headers (space savings 90.72%), 418.76MB (439104512) data
";

    #[test]
    fn h2load_summary_counts_only_2xx_as_ok_and_every_failure_as_an_error() {
        let s = H2loadSummary::parse(OUT).expect("parses");
        assert_eq!(
            s,
            H2loadSummary {
                secs: 5.0,
                ok: 428_805,
                errors: 2 + 1 + 4 + 1,
            }
        );
    }

    #[test]
    fn h2load_summary_without_status_codes_is_an_error() {
        let cut = OUT.replace("status codes:", "codes:");
        let e = H2loadSummary::parse(&cut).expect_err("no status line");
        assert!(e.to_string().contains("status codes: "), "{e}");
    }
}
