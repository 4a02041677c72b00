//! `mesh-control-plane`: parse flags, run until SIGTERM/SIGINT.

use clap::Parser;
use mesh_control_plane::server::{Config, run};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The mesh control plane: registry, config push, certificate authority, admin API"
)]
struct Args {
    /// Data directory of the embedded store, the CA and the admin token.
    #[arg(long, env = "MESH_DATA_DIR", default_value = ".mesh")]
    data_dir: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "mesh.local")]
    trust_domain: String,
    /// Address for proxies (discovery + identity).
    #[arg(long, env = "MESH_GRPC_ADDR", default_value = "127.0.0.1:15010")]
    grpc_addr: std::net::SocketAddr,
    /// Address for meshctl (admin API).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15011")]
    admin_addr: std::net::SocketAddr,
    /// Address of the plain-HTTP port: /metrics and the dashboard (read-only).
    #[arg(long, env = "MESH_HTTP_ADDR", default_value = "127.0.0.1:15014")]
    http_addr: std::net::SocketAddr,
    /// Workload certificate lifetime, seconds.
    #[arg(long, default_value_t = 86400)]
    cert_ttl_secs: u64,
    /// Extra DNS names for the control plane's serving certificate.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Operator-provided CA certificate (PEM); with --ca-key, used instead of a generated root.
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM; keep it mode 0600). Read from this file only, never stored.
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// OTLP collector for the control plane's spans, e.g. http://127.0.0.1:4317 (OTLP/gRPC;
    /// https:// for TLS). Without it the standard `OTEL_*` variables decide.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Seconds an endpoint registered by a proxy outlives that proxy's disconnection before
    /// it is removed (a lost machine never deregisters).
    #[arg(long, env = "MESH_ENDPOINT_LEASE_SECS", default_value_t = 30)]
    endpoint_lease_secs: u64,
    /// Take endpoints from Kubernetes (Pods and EndpointSlices of injected pods), with the
    /// in-cluster service account or the kubeconfig.
    #[arg(long, env = "MESH_KUBERNETES")]
    kubernetes: bool,
    /// As --kubernetes, with an API server reached at this URL without credentials (tests,
    /// `kubectl proxy`).
    #[arg(long, env = "MESH_KUBE_API", conflicts_with = "kubernetes")]
    kube_api: Option<String>,
    /// Serve the Kubernetes sidecar-injection webhook (HTTPS, POST /inject) here, e.g.
    /// 0.0.0.0:15017. Off unless given.
    #[arg(long, env = "MESH_WEBHOOK_ADDR")]
    webhook_addr: Option<std::net::SocketAddr>,
    /// With Kubernetes and --webhook-addr: the MutatingWebhookConfiguration whose caBundle the
    /// control plane keeps equal to the trust bundle.
    #[arg(long, default_value = "mesh-sidecar-injector")]
    webhook_configuration: String,
    #[command(flatten)]
    inject: mesh_inject::InjectArgs,
    /// Where the mesh's state lives: `file` (the data directory; one replica),
    /// `etcd://host:2379[,host:2379...][/prefix]` (`etcd+https://…` for TLS, with --etcd-ca
    /// and, for etcd's --client-cert-auth, --etcd-cert/--etcd-key), or `kubernetes` (ConfigMap `mesh-state` in
    /// --namespace, through the API server; needs --kubernetes or --kube-api). The last two
    /// are shared by several replicas, each of which then needs --ca-cert/--ca-key (the same
    /// CA) and a --replica-id of its own.
    #[arg(long, env = "MESH_STORE", default_value = "file")]
    store: String,
    /// The CA (PEM) that signed etcd's serving certificates (`etcd+https://`).
    #[arg(long, env = "MESH_ETCD_CA")]
    etcd_ca: Option<std::path::PathBuf>,
    /// This replica's client certificate (PEM) for etcd.
    #[arg(long, env = "MESH_ETCD_CERT")]
    etcd_cert: Option<std::path::PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "MESH_ETCD_KEY")]
    etcd_key: Option<std::path::PathBuf>,
    /// This replica's name on a shared store (default: host name and process id).
    #[arg(long, env = "MESH_REPLICA_ID")]
    replica_id: Option<String>,
    /// `host:port` where the other replicas on a shared store reach this one's --grpc-addr
    /// (for top, tap, proxies, the dashboard and canary gates across replicas). Default:
    /// --grpc-addr when it names one address; on Kubernetes, `$(POD_IP):15010`.
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Seconds a leader's lease lasts (etcd, or the Kubernetes Lease): how soon another
    /// replica takes over singleton work (the canary controller, the endpoint-lease sweeper)
    /// after the leader is lost.
    #[arg(long, env = "MESH_LEADER_LEASE_SECS", default_value_t = 10)]
    leader_lease_secs: u64,
    /// With Kubernetes: the control plane's own namespace, where the replicas hold the Lease
    /// `mesh-control-plane` they elect their leader with (and, with `--store kubernetes`, the
    /// state ConfigMap `mesh-state`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    namespace: String,
    /// Read the admin token from this file (e.g. a mounted Secret shared by every replica)
    /// instead of making one in the data directory.
    #[arg(long, env = "MESH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// Host name and process id: unique per replica without configuration.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "replica" } else { &host },
        std::process::id()
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if a.cert_ttl_secs < 5 {
        eprintln!("error: --cert-ttl-secs must be at least 5");
        return std::process::ExitCode::from(78);
    }
    let cfg = Config {
        data_dir: a.data_dir,
        trust_domain: a.trust_domain,
        grpc_addr: a.grpc_addr,
        admin_addr: a.admin_addr,
        http_addr: a.http_addr,
        leaf_ttl: std::time::Duration::from_secs(a.cert_ttl_secs),
        server_names: a.server_names,
        ca_cert: a.ca_cert,
        ca_key: a.ca_key,
        otlp_endpoint: a.otlp_endpoint,
        webhook_addr: a.webhook_addr,
        webhook_configuration: a.webhook_configuration,
        kubernetes: match (a.kubernetes, a.kube_api) {
            (_, Some(url)) => Some(mesh_control_plane::k8s::Source::Url(url)),
            (true, None) => Some(mesh_control_plane::k8s::Source::Infer),
            (false, None) => None,
        },
        endpoint_lease: std::time::Duration::from_secs(a.endpoint_lease_secs.max(1)),
        inject: a.inject.config(),
        store: (a.store != "file").then_some(a.store),
        replica_id: a.replica_id.unwrap_or_else(default_replica_id),
        advertise_addr: a.advertise_addr,
        leader_lease: std::time::Duration::from_secs(a.leader_lease_secs.max(3)),
        namespace: a.namespace,
        admin_token_file: a.admin_token_file,
        etcd_tls: mesh_control_plane::state::store::etcd::EtcdTls {
            ca: a.etcd_ca,
            cert: a.etcd_cert,
            key: a.etcd_key,
        },
    };
    match run(cfg, mesh_control_plane::server::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
