//! The dashboard: one self-contained page (`index.html`, no external assets) served by the
//! control plane's HTTP port, polling `/api/dashboard` for the live topology (nodes = service
//! versions, edges = traffic from the proxies' telemetry), golden metrics per service version,
//! connected proxies and canaries.

use crate::observe::telemetry::{Window, now_ms};
use crate::replicas::view::MeshView;
use crate::state::registry::Registry;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The page.
pub const INDEX_HTML: &str = include_str!("index.html");

/// Window the dashboard's figures cover, seconds.
pub const WINDOW_SECS: u32 = 10;

/// What the dashboard reads.
pub struct Dashboard {
    pub registry: Arc<Registry>,
    /// Every replica's proxies and telemetry.
    pub view: Arc<MeshView>,
}

fn node_id(service: &str, version: &str) -> String {
    if version.is_empty() {
        service.to_string()
    } else {
        format!("{service} {version}")
    }
}

fn figures(w: &Window) -> Value {
    json!({
        "requests": w.requests,
        "rps": w.requests as f64 / f64::from(WINDOW_SECS),
        "success_percent": 100.0 - w.error_percent(),
        "p50_ms": w.quantile_ms(50),
        "p99_ms": w.p99_ms(),
    })
}

impl Dashboard {
    /// Everything the page shows, now, from every replica.
    pub async fn snapshot(&self) -> Value {
        let since = now_ms() - i64::from(WINDOW_SECS) * 1000;
        let (edges, mut unreachable) = self.view.edges(since, None).await;
        let (proxies, missing) = self.view.proxies().await;
        unreachable.extend(missing);
        unreachable.sort();
        unreachable.dedup();
        let state = self.registry.state();
        let mut nodes: BTreeSet<(String, String)> = BTreeSet::new();
        for (svc, eps) in &state.endpoints {
            for e in eps.values() {
                let v = e.labels.get("version").cloned().unwrap_or_default();
                nodes.insert((svc.clone(), v));
            }
        }
        let services: Vec<Value> = edges
            .by_version()
            .into_iter()
            .map(|(svc, ver, w)| {
                let mut r = figures(&w);
                r["service"] = svc.into();
                r["version"] = ver.into();
                r
            })
            .collect();
        let edges: Vec<Value> = edges
            .iter()
            .map(|((src_svc, src_ver), svc, ver, w)| {
                nodes.insert((src_svc.clone(), src_ver.clone()));
                nodes.insert((svc.to_string(), ver.to_string()));
                let mut e = figures(w);
                e["from"] = node_id(src_svc, src_ver).into();
                e["to"] = node_id(svc, ver).into();
                e
            })
            .collect();
        let proxies: Vec<Value> = proxies
            .iter()
            .map(|p| {
                json!({
                    "node_id": p.id,
                    "identity": p.identity,
                    "service": p.service,
                    "version": p.version_label,
                    "replica": p.replica,
                    "config_version": p.acked_version,
                    "nacked_version": p.nacked_version,
                    "nack_reason": p.nack_reason,
                    "cert_expires_unix": (p.cert_expires_unix > 0).then_some(p.cert_expires_unix),
                })
            })
            .collect();
        // The page shows no step figures, so no window is fetched for them.
        let canaries: Vec<Value> = state
            .canaries
            .values()
            .map(|c| {
                let i = crate::rollout::info(c, &Window::default());
                json!({
                    "service": i.service, "from": i.from, "to": i.to, "state": i.state,
                    "weight": i.weight, "steps": i.steps, "reason": i.reason,
                })
            })
            .collect();
        json!({
            "window_seconds": WINDOW_SECS,
            "revision": state.revision,
            "nodes": nodes.iter().map(|(s, v)| json!({"id": node_id(s, v), "service": s, "version": v})).collect::<Vec<_>>(),
            "edges": edges,
            "services": services,
            "proxies": proxies,
            "canaries": canaries,
            "unreachable_replicas": unreachable,
        })
    }
}
