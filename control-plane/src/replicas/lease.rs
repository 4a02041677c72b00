//! Endpoint leases: an endpoint its proxy registered lives while that proxy is connected (its
//! discovery stream is open). Once the proxy has been gone longer than the lease — a lost
//! machine, a SIGKILLed process — the endpoint is removed, so callers stop trying it. A
//! proxy that reconnects within the lease (a control-plane restart, a network blip) keeps it.
//!
//! With several replicas on a shared store, a proxy is connected to one of them: each replica
//! publishes which proxies it holds (`presence/<replica>`, refreshed a few times per lease),
//! and the sweeper runs on the leader only, counting a proxy present on any live replica.

use crate::discovery::ProxyTable;
use crate::replicas::leader::Leadership;
use crate::state::records::PresenceRecord;
use crate::state::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Removes endpoints whose proxies stayed away longer than `lease`; runs until the process ends.
/// `replica` names this control plane in the presence records of a shared store, `address`
/// is where the other replicas reach it.
pub async fn run(
    registry: Arc<Registry>,
    proxies: Arc<ProxyTable>,
    lease: Duration,
    replica: String,
    address: String,
    leader: Leadership,
) {
    let mut tick = tokio::time::interval(
        (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when each leased endpoint's proxy has been missing (from our start at the latest).
    let mut missing: HashMap<(String, String), Instant> = HashMap::new();
    let mut published: Option<(Vec<String>, Instant)> = None;
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut local: Vec<String> = proxies.proxies.iter().map(|p| p.node_id.clone()).collect();
        local.sort();
        local.dedup();
        if registry.shared() {
            let stale = published
                .as_ref()
                .is_none_or(|(n, at)| *n != local || now.duration_since(*at) >= lease / 3);
            if stale {
                let rec = PresenceRecord {
                    nodes: local.clone(),
                    at_unix_ms: crate::observe::telemetry::now_ms(),
                    address: address.clone(),
                };
                match registry.set_presence(&replica, Some(rec)).await {
                    Ok(_) => published = Some((local.clone(), now)),
                    Err(e) => tracing::debug!(error = %e, "presence not published"),
                }
            }
        }
        if !leader.is_leader() {
            missing.clear();
            continue;
        }
        let state = registry.state();
        let fresh_after = crate::observe::telemetry::now_ms() - lease_ms;
        let mut connected: HashSet<String> = local.into_iter().collect();
        for (r, p) in &state.presence {
            if p.at_unix_ms >= fresh_after {
                connected.extend(p.nodes.iter().cloned());
            } else if p.at_unix_ms < fresh_after - lease_ms && *r != replica {
                // A replica gone for two leases: forget it.
                let _ = registry.set_presence(r, None).await;
            }
        }
        let mut seen = HashSet::new();
        for (service, eps) in &state.endpoints {
            for (id, e) in eps.iter().filter(|(_, e)| e.leased) {
                let key = (service.clone(), id.clone());
                if connected.contains(id) {
                    missing.remove(&key);
                    continue;
                }
                seen.insert(key.clone());
                let since = *missing.entry(key).or_insert(now);
                if now.duration_since(since) < lease {
                    continue;
                }
                match registry.remove_endpoint(service, id, None).await {
                    Ok(_) => {
                        tracing::warn!(%service, endpoint = %id, address = %e.address, lease_secs = lease.as_secs_f64(), "endpoint lease expired: its proxy is gone; removed")
                    }
                    Err(err) => {
                        tracing::warn!(%service, endpoint = %id, error = %err, "cannot remove an expired endpoint")
                    }
                }
            }
        }
        missing.retain(|k, _| seen.contains(k));
    }
}
