//! The proxy side of the discovery stream: subscribe, apply each response atomically into a new
//! snapshot (or NACK it and keep the last good one), reconnect with backoff.

use super::{ALL_SERVICES, EGRESS_RESOURCE, SERVICE_PREFIX, TRUST_RESOURCE, convert};
use crate::bootstrap::Bootstrap;
use crate::identity::control_plane::ControlPlane;
use crate::snapshot::{Service, Snapshot, Snapshots};
use crate::tls::{Bundle, TlsContext};
use mesh_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Owns the stream; runs until the process exits.
pub struct DiscoveryClient {
    pub bootstrap: Arc<Bootstrap>,
    pub control_plane: Arc<ControlPlane>,
    pub snapshots: Arc<Snapshots>,
    pub subscribe_rx: mpsc::UnboundedReceiver<Arc<str>>,
    /// The root of the installed certificate (None until there is one): reported to the
    /// control plane, which tracks root rotations by it.
    pub cert: watch::Receiver<Option<Arc<str>>>,
    /// Where a pushed trust bundle goes.
    pub tls: Arc<TlsContext>,
    /// Asks the identity manager to renew at once.
    pub renew: Arc<tokio::sync::Notify>,
    /// Peer connections, which the policy stacks built for each applied service send on.
    pub pool: Arc<crate::outbound::pool::Pool>,
}

fn resource_name(service: &str) -> String {
    format!("{SERVICE_PREFIX}{service}")
}

impl DiscoveryClient {
    pub async fn run(mut self) {
        let _ = self.cert.wait_for(|c| c.is_some()).await;
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            match self.session().await {
                Ok(()) => tracing::info!("discovery stream closed by the control plane"),
                Err(e) => {
                    tracing::warn!(error = %e, "discovery stream failed; serving the last good config")
                }
            }
            // A stream that lived a while resets the backoff.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, until it ends.
    async fn session(&mut self) -> Result<(), String> {
        let mut client = self
            .control_plane
            .discovery_client()
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<pb::DiscoveryRequest>(64);
        let first = pb::DiscoveryRequest {
            node: Some(pb::Node {
                id: self.bootstrap.node_id.clone(),
                service: self.bootstrap.service.clone().unwrap_or_default(),
                version_label: self.bootstrap.version_label.clone().unwrap_or_default(),
                proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            subscribe: [TRUST_RESOURCE.to_string(), EGRESS_RESOURCE.to_string()]
                .into_iter()
                .chain(self.bootstrap.transparent.then(|| ALL_SERVICES.to_string()))
                .chain(
                    self.snapshots
                        .subscriptions()
                        .iter()
                        .map(|s| resource_name(s)),
                )
                .collect(),
            cert_signer: self.current_signer(),
            ..Default::default()
        };
        tx.send(first).await.map_err(|e| e.to_string())?;
        let mut responses = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        tracing::info!("discovery stream open");
        loop {
            tokio::select! {
                name = self.subscribe_rx.recv() => {
                    let Some(name) = name else { return Ok(()) };
                    let req = pb::DiscoveryRequest { subscribe: vec![resource_name(&name)], ..Default::default() };
                    tx.send(req).await.map_err(|e| e.to_string())?;
                }
                r = self.cert.changed() => {
                    if r.is_err() { return Ok(()) }
                    let req = pb::DiscoveryRequest { cert_signer: self.current_signer(), ..Default::default() };
                    tx.send(req).await.map_err(|e| e.to_string())?;
                }
                msg = responses.message() => {
                    let Some(resp) = msg.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? else { return Ok(()) };
                    let nonce = resp.nonce.clone();
                    let error_detail = match self.apply(resp) {
                        Ok(()) => String::new(),
                        Err(e) => {
                            tracing::warn!(error = %e, "config NACKed; keeping the last good one");
                            e
                        }
                    };
                    tx.send(pb::DiscoveryRequest { response_nonce: nonce, error_detail, ..Default::default() })
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }

    fn current_signer(&mut self) -> String {
        self.cert
            .borrow_and_update()
            .as_deref()
            .unwrap_or_default()
            .to_string()
    }

    /// Builds the next snapshot from the current one plus this response, all or nothing.
    fn apply(&self, resp: pb::DiscoveryResponse) -> Result<(), String> {
        let mut updates = HashMap::new();
        let mut trust = None;
        let cur = self.snapshots.load();
        let mut registry_only = cur.registry_only;
        if resp.removed.iter().any(|n| n == EGRESS_RESOURCE) {
            registry_only = false;
        }
        for r in resp.resources {
            if let Some(pb::resource::Kind::Egress(e)) = &r.kind {
                registry_only = match e.mode.as_str() {
                    "registry-only" => true,
                    "allow-any" | "" => false,
                    other => return Err(format!("unknown egress mode {other:?}")),
                };
                continue;
            }
            if let Some(pb::resource::Kind::Trust(t)) = r.kind {
                let bundle =
                    Bundle::from_pem(&t.bundle_pem).map_err(|e| format!("trust bundle: {e}"))?;
                trust = Some((bundle, t.signer));
                continue;
            }
            let (name, cfg, version) = convert::resource(r).map_err(|e| e.to_string())?;
            let Some(svc_name) = name.strip_prefix(SERVICE_PREFIX) else {
                return Err(format!("unknown resource kind {name:?}"));
            };
            updates.insert(Arc::<str>::from(svc_name), (cfg, version));
        }
        let mut services = cur.services.clone();
        let mut missing = cur.missing.clone();
        for name in &resp.removed {
            if let Some(n) = name.strip_prefix(SERVICE_PREFIX) {
                services.remove(n);
                missing.insert(n.into());
            }
        }
        // The whole config converted and checked: now the runtime, once, from it.
        for (name, (cfg, version)) in updates {
            let old = cur.services.get(&name).map(Arc::as_ref);
            let svc = Arc::new(Service::build(cfg, version, old, &self.pool));
            missing.remove(&name);
            tracing::info!(service = %name, version = svc.version, endpoints = svc.endpoints.len(), "service updated");
            services.insert(name, svc);
        }
        self.snapshots.store(Snapshot {
            version: resp.version,
            app_addrs: crate::snapshot::app_addrs(&services),
            services,
            missing,
            synced: true,
            registry_only,
        });
        if registry_only != cur.registry_only {
            tracing::info!(registry_only, "egress mode changed");
        }
        if let Some((bundle, signer)) = trust {
            tracing::info!(roots = bundle.anchors.len(), %signer, "trust bundle updated");
            self.tls.set_bundle(bundle);
            // A certificate from another root than the signing one is renewed at once, so a
            // rotation's overlap ends as soon as every proxy has renewed.
            if self.tls.leaf().is_some_and(|l| *l.signer != *signer) {
                self.renew.notify_one();
            }
        }
        Ok(())
    }
}
