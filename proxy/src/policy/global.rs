//! Global rate limits without a rate-limit service: quota leases. The service's own proxies
//! each hold a share of the limit, granted by the control plane, and decide on the request
//! path against that share alone (one GCRA bucket, no remote call). Every [`REPORT_EVERY`]
//! each proxy tells the control plane how many requests asked for each limit; the control
//! plane divides the limit by demand (max-min fair, the whole budget always handed out) and
//! answers with the new shares. So the shares follow the load, a replica that joins is given
//! its share at its first report, and one that leaves stops reporting and its share goes to
//! the others. While the control plane is away a proxy keeps its last share; before its first
//! grant it holds the whole limit itself (never more than the limit per proxy).

use super::rate_limit::{Gcra, MAX_CALLERS, Rate};
use crate::identity::control_plane::ControlPlane;
use crate::snapshot::Snapshots;
use dashmap::DashMap;
use mesh_proto::v1 as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use mesh_model::policy::GlobalRate;

/// How often demand is reported and shares are renewed.
pub const REPORT_EVERY: Duration = Duration::from_millis(100);
/// A per-caller share unused this long is forgotten.
const IDLE: Duration = Duration::from_secs(30);

/// This proxy's share of one global limit (one caller's, for a per-caller limit).
#[derive(Debug, Default)]
pub struct Share {
    bucket: Gcra,
    /// Granted requests per second and burst, as f64 bits; 0: no grant yet.
    per_second: AtomicU64,
    burst: AtomicU64,
    asked: AtomicU64,
    admitted: AtomicU64,
    /// Requests refused since the share was made (`/metrics`).
    throttled: AtomicU64,
    /// Last time a request asked (ms since the limits were made).
    last_ms: AtomicU64,
}

impl Share {
    /// Admits one request within the share, or says when one would pass.
    fn check(&self, limit: Rate) -> Result<(), Duration> {
        self.asked.fetch_add(1, Relaxed);
        let granted = f64::from_bits(self.per_second.load(Relaxed));
        let (rate, burst) = if granted > 0.0 {
            (granted, f64::from_bits(self.burst.load(Relaxed)).max(1.0))
        } else {
            (f64::from(limit.per_second), f64::from(limit.burst))
        };
        let interval = (1e9 / rate.max(1e-3)) as u64;
        let tolerance = (interval as f64 * (burst - 1.0).max(0.0)) as u64;
        match self.bucket.check_ns(interval, tolerance) {
            Ok(()) => {
                self.admitted.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(wait) => {
                self.throttled.fetch_add(1, Relaxed);
                Err(wait)
            }
        }
    }

    /// Takes a new share; the bucket carries over what it owes at the old rate, scaled.
    fn grant(&self, per_second: f64, burst: f64) {
        let per_second = per_second.max(1e-3);
        let old = f64::from_bits(self.per_second.swap(per_second.to_bits(), Relaxed));
        self.burst.store(burst.to_bits(), Relaxed);
        let interval = 1e9 / per_second;
        let factor = if old > 0.0 { old / per_second } else { 1.0 };
        self.bucket
            .rescale(factor, (interval * burst.max(1.0)) as u64);
    }

    /// The granted rate, if any (for `/config_dump`).
    pub fn granted(&self) -> Option<f64> {
        let r = f64::from_bits(self.per_second.load(Relaxed));
        (r > 0.0).then_some(r)
    }
}

/// The shares of the global limits of this proxy's own service: one for the whole budget
/// (key ""), or one per caller identity (bounded; callers past the bound share one).
#[derive(Debug)]
pub struct GlobalLimits {
    origin: Instant,
    shares: DashMap<Arc<str>, Arc<Share>>,
    overflow: Arc<Share>,
}

impl Default for GlobalLimits {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            shares: DashMap::new(),
            overflow: Arc::default(),
        }
    }
}

/// The key of the whole budget.
const ALL: &str = "";
/// The key callers past [`MAX_CALLERS`] share.
const OVERFLOW: &str = "*";

impl GlobalLimits {
    fn share(&self, key: &Arc<str>) -> Arc<Share> {
        if let Some(s) = self.shares.get(key) {
            return s.clone();
        }
        if self.shares.len() >= MAX_CALLERS {
            return self.overflow.clone();
        }
        self.shares.entry(key.clone()).or_default().clone()
    }

    /// Admits a request from `caller` under `g`, within this proxy's share.
    pub fn check(&self, g: GlobalRate, caller: &Arc<str>) -> Result<(), Duration> {
        static ALL_KEY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| ALL.into());
        let share = self.share(if g.per_caller { caller } else { &ALL_KEY });
        share
            .last_ms
            .store(self.origin.elapsed().as_millis() as u64, Relaxed);
        share.check(g.rate)
    }

    /// The demand since the last call, per key (every share, so the control plane knows this
    /// proxy holds one even while idle); per-caller shares idle for long are dropped.
    pub fn take(&self, window: Duration) -> Vec<pb::QuotaDemand> {
        let now = self.origin.elapsed().as_millis() as u64;
        self.shares.retain(|k, s| {
            k.is_empty() || now.saturating_sub(s.last_ms.load(Relaxed)) < IDLE.as_millis() as u64
        });
        let mut out: Vec<pb::QuotaDemand> = self
            .shares
            .iter()
            .map(|e| (e.key().to_string(), e.value().clone()))
            .chain(
                (self.overflow.asked.load(Relaxed) > 0)
                    .then(|| (OVERFLOW.to_string(), self.overflow.clone())),
            )
            .map(|(caller, s)| pb::QuotaDemand {
                service: String::new(),
                caller,
                asked: s.asked.swap(0, Relaxed),
                admitted: s.admitted.swap(0, Relaxed),
                window_ms: window.as_millis() as u32,
            })
            .collect();
        if out.is_empty() {
            // Present from the start, so the first grant is there before the first request.
            out.push(pb::QuotaDemand {
                caller: ALL.into(),
                window_ms: window.as_millis() as u32,
                ..Default::default()
            });
        }
        out
    }

    /// Applies the control plane's grants.
    pub fn apply(&self, grants: &[pb::QuotaGrant]) {
        for g in grants {
            let share = if g.caller == OVERFLOW {
                self.overflow.clone()
            } else {
                self.share(&Arc::from(g.caller.as_str()))
            };
            share.grant(g.per_second, g.burst);
        }
    }

    /// Requests refused since the limits were made.
    pub fn throttled(&self) -> u64 {
        self.shares
            .iter()
            .map(|e| e.value().throttled.load(Relaxed))
            .sum::<u64>()
            + self.overflow.throttled.load(Relaxed)
    }

    /// (caller key, granted rate) of each share, for `/config_dump`.
    pub fn granted(&self) -> Vec<(String, Option<f64>)> {
        let mut v: Vec<_> = self
            .shares
            .iter()
            .map(|e| (e.key().to_string(), e.value().granted()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Keeps a quota stream to the control plane while this proxy's own service has a global
/// limit: reports demand every [`REPORT_EVERY`] and applies the grants that come back.
pub struct QuotaReporter {
    pub snapshots: Arc<Snapshots>,
    pub control_plane: Arc<ControlPlane>,
    pub node_id: String,
    /// This proxy's own service.
    pub service: Arc<str>,
}

impl QuotaReporter {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream: Option<mpsc::Sender<pb::QuotaReport>> = None;
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            let limits = {
                let snap = self.snapshots.load();
                snap.services
                    .get(&*self.service)
                    .and_then(|s| s.state.global.clone())
            };
            let Some(limits) = limits else {
                stream = None;
                continue;
            };
            let first = stream.as_ref().is_none_or(|s| s.is_closed());
            if first {
                stream = self.open().await;
            }
            let window = last.elapsed();
            last = Instant::now();
            let mut demands = limits.take(window);
            for d in &mut demands {
                d.service = self.service.to_string();
            }
            let report = pb::QuotaReport {
                node: if first {
                    self.node_id.clone()
                } else {
                    String::new()
                },
                demands,
            };
            if let Some(tx) = &stream
                && tx.try_send(report).is_err()
            {
                tracing::debug!("quota report dropped");
            }
        }
    }

    /// Opens the stream; a task applies the grants as they come, to the shares the current
    /// config holds (they live across config updates).
    async fn open(&self) -> Option<mpsc::Sender<pb::QuotaReport>> {
        let channel = match self.control_plane.authenticated_channel().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "quota: control plane unreachable; keeping the last shares");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let mut client = pb::discovery_client::DiscoveryClient::new(channel);
        let (snapshots, service) = (self.snapshots.clone(), self.service.clone());
        tokio::spawn(async move {
            match client
                .quota(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(resp) => {
                    let mut grants = resp.into_inner();
                    while let Ok(Some(g)) = grants.message().await {
                        if let Some(shares) = snapshots
                            .load()
                            .services
                            .get(&*service)
                            .and_then(|s| s.state.global.as_ref())
                        {
                            shares.apply(&g.grants);
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "quota stream refused"),
            }
        });
        Some(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_share_admits_its_grant_and_reports_its_demand() {
        let g = GlobalLimits::default();
        let limit = GlobalRate {
            rate: Rate::new(100, 10),
            per_caller: false,
        };
        let a: Arc<str> = "a".into();
        // Before a grant: the whole limit (its burst at once).
        let passed = (0..50).filter(|_| g.check(limit, &a).is_ok()).count();
        assert_eq!(passed, 10);
        g.apply(&[pb::QuotaGrant {
            caller: "".into(),
            per_second: 20.0,
            burst: 2.0,
            ..Default::default()
        }]);
        let d = g.take(Duration::from_secs(1));
        assert_eq!((d[0].asked, d[0].admitted), (50, 10));
        // One second at 100/s offered: about the granted 20 pass.
        let mut ok = 0;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            ok += usize::from(g.check(limit, &a).is_ok());
        }
        assert!((19..=22).contains(&ok), "{ok}");
        assert_eq!(g.throttled(), 40 + 100 - ok as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn per_caller_shares_are_apart_and_idle_ones_are_forgotten() {
        let g = GlobalLimits::default();
        let limit = GlobalRate {
            rate: Rate::new(1, 1),
            per_caller: true,
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(g.check(limit, &a).is_ok());
        assert!(g.check(limit, &a).is_err());
        assert!(g.check(limit, &b).is_ok());
        assert_eq!(g.take(REPORT_EVERY).len(), 2);
        tokio::time::advance(IDLE + Duration::from_secs(1)).await;
        let d = g.take(REPORT_EVERY);
        assert_eq!(d.len(), 1, "only the placeholder: {d:?}");
        assert_eq!(d[0].caller, "");
    }
}
