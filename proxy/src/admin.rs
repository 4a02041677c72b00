//! The admin port: `/live`, `/ready` (certificate and first config applied), `/metrics`
//! (Prometheus text), `/config_dump`, and the app's rewritten probes (`/app-health/…`,
//! `app_probe`).

use crate::http::{Body, full};
use crate::snapshot::Snapshots;
use crate::tls::TlsContext;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;

pub struct Admin {
    /// Encodes the proxy's counters at each scrape (`telemetry::metrics`).
    pub metrics: prometheus_client::registry::Registry,
    /// Peer connections (their count is in /config_dump).
    pub pool: Arc<crate::outbound::pool::Pool>,
    pub tls: Arc<TlsContext>,
    pub snapshots: Arc<Snapshots>,
    pub identity: Arc<str>,
    pub node_id: String,
    /// Readiness (`/ready`) and drain.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// The kubelet's rewritten probes of the app (`/app-health/…`).
    pub app_probes: crate::app_probe::AppProbes,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path();
        if path.starts_with(crate::app_probe::PREFIX) {
            return Ok(match self.app_probes.run(path).await {
                Some(Ok(())) => text(StatusCode::OK, "app healthy\n"),
                Some(Err(why)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app probe failed: {why}\n"),
                ),
                None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
            });
        }
        Ok(match path {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                let pending = self.lifecycle.pending();
                if pending.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    // Everything still pending, so one look says what the proxy waits for.
                    let why: Vec<&str> = pending.iter().map(|p| p.reason()).collect();
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", why.join("; ")),
                    )
                }
            }
            "/metrics" => match crate::telemetry::scrape::encode(&self.metrics) {
                Ok(body) => {
                    let mut r = Response::new(full(body));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                ),
            },
            "/config_dump" => {
                let mut r = Response::new(full(self.config_dump().to_string()));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live, /ready, /metrics, /config_dump\n",
            ),
        })
    }

    /// The proxy's dynamic state as JSON (no keys).
    pub fn config_dump(&self) -> serde_json::Value {
        let snap = self.snapshots.load();
        let now = crate::balance::state::Now::get();
        let mut services: Vec<_> = snap
            .services
            .values()
            .map(|s| {
                let budget = |s: &crate::snapshot::Service| {
                    let (q, r) = s.state.budget.usage();
                    json!({"requests_10s": q, "retries_10s": r})
                };
                json!({
                    "name": &*s.name,
                    "namespace": &*s.namespace,
                    "identity": &*s.identity,
                    "version": s.version,
                    "endpoints": s.endpoints.iter().map(|e| json!({
                        "id": &*e.id, "address": e.addr.to_string(), "version": e.version.as_deref(), "ready": e.ready,
                    })).collect::<Vec<_>>(),
                    "route": s.backends.iter().map(|(v, w)| json!({"version": &**v, "weight": w})).collect::<Vec<_>>(),
                    "mirror": s.mirror.as_ref().map(|m| &*m.version),
                    "vips": s.vips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    "vip_ports": s.vip_ports.iter().map(|(p, t)| json!({"port": p, "target_port": t})).collect::<Vec<_>>(),
                    "app_protocols": s.app_protocols.iter().map(|(p, a)| json!({"port": p, "protocol": a.as_str()})).collect::<Vec<_>>(),
                    "rules": s.router.rules.iter().map(|r| json!({
                        "name": &*r.name,
                        "backends": r.backends.iter().map(|(v, w)| json!({"version": &**v, "weight": w})).collect::<Vec<_>>(),
                        "policy": r.policy.as_ref().map(|p| format!("{p:?}")),
                    })).collect::<Vec<_>>(),
                    "schedule": s.balancer.shares().iter().map(|(v, n)| json!({"version": v.as_deref(), "slots": n})).collect::<Vec<_>>(),
                    "balancer": s.balancer.states().map(|(e, st)| json!({
                        "id": &*e.id,
                        "in_flight": st.in_flight(),
                        "ewma_ms": st.ewma(now) / 1e6,
                        "ejected": st.is_ejected(now),
                        "probation": st.on_probation(),
                    })).collect::<Vec<_>>(),
                    "policy": format!("{:?}", s.policy),
                    "mtls_permissive": s.mtls_permissive,
                    "authz": s.authz.as_ref().map(|a| json!({
                        "name": a.name,
                        "rules": a.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
                        "audit": a.audit,
                        "default": a.default.as_str(),
                    })),
                    "retry_budget": budget(s),
                    "global_shares": s.state.global.as_ref().map(|g| g.granted().into_iter().map(|(caller, rate)| json!({"caller": caller, "per_second": rate})).collect::<Vec<_>>()),
                    "adaptive_limit": s.state.adaptive.as_ref().map(|a| json!({"limit": a.limit(), "min_rtt_ms": a.min_rtt().map(|d| d.as_secs_f64() * 1e3), "shed": a.shed()})),
                })
            })
            .collect();
        services.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut missing: Vec<&str> = snap.missing.iter().map(|s| &**s).collect();
        missing.sort();
        let leaf = self.tls.leaf();
        json!({
            "node_id": self.node_id,
            "identity": &*self.identity,
            "config_version": snap.version,
            "synced": snap.synced,
            "certificate": leaf.map(|l| json!({
                "expires_at_unix": l.expires_at,
                "signer": &*l.signer,
                "public_key": crate::tls::public_key_hex(&l.chain_pem),
            })),
            "trust_roots": self.tls.bundle().anchors.len(),
            "services": services,
            "unknown_services": missing,
            "peer_connections": self.pool.len(),
            "tapped_services": crate::telemetry::tap::tap().services(),
        })
    }
}
