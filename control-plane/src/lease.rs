//! Endpoint leases: an endpoint its proxy registered lives while that proxy is connected (its
//! discovery stream is open). Once the proxy has been gone longer than the lease — a lost
//! machine, a SIGKILLed process — the endpoint is removed, so callers stop trying it. A
//! proxy that reconnects within the lease (a control-plane restart, a network blip) keeps it.

use crate::discovery::ProxyTable;
use crate::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Removes endpoints whose proxies stayed away longer than `lease`; runs until the process ends.
pub async fn run(registry: Arc<Registry>, proxies: Arc<ProxyTable>, lease: Duration) {
    let mut tick = tokio::time::interval(
        (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when each leased endpoint's proxy has been missing (from our start at the latest).
    let mut missing: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let connected: HashSet<String> =
            proxies.proxies.iter().map(|p| p.node_id.clone()).collect();
        let state = registry.state();
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
