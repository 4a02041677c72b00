//! Quota leases for global rate limits. Each proxy enforcing a global limit reports, about
//! every 100 ms, how many requests asked for it; this replica divides the limit among the
//! proxies by their demand and answers each report with that proxy's share. Shares are
//! max-min fair over the demands (plus 10% headroom, so a proxy whose load grows a little is
//! not held at what it had), and the whole budget is always handed out: slack goes evenly to
//! every proxy, so a burst anywhere is admitted at once.
//!
//! Several replicas on one shared store split each limit between them by their proxies'
//! demand, which they ask each other for every [`REMOTE_EVERY`] (`mesh.v1.Replicas`); each
//! then divides its part among its own proxies. A proxy that stops reporting for [`STALE`]
//! (gone, or moved to another replica) no longer holds a share.

use crate::state::registry::Registry;
use dashmap::DashMap;
use mesh_model::policy::GlobalRate;
use mesh_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A proxy not heard from this long holds no share.
pub const STALE: Duration = Duration::from_millis(500);
/// How often replicas exchange demand.
pub const REMOTE_EVERY: Duration = Duration::from_millis(500);
/// Demand is granted with this much more, when the budget allows.
const HEADROOM: f64 = 1.1;
/// Each proxy counts as this many requests per second of demand when replicas split a limit
/// (so a replica whose proxies are idle keeps a little, and a new one is not starved).
const PRESENCE: f64 = 1.0;
/// How long a grant is good for: proxies renew it at every report; past it they keep it.
const LEASE_MS: u32 = 1000;

/// (absolute service, caller identity or "").
type Key = (String, String);

struct Demand {
    /// Requests per second, as the last report said (not smoothed: load moves between
    /// replicas within a second, as P2C shifts it, and a share must follow at once).
    rate: f64,
    seen: Instant,
}

/// The other replicas' demand (requests per second, proxies) per key, and when they said so.
type Remote = (HashMap<Key, (f64, u32)>, Option<Instant>);

/// The proxies holding shares of one limit, and the shares last computed.
#[derive(Default)]
struct Holders {
    demand: HashMap<u64, Demand>,
    shares: HashMap<u64, f64>,
    computed: Option<Instant>,
}

/// Shares are computed again at most this often per limit (not at every report: a service
/// with 1,000 replicas sends 10,000 reports a second).
const RECOMPUTE: Duration = Duration::from_millis(20);

/// The demand on every global limit this replica's proxies enforce.
pub struct Quotas {
    registry: Arc<Registry>,
    keys: DashMap<Key, Mutex<Holders>>,
    remote: Mutex<Remote>,
    next_stream: AtomicU64,
}

/// Max-min fair division of `budget` among `wants`; whatever is left over is spread evenly,
/// so the shares always add up to the budget.
pub fn water_fill(budget: f64, wants: &[f64]) -> Vec<f64> {
    let n = wants.len();
    if n == 0 {
        return Vec::new();
    }
    let total: f64 = wants.iter().sum();
    if total <= budget {
        let extra = (budget - total) / n as f64;
        return wants.iter().map(|w| w + extra).collect();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| wants[*a].total_cmp(&wants[*b]));
    let mut out = vec![0.0; n];
    let (mut left, mut remaining) = (n, budget);
    for i in order {
        let give = wants[i].min(remaining / left as f64);
        out[i] = give;
        remaining -= give;
        left -= 1;
    }
    out
}

impl Quotas {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            keys: DashMap::new(),
            remote: Mutex::new((HashMap::new(), None)),
            next_stream: AtomicU64::new(0),
        }
    }

    /// An id for a new quota stream.
    pub fn stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// The global limit of `service` as stored now.
    fn limit(&self, service: &str) -> Option<GlobalRate> {
        let st = self.registry.state();
        let rec = st.policies.get(service)?;
        mesh_model::Policy::try_from(&rec.policy).ok()?.rate_global
    }

    /// Takes one report of proxy `stream` (in namespace `ns`) and answers with its shares.
    /// A proxy may only report on services of its own namespace (the limits it enforces as
    /// one of their endpoints).
    pub fn report(&self, stream: u64, ns: &str, r: &pb::QuotaReport) -> pb::QuotaGrants {
        let now = Instant::now();
        let mut grants = Vec::new();
        for d in &r.demands {
            let service = mesh_model::service::absolute(&d.service, ns);
            if mesh_model::service::split(&service).1 != ns {
                continue;
            }
            let Some(limit) = self.limit(&service) else {
                continue;
            };
            let caller = if limit.per_caller {
                d.caller.clone()
            } else {
                String::new()
            };
            let key = (service, caller);
            let rate = d.asked as f64 * 1000.0 / f64::from(d.window_ms.max(1));
            let per_second = {
                let entry = self.keys.entry(key.clone()).or_default();
                let Ok(mut h) = entry.lock() else {
                    continue;
                };
                let joined = h
                    .demand
                    .insert(stream, Demand { rate, seen: now })
                    .is_none();
                if joined
                    || h.computed
                        .is_none_or(|at| now.duration_since(at) >= RECOMPUTE)
                {
                    self.recompute(&key, &mut h, limit, now);
                }
                h.shares.get(&stream).copied().unwrap_or(0.0)
            };
            let r = f64::from(limit.rate.per_second);
            grants.push(pb::QuotaGrant {
                service: d.service.clone(),
                caller: d.caller.clone(),
                per_second,
                burst: (f64::from(limit.rate.burst) * per_second / r).max(1.0),
                lease_ms: LEASE_MS,
            });
        }
        pb::QuotaGrants { grants }
    }

    /// Divides this replica's part of `limit` among the proxies that reported within
    /// [`STALE`].
    fn recompute(&self, key: &Key, h: &mut Holders, limit: GlobalRate, now: Instant) {
        h.demand.retain(|_, p| now.duration_since(p.seen) < STALE);
        let ids: Vec<u64> = h.demand.keys().copied().collect();
        // A proxy's demand, with headroom, and never below a tenth of an even split: one
        // whose load jumps is not held near zero until its next report.
        let r = f64::from(limit.rate.per_second);
        let floor = r / (10.0 * ids.len().max(1) as f64);
        let wants: Vec<f64> = ids
            .iter()
            .map(|id| (h.demand[id].rate * HEADROOM).max(floor))
            .collect();
        let local: f64 = h.demand.values().map(|d| d.rate).sum();
        let budget = r * self.part(key, local, ids.len());
        h.shares = ids.into_iter().zip(water_fill(budget, &wants)).collect();
        h.computed = Some(now);
    }

    /// This replica's part (0..=1) of a limit: its proxies' demand against every replica's.
    fn part(&self, key: &Key, local: f64, proxies: usize) -> f64 {
        let Ok(remote) = self.remote.lock() else {
            return 1.0;
        };
        let fresh = remote.1.is_some_and(|at| at.elapsed() < REMOTE_EVERY * 4);
        let Some((rate, n)) = remote.0.get(key).filter(|_| fresh) else {
            return 1.0;
        };
        let mine = local + PRESENCE * proxies as f64;
        let theirs = rate + PRESENCE * f64::from(*n);
        if mine + theirs <= 0.0 {
            return 1.0;
        }
        mine / (mine + theirs)
    }

    /// A quota stream ended: its proxy holds no share any more.
    pub fn gone(&self, stream: u64) {
        for e in self.keys.iter() {
            if let Ok(mut h) = e.value().lock() {
                h.demand.remove(&stream);
                h.shares.remove(&stream);
                // The others get its share at their next report.
                h.computed = None;
            }
        }
        self.keys
            .retain(|_, v| v.get_mut().map(|h| !h.demand.is_empty()).unwrap_or(false));
    }

    /// This replica's demand per key, for the other replicas.
    pub fn local_demand(&self) -> Vec<pb::ReplicaDemand> {
        let now = Instant::now();
        self.keys
            .iter()
            .filter_map(|e| {
                let h = e.value().lock().ok()?;
                let live: Vec<&Demand> = h
                    .demand
                    .values()
                    .filter(|d| now.duration_since(d.seen) < STALE)
                    .collect();
                (!live.is_empty()).then(|| pb::ReplicaDemand {
                    service: e.key().0.clone(),
                    caller: e.key().1.clone(),
                    per_second: live.iter().map(|d| d.rate).sum(),
                    proxies: live.len() as u32,
                })
            })
            .collect()
    }

    /// Keeps the other replicas' demand fresh while this replica's proxies hold shares.
    pub async fn follow_peers(self: Arc<Self>, peers: Arc<crate::replicas::peers::Peers>) {
        let mut tick = tokio::time::interval(REMOTE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.keys.is_empty() {
                continue;
            }
            let asked = peers
                .ask(|mut c| async move { c.quota_demands(pb::QuotaDemandsRequest {}).await })
                .await;
            let mut sum: HashMap<Key, (f64, u32)> = HashMap::new();
            for a in asked.answers {
                for d in a.demands {
                    let e = sum.entry((d.service, d.caller)).or_default();
                    e.0 += d.per_second;
                    e.1 += d.proxies;
                }
            }
            if let Ok(mut r) = self.remote.lock() {
                *r = (sum, Some(Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_filling_is_max_min_fair_and_hands_out_the_whole_budget() {
        let s = water_fill(1000.0, &[750.0, 450.0, 300.0]);
        assert_eq!(s, vec![350.0, 350.0, 300.0]);
        let s = water_fill(1000.0, &[100.0, 200.0]);
        assert_eq!(s, vec![450.0, 550.0], "slack spread evenly");
        let s = water_fill(90.0, &[0.0, 0.0, 0.0]);
        assert_eq!(s, vec![30.0, 30.0, 30.0]);
        assert!(water_fill(10.0, &[]).is_empty());
        for wants in [vec![5.0, 500.0, 60.0, 1.0, 900.0], vec![400.0; 5]] {
            let total: f64 = water_fill(1000.0, &wants).iter().sum();
            assert!((total - 1000.0).abs() < 1e-9, "{wants:?}: {total}");
        }
    }
}
