//! Wiring of the control-plane process: store, registry, CA, and the two gRPC servers.

use crate::api::admin::AdminService;
use crate::api::admin::scope::AdminAuth;
use crate::ca::CertificateAuthority;
use crate::ca::service::{CaStats, IdentityService};
use crate::discovery::{DiscoveryService, ProxyTable};
use crate::state::registry::Registry;
use crate::state::store::file::{FileStore, write_atomic};
use anyhow::Context;
use mesh_proto::v1 as pb;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Server;

/// Largest gRPC message the control plane decodes (bytes).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Static configuration of the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub trust_domain: String,
    /// Proxies' port: discovery + identity (TLS, optional client certs). Default 15010.
    pub grpc_addr: SocketAddr,
    /// meshctl's port: admin API (TLS + token). Default 15011.
    pub admin_addr: SocketAddr,
    /// Plain HTTP: `/metrics` and the dashboard. Default 127.0.0.1:15014.
    pub http_addr: SocketAddr,
    pub leaf_ttl: Duration,
    /// Extra DNS names for the serving certificate.
    pub server_names: Vec<String>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// OTLP/gRPC collector for the control plane's own spans (admin calls, pushes).
    pub otlp_endpoint: Option<String>,
    /// How long an endpoint outlives its proxy's disconnection (see `lease`).
    pub endpoint_lease: Duration,
    /// Endpoints from Kubernetes Pods and EndpointSlices (None: proxies register them).
    pub kubernetes: Option<crate::k8s::Source>,
    /// The MutatingWebhookConfiguration whose caBundle follows the trust bundle (Kubernetes).
    pub webhook_configuration: String,
    /// HTTPS port of the sidecar-injection webhook (None: not served).
    pub webhook_addr: Option<SocketAddr>,
    pub inject: mesh_inject::InjectConfig,
    /// A shared store, `etcd://host:port[,…][/prefix]` (None: the embedded file store).
    pub store: Option<String>,
    /// This replica's name in the shared store (presence, leader election).
    pub replica_id: String,
    /// Where the other replicas reach this one's proxies' port (None: `grpc_addr` when it
    /// names one address).
    pub advertise_addr: Option<String>,
    /// Leader lease on a shared store: how long the others wait after a leader vanishes.
    pub leader_lease: Duration,
    /// The control plane's namespace (Kubernetes): its Lease, its state ConfigMap.
    pub namespace: String,
    /// The admin token from this file (one Secret for every replica) instead of
    /// `<data-dir>/admin-token`.
    pub admin_token_file: Option<PathBuf>,
    /// TLS to etcd (`--store etcd+https://…`).
    pub etcd_tls: crate::state::store::etcd::EtcdTls,
}

/// The `coordination.k8s.io` Lease the replicas elect a leader with on Kubernetes.
pub const LEASE_NAME: &str = "mesh-control-plane";

use mesh_proto::CONTROL_PLANE_SERVER_NAME as SERVER_NAME;

/// Reads the admin token from the data dir, creating it (mode 0600) on first start.
fn admin_token(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("{} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = hex::encode(b);
            write_atomic(&path, format!("{t}\n").as_bytes(), 0o600)?;
            Ok(t)
        }
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

/// Runs the control plane until `shutdown` resolves. Prints one JSON line on stdout once its
/// ports listen: `{"event":"listening","grpc":"…","admin":"…","http":"…"}` (and `"webhook"`).
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| cfg.data_dir.display().to_string())?;
    crate::observe::trace::start(cfg.otlp_endpoint.as_deref()).context("OTLP exporter")?;
    let kube = match &cfg.kubernetes {
        Some(src) => Some(
            crate::k8s::client(src)
                .await
                .context("Kubernetes API client")?,
        ),
        None => None,
    };
    let (store, etcd_leader): (Arc<dyn crate::state::store::Store>, _) = match &cfg.store {
        None => (Arc::new(FileStore::open(&cfg.data_dir)?), None),
        Some(url) => {
            anyhow::ensure!(
                cfg.ca_cert.is_some(),
                "--store {url}: every replica must sign with the same CA; give each one \
                 --ca-cert and --ca-key (the key is never written to the store)"
            );
            crate::state::registry::check_name("--replica-id", &cfg.replica_id)?;
            if url == "kubernetes" {
                let client = kube.clone().context(
                    "--store kubernetes needs the Kubernetes API: give --kubernetes or --kube-api",
                )?;
                let s = crate::state::store::kube::KubeStore::new(
                    client,
                    &cfg.namespace,
                    crate::state::store::kube::DEFAULT_NAME,
                );
                (Arc::new(s) as Arc<dyn crate::state::store::Store>, None)
            } else {
                let s = crate::state::store::etcd::EtcdStore::connect(url, &cfg.etcd_tls).await?;
                let leader = crate::replicas::leader::Leadership::etcd(
                    s.client(),
                    s.prefix(),
                    cfg.replica_id.clone(),
                    cfg.leader_lease,
                );
                (Arc::new(s), Some(leader))
            }
        }
    };
    let registry = Arc::new(Registry::open(store, cfg.trust_domain.clone()).await?);
    if registry.shared() {
        tokio::spawn(registry.clone().follow());
    }
    let ca = match (&cfg.ca_cert, &cfg.ca_key) {
        (Some(c), Some(k)) => CertificateAuthority::from_files(
            c,
            k,
            &cfg.data_dir.join("ca").join("bundle.pem"),
            &cfg.trust_domain,
            cfg.leaf_ttl,
        )?,
        (None, None) => CertificateAuthority::load_or_generate(
            &cfg.data_dir.join("ca"),
            &cfg.trust_domain,
            cfg.leaf_ttl,
        )?,
        _ => anyhow::bail!("--ca-cert and --ca-key go together"),
    };
    let ca = Arc::new(ca);
    let token = match &cfg.admin_token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("--admin-token-file {}", p.display()))
            .and_then(|t| {
                let t = t.trim().to_string();
                anyhow::ensure!(
                    t.len() >= 16,
                    "--admin-token-file {}: token shorter than 16 characters",
                    p.display()
                );
                Ok(t)
            })?,
        None => admin_token(&cfg.data_dir)?,
    };

    let mut names = vec![SERVER_NAME.to_string(), "localhost".to_string()];
    names.extend(cfg.server_names.iter().cloned());
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    for a in [cfg.grpc_addr, cfg.admin_addr] {
        if !a.ip().is_unspecified() && !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    let tls = Arc::new(crate::ca::tls::ServerTls::new(
        &ca,
        crate::ca::tls::ServerNames { dns: names, ips },
    )?);
    let rotation = Arc::new(crate::ca::rotation::Rotation {
        ca: ca.clone(),
        tls,
        registry: registry.clone(),
    });
    rotation.publish().await?;

    let proxies = Arc::new(ProxyTable::default());
    let stats = Arc::new(CaStats::default());

    let quotas = Arc::new(crate::discovery::quota::Quotas::new(registry.clone()));
    let discovery = pb::discovery_server::DiscoveryServer::new(DiscoveryService {
        registry: registry.clone(),
        proxies: proxies.clone(),
        quotas: quotas.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    // Singleton work: one replica at a time, by etcd election on etcd, by a Lease on Kubernetes.
    let leader = match (etcd_leader, &kube) {
        (Some(l), _) => l,
        (None, Some(client)) => crate::replicas::leader::Leadership::kubernetes(
            client.clone(),
            &cfg.namespace,
            LEASE_NAME.to_string(),
            cfg.replica_id.clone(),
            cfg.leader_lease,
        ),
        (None, None) => crate::replicas::leader::Leadership::always(),
    };
    let identity_svc = pb::identity_server::IdentityServer::new(IdentityService {
        ca: ca.clone(),
        registry: registry.clone(),
        stats: stats.clone(),
        kube: kube.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let telemetry = Arc::new(crate::observe::telemetry::TelemetryStore::default());
    let tap = Arc::new(crate::observe::tap::TapHub::default());
    let telemetry_svc =
        pb::telemetry_server::TelemetryServer::new(crate::observe::telemetry::TelemetryService {
            store: telemetry.clone(),
            tap: tap.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let local = Arc::new(crate::replicas::view::Local {
        replica: cfg.replica_id.clone(),
        proxies: proxies.clone(),
        telemetry: telemetry.clone(),
        tap: tap.clone(),
        quotas: quotas.clone(),
    });
    let view = Arc::new(crate::replicas::view::MeshView {
        local: local.clone(),
        peers: registry.shared().then(|| {
            Arc::new(crate::replicas::peers::Peers::new(
                registry.clone(),
                ca.clone(),
                cfg.replica_id.clone(),
                cfg.endpoint_lease,
            ))
        }),
    });
    if let Some(peers) = &view.peers {
        tokio::spawn(quotas.clone().follow_peers(peers.clone()));
    }
    let replicas_svc =
        pb::replicas_server::ReplicasServer::new(crate::replicas::peers::ReplicaService {
            local,
            allowed: ca.control_plane_identity()?,
        });
    tokio::spawn(crate::rollout::run(
        registry.clone(),
        view.clone(),
        leader.clone(),
    ));
    tokio::spawn(crate::api::admin::externals::refresh_externals(
        registry.clone(),
        leader.clone(),
    ));
    if let Some(client) = &kube {
        tokio::spawn(crate::k8s::run(client.clone(), registry.clone()));
        use crate::k8s::objects::{Authorizations, Policies, Routes, sync};
        tokio::spawn(sync::<Routes>(
            client.clone(),
            registry.clone(),
            leader.clone(),
            proxies.clone(),
        ));
        tokio::spawn(sync::<Policies>(
            client.clone(),
            registry.clone(),
            leader.clone(),
            proxies.clone(),
        ));
        tokio::spawn(sync::<Authorizations>(
            client.clone(),
            registry.clone(),
            leader.clone(),
            proxies.clone(),
        ));
        let mut inject = cfg.inject.clone();
        inject.trust_domain = cfg.trust_domain.clone();
        tokio::spawn(crate::k8s::gateway::sync(
            client.clone(),
            registry.clone(),
            leader.clone(),
            Arc::new(inject),
        ));
        tokio::spawn(crate::k8s::externals::sync(
            client.clone(),
            registry.clone(),
            leader.clone(),
        ));
        tokio::spawn(crate::k8s::publish_bundle(
            client.clone(),
            registry.clone(),
            cfg.inject.ca_config_map.clone(),
        ));
        if cfg.webhook_addr.is_some() {
            tokio::spawn(crate::k8s::sync_webhook_ca(
                client.clone(),
                registry.clone(),
                cfg.webhook_configuration.clone(),
            ));
        }
    }
    // The dashboard is open on loopback only; elsewhere it asks for a read credential.
    let web_token: Arc<str> = token.as_str().into();
    let web = Arc::new(crate::api::web::Web {
        metrics: crate::observe::metrics::registry(
            proxies.clone(),
            stats.clone(),
            registry.clone(),
            leader.clone(),
        ),
        dashboard: crate::api::dashboard::Dashboard {
            registry: registry.clone(),
            view: view.clone(),
        },
        dashboard_auth: (!cfg.http_addr.ip().is_loopback()).then_some(web_token),
    });
    let admin = pb::admin_server::AdminServer::new(AdminService {
        registry: registry.clone(),
        proxies: proxies.clone(),
        view,
        rotation: rotation.clone(),
    });
    // On Kubernetes, callers may also present their own Kubernetes token (`kube_auth`).
    let kube_auth = kube
        .clone()
        .map(|c| Arc::new(crate::api::admin::kube_auth::KubeAuth::new(c)));
    let auth = AdminAuth::layer(registry.clone(), &token, kube_auth);

    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("bind {}", cfg.grpc_addr))?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("bind {}", cfg.admin_addr))?;
    let (grpc_local, admin_local) = (grpc_listener.local_addr()?, admin_listener.local_addr()?);
    let http_listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("bind {}", cfg.http_addr))?;
    let http_local = http_listener.local_addr()?;
    let advertise = match &cfg.advertise_addr {
        Some(a) => a.clone(),
        None if !grpc_local.ip().is_unspecified() => grpc_local.to_string(),
        None => {
            if registry.shared() {
                tracing::warn!(grpc = %grpc_local, "no --advertise-addr: the other replicas cannot reach this one, so their top, tap, proxies and canary gates leave its proxies out");
            }
            String::new()
        }
    };
    tokio::spawn(crate::replicas::lease::run(
        registry.clone(),
        proxies,
        cfg.endpoint_lease,
        cfg.replica_id.clone(),
        advertise,
        leader.clone(),
    ));
    let webhook_listener = match cfg.webhook_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("bind {a}"))?,
        ),
        None => None,
    };
    let webhook_local = webhook_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(web.serve(http_listener, stop_rx.clone()));
    if let Some(l) = webhook_listener {
        let mut inject = cfg.inject.clone();
        inject.trust_domain = cfg.trust_domain.clone();
        tokio::spawn(crate::k8s::webhook::serve(
            crate::ca::tls::incoming(l, rotation.tls.webhook.clone()),
            Arc::new(inject),
            stop_rx.clone(),
        ));
    }
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(discovery)
        .add_service(identity_svc)
        .add_service(telemetry_svc)
        .add_service(replicas_svc)
        .serve_with_incoming_shutdown(
            crate::ca::tls::incoming(grpc_listener, rotation.tls.grpc.clone()),
            wait(stop_rx.clone()),
        );
    let admin = Server::builder()
        .layer(tower::layer::layer_fn(crate::observe::trace::Traced))
        .layer(auth)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            crate::ca::tls::incoming(admin_listener, rotation.tls.admin.clone()),
            wait(stop_rx),
        );

    tracing::info!(grpc = %grpc_local, admin = %admin_local, http = %http_local, webhook = ?webhook_local, data_dir = %cfg.data_dir.display(), trust_domain = %cfg.trust_domain, "control plane listening");
    let mut ready = serde_json::json!({"event": "listening", "grpc": grpc_local.to_string(), "admin": admin_local.to_string(), "http": http_local.to_string()});
    if let Some(w) = webhook_local {
        ready["webhook"] = w.to_string().into();
    }
    println!("{ready}");
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (a, b) = tokio::join!(grpc, admin);
    a?;
    b?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT: the control plane then stops serving and exits.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}
