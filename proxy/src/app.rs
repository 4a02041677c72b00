//! Wiring only: listeners, background tasks, readiness, registration, drain.

use crate::admin::Admin;
use crate::bootstrap::Bootstrap;
use crate::discovery::DiscoveryClient;
use crate::http::server::{accept_loop, serve};
use crate::identity::IdentityManager;
use crate::identity::control_plane::ControlPlane;
use crate::inbound::Inbound;
use crate::lifecycle::Lifecycle;
use crate::outbound::{Outbound, pool::Pool};
use crate::snapshot::Snapshots;
use crate::telemetry::metrics::{ConnGuard, ConnKind};
use crate::tls::TlsContext;
use anyhow::Context;
use mesh_proto::v1 as pb;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

const REGISTER_RETRY_MAX: Duration = Duration::from_secs(10);
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} listener on {addr}"))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
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

/// Runs the proxy until SIGTERM/SIGINT, then drains. Prints one JSON line on stdout when ready:
/// `{"event":"ready","outbound":…,"inbound":…,"admin":…,"identity":…}`.
pub async fn run(b: Bootstrap) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = Arc::new(b);
    crate::http::server::set_limits(b.limits);
    if let Some(t) = &b.access_log {
        crate::telemetry::access_log::start(t, b.access_log_redact_query)
            .with_context(|| format!("--access-log {t:?}"))?;
    }
    let tls = Arc::new(TlsContext::new(&b.ca_pem).context("--ca-file")?);
    if let Some(o) = &b.otlp {
        crate::telemetry::trace::start(o, b.trace_sampling, &b.node_id, &b.identity, &b.namespace)
            .with_context(|| format!("OTLP exporter to {}", o.endpoint))?;
    }
    let (snapshots, subscribe_rx) = Snapshots::new();
    let identity: Arc<str> = b.identity.as_str().into();
    crate::telemetry::metrics::metrics().set_local(crate::telemetry::metrics::Local {
        identity: identity.clone(),
        service: b.service.as_deref().unwrap_or("").into(),
        version: b.version_label.as_deref().unwrap_or("").into(),
    });

    // Bind everything first: a port conflict fails fast, before any control-plane traffic.
    let admin_l = bind(b.admin_addr, "admin").await?;
    let outbound_l = bind(b.outbound_addr, "outbound").await?;
    let inbound_l = match b.app_port {
        Some(_) => Some(bind(b.inbound_addr, "inbound").await?),
        None => None,
    };
    let gateway_ls = match &b.gateway {
        Some(g) => Some(crate::gateway::Listeners::bind(g).await?),
        None => None,
    };
    let gateway_https = gateway_ls
        .as_ref()
        .and_then(|g| g.https.as_ref())
        .map(|(l, _)| l.local_addr())
        .transpose()?;
    let gateway_http = gateway_ls
        .as_ref()
        .and_then(|g| g.http.as_ref())
        .map(|l| l.local_addr())
        .transpose()?;
    let mut upstream_ls = Vec::new();
    for (name, addr) in &b.upstreams {
        upstream_ls.push((
            Arc::<str>::from(name.as_str()),
            bind(*addr, "upstream").await?,
        ));
        snapshots
            .subscribe(name)
            .map_err(|e| anyhow::anyhow!("--upstream {name}: {e}"))?;
    }
    // The proxy's own service: its policy carries the inbound rate limits.
    if let Some(name) = &b.service {
        snapshots
            .subscribe(name)
            .map_err(|e| anyhow::anyhow!("--service {name}: {e}"))?;
    }
    let admin_addr = admin_l.local_addr()?;
    let outbound_addr = outbound_l.local_addr()?;
    let inbound_addr = inbound_l.as_ref().map(|l| l.local_addr()).transpose()?;

    let (cert_tx, cert_rx) = watch::channel(None);
    let lifecycle = Arc::new(Lifecycle::new(
        tls.clone(),
        snapshots.clone(),
        b.app_port.and(b.service.as_deref()).map(Arc::from),
        cert_rx.clone(),
    ));
    let mut loops = Vec::new();

    let pool = Arc::new(Pool::new(tls.clone()));
    let admin = Arc::new(Admin {
        metrics: crate::telemetry::scrape::registry(snapshots.clone(), pool.clone()),
        pool: pool.clone(),
        tls: tls.clone(),
        snapshots: snapshots.clone(),
        identity: identity.clone(),
        node_id: b.node_id.clone(),
        lifecycle: lifecycle.clone(),
        app_probes: b.app_probes.clone(),
    });
    {
        let admin = admin.clone();
        loops.push(tokio::spawn(accept_loop(
            admin_l,
            lifecycle.clone(),
            move |s, _, w| {
                let admin = admin.clone();
                async move {
                    serve(
                        s,
                        hyper::service::service_fn(move |r| admin.clone().handle(r)),
                        crate::http::server::Client::App,
                        w,
                    )
                    .await
                }
            },
        )));
    }

    let control_plane = Arc::new(ControlPlane::new(b.clone(), tls.clone()));
    let renew = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(
        IdentityManager {
            bootstrap: b.clone(),
            tls: tls.clone(),
            control_plane: control_plane.clone(),
            cert: cert_tx,
            renew: renew.clone(),
        }
        .run(),
    );
    tokio::spawn(
        DiscoveryClient {
            bootstrap: b.clone(),
            control_plane: control_plane.clone(),
            snapshots: snapshots.clone(),
            subscribe_rx,
            cert: cert_rx.clone(),
            tls: tls.clone(),
            renew,
            pool: pool.clone(),
        }
        .run(),
    );

    if let Some(service) = &b.service {
        // Demand and shares of the service's global rate limits (idle without one).
        tokio::spawn(
            crate::policy::global::QuotaReporter {
                snapshots: snapshots.clone(),
                control_plane: control_plane.clone(),
                node_id: b.node_id.clone(),
                service: service.as_str().into(),
            }
            .run(),
        );
    }
    tokio::spawn(
        crate::telemetry::TelemetryReporter {
            snapshots: snapshots.clone(),
            control_plane: control_plane.clone(),
            tls: tls.clone(),
            node_id: b.node_id.clone(),
            interval: b.telemetry_interval,
        }
        .run(),
    );
    let outbound = Arc::new(Outbound {
        snapshots: snapshots.clone(),
        pool,
        mirrors: Arc::new(tokio::sync::Semaphore::new(
            crate::outbound::MAX_MIRRORS_IN_FLIGHT,
        )),
        ports: crate::outbound::transparent::PortKinds::new(&b.opaque_ports),
        namespace: b.namespace.as_str().into(),
    });
    tokio::spawn(prune_pool(outbound.clone()));
    let o = outbound.clone();
    tokio::spawn(every(SWEEP_INTERVAL, move || o.pool.sweep()));
    let transparent = b.transparent;
    let serve_outbound = |l: TcpListener, fixed: Option<Arc<str>>| {
        let outbound = outbound.clone();
        accept_loop(l, lifecycle.clone(), move |s, _, w| {
            let (outbound, fixed) = (outbound.clone(), fixed.clone());
            async move {
                let _open = ConnGuard::new(ConnKind::OutboundApp);
                if let Some(orig) = transparent
                    .then(|| crate::outbound::transparent::original_dst(&s))
                    .flatten()
                {
                    crate::outbound::transparent::handle(outbound, s, orig, w).await;
                    return;
                }
                serve(
                    s,
                    hyper::service::service_fn(move |r| outbound.clone().handle(fixed.clone(), r)),
                    crate::http::server::Client::App,
                    w,
                )
                .await
            }
        })
    };
    loops.push(tokio::spawn(serve_outbound(outbound_l, None)));
    if let (Some(g), Some(service)) = (gateway_ls, &b.service) {
        loops.extend(g.serve(outbound.clone(), service.as_str().into(), lifecycle.clone())?);
    }
    for (name, l) in upstream_ls {
        loops.push(tokio::spawn(serve_outbound(l, Some(name))));
    }
    if let (Some(l), Some(port)) = (inbound_l, b.app_port) {
        let inbound = Arc::new(Inbound::new(crate::inbound::InboundConfig {
            tls: tls.clone(),
            identity: identity.clone(),
            app: SocketAddr::from(([127, 0, 0, 1], port)),
            snapshots: snapshots.clone(),
            service: b.service.as_deref().map(Arc::from),
            own_ports: vec![
                outbound_addr.port(),
                admin_addr.port(),
                b.inbound_addr.port(),
            ],
            app_protocol: b.app_protocol,
            stop: lifecycle.closing(),
        }));
        let i = inbound.clone();
        tokio::spawn(every(crate::inbound::APP_SWEEP_INTERVAL, move || i.sweep()));
        loops.push(tokio::spawn(accept_loop(
            l,
            lifecycle.clone(),
            move |s, peer, w| inbound.clone().accept(s, peer, w),
        )));
    }

    // Started = certificate + first config (`Lifecycle::started`). Listeners already accept:
    // until then outbound requests wait (bounded) for discovery and inbound handshakes fail
    // for want of a certificate.
    tokio::select! {
        () = lifecycle.started() => {}
        _ = shutdown_signal() => return Ok(()),
    }

    let registration = register(&b, inbound_addr, &control_plane).map(|f| tokio::spawn(f));
    tracing::info!(identity = %identity, %outbound_addr, ?inbound_addr, %admin_addr, "proxy ready");
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "identity": &*identity,
            "outbound": outbound_addr.to_string(),
            "inbound": inbound_addr.map(|a| a.to_string()),
            "admin": admin_addr.to_string(),
            "gateway_https": gateway_https.map(|a| a.to_string()),
            "gateway_http": gateway_http.map(|a| a.to_string()),
        })
    );

    shutdown_signal().await;
    tracing::info!(
        "shutting down: deregistering, then draining for up to {:?}",
        b.drain_timeout
    );
    lifecycle.start_drain();
    if let Some(task) = registration {
        task.abort();
        deregister(&b, inbound_addr, &control_plane).await;
        // Callers drop this endpoint when the removal reaches them (milliseconds); until then
        // their requests still arrive and are served.
        tokio::time::sleep(b.drain_grace).await;
    }
    lifecycle.stop_listening();
    for l in loops {
        let _ = l.await;
    }
    if lifecycle.finish_drain(b.drain_timeout).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    Ok(())
}

/// Keeps the connection pool to the endpoints of the current config.
async fn prune_pool(outbound: Arc<Outbound>) {
    let mut changes = outbound.snapshots.watch();
    while changes.changed().await.is_ok() {
        let snap = outbound.snapshots.load();
        let live = snap
            .services
            .values()
            .flat_map(|s| s.endpoints.iter().map(|e| (e.addr, s.identity.clone())))
            .collect();
        outbound.pool.retain(&live);
    }
}

/// How often idle connections to peer sidecars are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs `f` every `period`: the idle sweeps of the peer pool and of the app connections.
async fn every(period: Duration, f: impl Fn()) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        f();
    }
}

/// The endpoint this proxy registers for its app, if it fronts a service: at the advertised
/// address, else the address the inbound listener is bound to.
fn own_endpoint(b: &Bootstrap, inbound: Option<SocketAddr>) -> Option<(String, pb::Endpoint)> {
    let (service, app_port, addr) = (
        b.service.clone()?,
        b.app_port?,
        b.advertise_addr.or(inbound)?,
    );
    let mut labels = std::collections::HashMap::new();
    if let Some(v) = &b.version_label {
        labels.insert("version".to_string(), v.clone());
    }
    Some((
        service,
        pb::Endpoint {
            id: b.node_id.clone(),
            address: addr.to_string(),
            labels,
            ready: true,
            app_port: app_port.into(),
            identity: String::new(),
        },
    ))
}

/// Registers the app's endpoint, retrying until the control plane takes it (it may be starting
/// or away). With a health check, the endpoint is registered as the first check found the app,
/// then registered again whenever its health changes.
fn register(
    b: &Bootstrap,
    inbound: Option<SocketAddr>,
    cp: &Arc<ControlPlane>,
) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>> {
    if b.gateway.is_some() {
        // A gateway declares its service; it has no endpoint.
        let (cp, service) = (cp.clone(), b.service.clone()?);
        return Some(Box::pin(
            async move { register_once(&cp, &service, None).await },
        ));
    }
    let (service, mut endpoint) = own_endpoint(b, inbound)?;
    let app = SocketAddr::from(([127, 0, 0, 1], b.app_port?));
    let health = b.app_health.clone();
    let cp = cp.clone();
    Some(Box::pin(async move {
        let Some(h) = health else {
            register_once(&cp, &service, Some(&endpoint)).await;
            return;
        };
        let first = crate::health::probe(&h.check, app, h.timeout).await;
        if let Err(e) = &first {
            tracing::warn!(error = %e, "app health check failed; registering as not ready");
        }
        let mut status = crate::health::Status::new(first.is_ok(), h.failures);
        endpoint.ready = status.healthy();
        register_once(&cp, &service, Some(&endpoint)).await;
        let mut tick = tokio::time::interval(h.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let r = crate::health::probe(&h.check, app, h.timeout).await;
            if let Some(healthy) = status.observe(r.is_ok()) {
                match &r {
                    Ok(()) => tracing::info!(%service, "app healthy again; endpoint ready"),
                    Err(e) => {
                        tracing::warn!(%service, error = %e, "app unhealthy; endpoint not ready")
                    }
                }
                endpoint.ready = healthy;
                register_once(&cp, &service, Some(&endpoint)).await;
            }
        }
    }))
}

/// One registration, retried with backoff until the control plane takes it.
/// Without an endpoint: a gateway declaring its service.
async fn register_once(cp: &ControlPlane, service: &str, endpoint: Option<&pb::Endpoint>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let res = match cp.discovery_client().await {
            Ok(mut c) => c
                .register(pb::RegisterRequest {
                    service: service.to_string(),
                    endpoint: endpoint.cloned(),
                    gateway: endpoint.is_none(),
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(()) => {
                match endpoint {
                    Some(e) => {
                        tracing::info!(%service, address = %e.address, ready = e.ready, "endpoint registered")
                    }
                    None => tracing::info!(%service, "gateway service declared"),
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "endpoint registration failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(REGISTER_RETRY_MAX);
    }
}

async fn deregister(b: &Bootstrap, inbound: Option<SocketAddr>, cp: &ControlPlane) {
    let Some((service, endpoint)) = own_endpoint(b, inbound) else {
        return;
    };
    let call = async {
        let mut c = cp.discovery_client().await.map_err(|e| e.to_string())?;
        c.deregister(pb::DeregisterRequest {
            service,
            endpoint_id: endpoint.id,
        })
        .await
        .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(DEREGISTER_TIMEOUT, call).await {
        Ok(Ok(_)) => tracing::info!("endpoint deregistered"),
        Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed"),
        Err(_) => tracing::warn!("deregistration timed out"),
    }
}
