//! Static configuration: flags and environment, validated once at start (exit 78 when invalid).

use crate::inbound::AppProtocol;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Parser, Debug)]
#[command(
    name = "mesh-proxy",
    version,
    about = "The mesh sidecar proxy (`mesh-proxy init --help`: the pod traffic redirect)"
)]
pub struct Args {
    /// Settings file, `KEY=VALUE` per line (`MESH_APP_PORT=8080` or `app-port=8080`); the
    /// command line and the environment take precedence over it.
    #[arg(long, env = "MESH_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Control plane address(es), tried in order.
    #[arg(
        long = "control-plane",
        env = "MESH_CONTROL_PLANE",
        default_value = "https://127.0.0.1:15010",
        value_delimiter = ','
    )]
    pub control_plane: Vec<String>,
    /// DNS name in the control plane's certificate.
    #[arg(
        long,
        env = "MESH_CONTROL_PLANE_NAME",
        default_value = "mesh-control-plane"
    )]
    pub control_plane_name: String,
    /// Mesh root certificate (PEM) used to verify the control plane before this proxy has a bundle.
    #[arg(long, env = "MESH_CA_FILE")]
    pub ca_file: PathBuf,
    /// Bootstrap token (from `meshctl token create`).
    #[arg(long, env = "MESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long, env = "MESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "mesh.local")]
    pub trust_domain: String,
    #[arg(long, env = "MESH_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Service account (default: the service name, or "default").
    #[arg(long, env = "MESH_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Service this proxy's app serves; with --app-port the proxy registers it as an endpoint.
    #[arg(long, env = "MESH_SERVICE")]
    pub service: Option<String>,
    /// `version` label of this endpoint (used by weighted routes).
    #[arg(long = "service-version", env = "MESH_SERVICE_VERSION")]
    pub version_label: Option<String>,
    /// Local app port; enables the inbound listener.
    #[arg(long, env = "MESH_APP_PORT")]
    pub app_port: Option<u16>,
    /// What the app speaks on its port: `http1` (every request reaches it as HTTP/1.1,
    /// whatever the caller spoke), `http2` (h2c with prior knowledge), or `detect` (the
    /// caller's protocol; an app that does not answer HTTP/2 gets HTTP/1.1).
    #[arg(long, env = "MESH_APP_PROTOCOL", value_enum, default_value_t = AppProtocol::Detect)]
    pub app_protocol: AppProtocol,
    /// Destination ports served opaque at once, without protocol detection (transparent
    /// mode), besides the defaults (25, 587, 3306, 4444, 5432, 6379, 9300, 11211): ports of
    /// server-first protocols, whose clients send nothing until the server speaks.
    #[arg(long, env = "MESH_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,
    #[arg(long, env = "MESH_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    #[arg(long, env = "MESH_INBOUND_ADDR", default_value = "127.0.0.1:15006")]
    pub inbound_addr: SocketAddr,
    /// Address peers reach the inbound listener at (default: the bound --inbound-addr).
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Extra per-service local listeners for apps that cannot use an HTTP proxy: `name=ip:port`.
    #[arg(long = "upstream", env = "MESH_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Unique id of this proxy (default: <service>-<hostname>-<pid>).
    #[arg(long, env = "MESH_NODE_ID")]
    pub node_id: Option<String>,
    /// How long in-flight requests may take to finish on shutdown, seconds.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,
    /// After deregistering on shutdown, keep accepting this long, so that callers that have not
    /// yet applied the endpoint's removal still get answers, milliseconds.
    #[arg(long, env = "MESH_DRAIN_GRACE_MS", default_value_t = 1000)]
    pub drain_grace_ms: u64,
    /// How often golden metrics are reported to the control plane, milliseconds.
    #[arg(long, env = "MESH_TELEMETRY_INTERVAL_MS", default_value_t = 1000)]
    pub telemetry_interval_ms: u64,
    /// Tokio worker threads. One by default, as Linkerd's sidecar: on a current-thread runtime,
    /// where no wakeup crosses threads, the pair takes a third less CPU per request at 1,000
    /// requests a second than on two workers, and adds a quarter less p99 (BENCHMARKS.md,
    /// "linkerd2-proxy side by side"). More for a sidecar or gateway with over a core of work.
    #[arg(long, env = "MESH_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Time a client has to send a request head, milliseconds (slowloris bound).
    #[arg(long, env = "MESH_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Largest request head, bytes.
    #[arg(long, env = "MESH_MAX_HEADER_BYTES", default_value_t = 65_536)]
    pub max_header_bytes: usize,
    /// Most headers in one HTTP/1 request.
    #[arg(long, env = "MESH_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "MESH_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Open connections per listener; past it new connections are closed at once.
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Write one JSON line per request: `stderr`, or a file path (appended). Off by default.
    #[arg(long, env = "MESH_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Write `?redacted` for each query string in the access log.
    #[arg(long, env = "MESH_ACCESS_LOG_REDACT_QUERY")]
    pub access_log_redact_query: bool,
    /// OTLP collector to export request spans to, e.g. `http://127.0.0.1:4317` (OTLP/gRPC;
    /// `https://` for TLS). Without it, `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` and the other
    /// standard `OTEL_*` variables decide (`mesh_otel::ExportSettings`). Off by default.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0 (a caller's sampling decision is followed).
    /// Without it `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` decide; default 1.0.
    #[arg(long, env = "MESH_TRACE_SAMPLING")]
    pub trace_sampling: Option<f64>,
    /// Health check of the app the proxy runs itself (VMs): `tcp`, `http:/path` (200-399 is
    /// healthy) or `none`. An unhealthy app's endpoint is registered as not ready.
    #[arg(long, env = "MESH_APP_HEALTH_CHECK", default_value = "none")]
    pub app_health_check: String,
    /// The kubelet's probes of the app, rewritten by the injector to
    /// `/app-health/<container>/<kind>` on the admin port: JSON by path, each the original
    /// probe (httpGet, tcpSocket or grpc, with timeoutSeconds), run against the app on
    /// localhost.
    #[arg(long, env = "MESH_APP_PROBES", default_value = "")]
    pub app_probes: String,
    #[arg(long, env = "MESH_APP_HEALTH_INTERVAL_MS", default_value_t = 2000)]
    pub app_health_interval_ms: u64,
    #[arg(long, env = "MESH_APP_HEALTH_TIMEOUT_MS", default_value_t = 1000)]
    pub app_health_timeout_ms: u64,
    /// Consecutive failed checks before the app counts as unhealthy.
    #[arg(long, env = "MESH_APP_HEALTH_FAILURES", default_value_t = 2)]
    pub app_health_failures: u32,
    /// Connections arrive redirected by `mesh-proxy init` (pods, or VMs with the redirect):
    /// the outbound listener serves each by its original destination, and the proxy learns
    /// every service so it knows which destinations are in the mesh.
    #[arg(long, env = "MESH_TRANSPARENT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub transparent: bool,
    /// Ingress gateway: HTTPS listener for outside clients (TLS with --gateway-cert, HTTP/1.1
    /// and HTTP/2 by ALPN). Requests are routed by the route of --service (its rules match
    /// hosts and send to other services) and sent over mesh mTLS with this proxy's identity.
    #[arg(long, env = "MESH_GATEWAY_HTTPS_ADDR")]
    pub gateway_https_addr: Option<SocketAddr>,
    /// Ingress gateway: plaintext HTTP listener. With --gateway-https-addr it answers every
    /// request with a redirect to HTTPS (301; 308 for methods other than GET and HEAD);
    /// without it, it routes as the HTTPS listener does.
    #[arg(long, env = "MESH_GATEWAY_HTTP_ADDR")]
    pub gateway_http_addr: Option<SocketAddr>,
    /// The HTTPS port named in redirects (default: --gateway-https-addr's port), for a
    /// gateway behind a balancer that listens on 443.
    #[arg(long, env = "MESH_GATEWAY_REDIRECT_PORT")]
    pub gateway_redirect_port: Option<u16>,
    /// A server certificate of the gateway: `CERT.pem:KEY.pem` (chain, then key). Repeat for
    /// several hosts: each client gets the one whose DNS names (exact or `*.`) match its SNI,
    /// the first without SNI. The files are read again when they change; connections already
    /// open keep going.
    #[arg(
        long = "gateway-cert",
        env = "MESH_GATEWAY_CERT",
        value_delimiter = ','
    )]
    pub gateway_certs: Vec<String>,
}

/// Validated static configuration.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub control_planes: Vec<String>,
    pub control_plane_name: String,
    pub ca_pem: String,
    pub token: Option<String>,
    /// Where the token came from: read again at each use (a projected Kubernetes token is
    /// replaced by the kubelet before it expires).
    pub token_file: Option<PathBuf>,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`
    /// The proxy's namespace: bare service names are its namespace's.
    pub namespace: String,
    pub identity: String,
    pub service: Option<String>,
    pub version_label: Option<String>,
    pub app_port: Option<u16>,
    pub app_protocol: AppProtocol,
    pub opaque_ports: Vec<u16>,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub advertise_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub node_id: String,
    pub drain_timeout: Duration,
    pub drain_grace: Duration,
    pub telemetry_interval: Duration,
    pub worker_threads: usize,
    pub access_log: Option<crate::telemetry::access_log::Target>,
    pub access_log_redact_query: bool,
    pub limits: crate::http::server::ServerLimits,
    /// Where spans go (flags, then the standard `OTEL_*` environment); None: nowhere.
    pub otlp: Option<mesh_otel::ExportSettings>,
    pub trace_sampling: f64,
    /// The app's health check (None: the endpoint is always ready).
    pub app_health: Option<crate::health::HealthConfig>,
    pub app_probes: crate::app_probe::AppProbes,
    /// Connections are redirected to the listeners (see `outbound::transparent`).
    pub transparent: bool,
    /// Ingress gateway listeners (None: not a gateway).
    pub gateway: Option<crate::gateway::GatewayConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0}")]
    Invalid(String),
}

fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl Bootstrap {
    /// The bootstrap token as it is now: the token file read again (falling back to what it
    /// held at start if it cannot be read), or the token given.
    pub fn current_token(&self) -> Option<String> {
        self.token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone())
    }
}

impl TryFrom<Args> for Bootstrap {
    type Error = BootstrapError;

    fn try_from(a: Args) -> Result<Self, BootstrapError> {
        let bad = |m: String| BootstrapError::Invalid(m);
        let ca_pem = std::fs::read_to_string(&a.ca_file)
            .map_err(|e| bad(format!("--ca-file {}: {e}", a.ca_file.display())))?;
        if !ca_pem.contains("BEGIN CERTIFICATE") {
            return Err(bad(format!(
                "--ca-file {} holds no PEM certificate",
                a.ca_file.display()
            )));
        }
        let token_file = a.token_file.clone().filter(|_| a.token.is_none());
        let token = match (a.token, a.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(&p)
                    .map_err(|e| bad(format!("--token-file {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let sa = a
            .service_account
            .or_else(|| a.service.clone())
            .unwrap_or_else(|| "default".into());
        for (what, v) in [
            ("trust domain", &a.trust_domain),
            ("namespace", &a.namespace),
            ("service account", &sa),
        ] {
            if !label_ok(v) {
                return Err(bad(format!("invalid {what} {v:?}")));
            }
        }
        if let Some(s) = &a.service
            && !label_ok(s)
        {
            return Err(bad(format!("invalid service name {s:?}")));
        }
        if a.app_port.is_some() && a.service.is_none() {
            return Err(bad("--app-port needs --service".into()));
        }
        if a.control_plane.is_empty() {
            return Err(bad("at least one --control-plane is needed".into()));
        }
        for cp in &a.control_plane {
            if !cp.starts_with("https://") {
                return Err(bad(format!(
                    "--control-plane {cp:?} must be an https:// URL"
                )));
            }
        }
        if a.app_port.is_some()
            && a.advertise_addr.is_none()
            && a.inbound_addr.ip().is_unspecified()
        {
            return Err(bad("--inbound-addr binds all interfaces: set --advertise-addr to the address peers use".into()));
        }
        let mut upstreams = Vec::new();
        for u in a.upstreams {
            let (name, addr) = u
                .split_once('=')
                .ok_or_else(|| bad(format!("--upstream {u:?}: expected name=ip:port")))?;
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| bad(format!("--upstream {u:?}: bad address")))?;
            upstreams.push((name.to_string(), addr));
        }
        let node_id = a.node_id.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "host".into());
            format!(
                "{}-{}-{}",
                a.service.as_deref().unwrap_or("client"),
                host.trim(),
                std::process::id()
            )
        });
        if a.workers == 0 {
            return Err(bad("--workers must be at least 1".into()));
        }
        if a.max_connections == 0 || a.max_concurrent_streams == 0 || a.max_headers == 0 {
            return Err(bad(
                "--max-connections, --max-concurrent-streams and --max-headers must be at least 1"
                    .into(),
            ));
        }
        if a.max_header_bytes < 1024 || a.header_read_timeout_ms == 0 {
            return Err(bad(
                "--max-header-bytes must be at least 1024 and --header-read-timeout-ms above 0"
                    .into(),
            ));
        }
        let env = |k: &str| std::env::var(k).ok();
        let trace_sampling = match a.trace_sampling {
            Some(s) => s,
            None => mesh_otel::sampler_from_env(env)
                .map_err(|e| bad(e.to_string()))?
                .unwrap_or(1.0),
        };
        if !(0.0..=1.0).contains(&trace_sampling) {
            return Err(bad(format!(
                "--trace-sampling must be between 0.0 and 1.0, got {trace_sampling}"
            )));
        }
        // Spans name the workload: its service, else its account.
        let otlp = mesh_otel::ExportSettings::resolve(
            a.otlp_endpoint.as_deref(),
            a.service.as_deref().unwrap_or(&sa),
            env,
        )
        .map_err(|e| bad(format!("--otlp-endpoint: {e}")))?;
        let app_probes = crate::app_probe::AppProbes::parse(&a.app_probes).map_err(bad)?;
        let app_health = match crate::health::Check::parse(&a.app_health_check).map_err(bad)? {
            Some(_) if a.app_port.is_none() => {
                return Err(bad("--app-health-check needs --app-port".into()));
            }
            Some(check) => Some(crate::health::HealthConfig {
                check,
                interval: Duration::from_millis(a.app_health_interval_ms.max(100)),
                timeout: Duration::from_millis(a.app_health_timeout_ms.max(10)),
                failures: a.app_health_failures.max(1),
            }),
            None => None,
        };
        let gateway = crate::gateway::GatewayConfig::from_flags(
            a.gateway_https_addr,
            a.gateway_http_addr,
            a.gateway_redirect_port,
            &a.gateway_certs,
        )
        .map_err(bad)?;
        if gateway.is_some() && (a.service.is_none() || a.app_port.is_some()) {
            return Err(bad(
                "a gateway needs --service (the gateway's name, whose route it serves) and no --app-port".into(),
            ));
        }
        Ok(Self {
            gateway,
            control_planes: a.control_plane,
            control_plane_name: a.control_plane_name,
            ca_pem,
            token,
            token_file,
            identity: format!("spiffe://{}/ns/{}/sa/{sa}", a.trust_domain, a.namespace),
            namespace: a.namespace.clone(),
            service: a.service,
            version_label: a.version_label,
            app_port: a.app_port,
            app_protocol: a.app_protocol,
            opaque_ports: a.opaque_ports,
            outbound_addr: a.outbound_addr,
            inbound_addr: a.inbound_addr,
            advertise_addr: a.advertise_addr,
            admin_addr: a.admin_addr,
            upstreams,
            node_id,
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
            drain_grace: Duration::from_millis(a.drain_grace_ms),
            telemetry_interval: Duration::from_millis(a.telemetry_interval_ms.max(50)),
            worker_threads: a.workers,
            access_log: a
                .access_log
                .map(|t| crate::telemetry::access_log::Target::parse(&t)),
            access_log_redact_query: a.access_log_redact_query,
            limits: crate::http::server::ServerLimits {
                header_read_timeout: Duration::from_millis(a.header_read_timeout_ms),
                max_header_bytes: a.max_header_bytes,
                max_headers: a.max_headers,
                max_streams: a.max_concurrent_streams,
                max_connections: a.max_connections,
            },
            otlp,
            trace_sampling,
            app_health,
            app_probes,
            transparent: a.transparent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// Injected pods are configured by the environment alone: every flag has its variable,
    /// named by the one rule (`--drain-grace-ms` → `MESH_DRAIN_GRACE_MS`) that `--config-file`
    /// keys follow too, so a setting is never silently dropped.
    #[test]
    fn every_flag_has_its_environment_variable() {
        let cmd = Args::command();
        let mut checked = 0;
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = crate::config_file::env_of(long);
            assert_eq!(
                a.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} flags seen");
    }
}
