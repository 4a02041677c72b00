//! Adaptive concurrency: the service's own proxy limits the requests in flight to its app by
//! a limit it finds from the app's latency, and sheds the rest at once (503, `x-mesh-error:
//! overloaded`) instead of letting them queue behind an app that is already slowing down.
//!
//! The limit is a gradient one (as Envoy's adaptive concurrency filter and Netflix's
//! concurrency-limits): every window of [`WINDOW`] it becomes
//! `limit × min_rtt·(1+tolerance)/latency + √limit / 2`, clamped to the configured bounds and to
//! a halving at most. Below the point where the app queues, latency stays at min_rtt and the
//! limit grows by the headroom; past it, latency grows with the queue and the gradient pulls
//! the limit back, so it settles a little above the app's own concurrency. min_rtt is the
//! latency with the limit held at `min_limit`: measured first, and again every
//! `min_rtt_interval` (±15%) so a drift in the app is followed.
//!
//! The request path takes one atomic increment to enter, and on leaving adds its latency to
//! the window's sum; the request that closes a window (one CAS) computes the next limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

pub use mesh_model::policy::AdaptiveConfig;

/// How often the limit moves.
pub const WINDOW: Duration = Duration::from_millis(100);
/// A window with fewer answers keeps collecting.
const MIN_WINDOW_SAMPLES: u64 = 5;
/// Answers at `min_limit` that make a min_rtt measurement...
const PROBE_SAMPLES: u64 = 25;
/// ...or as many as came in this long.
const PROBE_MAX: Duration = Duration::from_secs(2);

/// One app's limiter (lives across config updates while its config is unchanged).
#[derive(Debug)]
pub struct Adaptive {
    cfg: AdaptiveConfig,
    origin: Instant,
    in_flight: AtomicU32,
    /// The limit in force (the float one is the window owner's, kept as bits).
    limit: AtomicU32,
    limit_f: AtomicU64,
    /// The current window: its start (µs since origin), and the answers in it.
    window_start: AtomicU64,
    sum_us: AtomicU64,
    count: AtomicU64,
    /// 0 until measured.
    min_rtt_us: AtomicU64,
    /// While true, the limit is `min_limit` and answers measure min_rtt.
    probing: AtomicBool,
    probe_start: AtomicU64,
    probe_sum_us: AtomicU64,
    probe_count: AtomicU64,
    next_probe: AtomicU64,
    shed: AtomicU64,
}

/// A request admitted by the limiter; [`Permit::answered`] gives its latency, dropping it
/// (answered or not) frees its place.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Adaptive>,
    start: Instant,
    probe: bool,
}

impl Adaptive {
    pub fn new(cfg: AdaptiveConfig) -> Self {
        let min = cfg.min_limit.max(1);
        Self {
            cfg,
            origin: Instant::now(),
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(min),
            limit_f: AtomicU64::new(f64::from(min).to_bits()),
            window_start: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
            min_rtt_us: AtomicU64::new(0),
            probing: AtomicBool::new(true),
            probe_start: AtomicU64::new(0),
            probe_sum_us: AtomicU64::new(0),
            probe_count: AtomicU64::new(0),
            next_probe: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    fn now_us(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_micros() as u64
    }

    /// A place for one request, or the limit it is over (the request is shed).
    pub fn acquire(self: &Arc<Self>) -> Result<Permit, u32> {
        let probe = self.probing.load(Relaxed);
        let limit = if probe {
            self.cfg.min_limit.max(1)
        } else {
            self.limit.load(Relaxed)
        };
        if self.in_flight.fetch_add(1, Relaxed) >= limit {
            self.in_flight.fetch_sub(1, Relaxed);
            self.shed.fetch_add(1, Relaxed);
            return Err(limit);
        }
        Ok(Permit {
            limiter: self.clone(),
            start: Instant::now(),
            probe,
        })
    }

    /// The limit in force now (`/metrics`).
    pub fn limit(&self) -> u32 {
        if self.probing.load(Relaxed) {
            self.cfg.min_limit.max(1)
        } else {
            self.limit.load(Relaxed)
        }
    }

    /// Requests shed since the limiter was made.
    pub fn shed(&self) -> u64 {
        self.shed.load(Relaxed)
    }

    /// The measured min_rtt, once there is one.
    pub fn min_rtt(&self) -> Option<Duration> {
        let us = self.min_rtt_us.load(Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }

    fn sample(&self, latency: Duration, probe: bool) {
        let us = (latency.as_micros() as u64).max(1);
        let now = self.now_us();
        if probe && self.probing.load(Relaxed) {
            let start = self.probe_start.load(Relaxed);
            if start == 0 {
                let _ = self.probe_start.compare_exchange(0, now, Relaxed, Relaxed);
            }
            self.probe_sum_us.fetch_add(us, Relaxed);
            let n = self.probe_count.fetch_add(1, Relaxed) + 1;
            let long =
                now.saturating_sub(self.probe_start.load(Relaxed)) >= PROBE_MAX.as_micros() as u64;
            if (n >= PROBE_SAMPLES || long) && self.probing.swap(false, Relaxed) {
                let sum = self.probe_sum_us.swap(0, Relaxed);
                let n = self.probe_count.swap(0, Relaxed).max(1);
                self.probe_start.store(0, Relaxed);
                self.min_rtt_us.store((sum / n).max(1), Relaxed);
                let interval = self.cfg.min_rtt_interval.as_micros() as f64;
                let jitter = 0.85 + 0.3 * fastrand::f64();
                self.next_probe
                    .store(now + (interval * jitter) as u64, Relaxed);
                // The window restarts: answers of the probe say nothing of the limit.
                self.sum_us.store(0, Relaxed);
                self.count.store(0, Relaxed);
                self.window_start.store(now, Relaxed);
            }
            return;
        }
        self.sum_us.fetch_add(us, Relaxed);
        let n = self.count.fetch_add(1, Relaxed) + 1;
        let start = self.window_start.load(Relaxed);
        if n < MIN_WINDOW_SAMPLES
            || now.saturating_sub(start) < WINDOW.as_micros() as u64
            || self
                .window_start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let sum = self.sum_us.swap(0, Relaxed);
        let n = self.count.swap(0, Relaxed).max(1);
        self.update(sum as f64 / n as f64, now);
    }

    /// The window owner's step: the next limit from the window's mean latency.
    fn update(&self, mean_us: f64, now: u64) {
        let min_rtt = self.min_rtt_us.load(Relaxed);
        if min_rtt == 0 || self.probing.load(Relaxed) {
            return;
        }
        let min_rtt = (min_rtt as f64).min(mean_us);
        let tolerance = 1.0 + self.cfg.tolerance_percent / 100.0;
        let gradient = (min_rtt * tolerance / mean_us).clamp(0.5, 1.0);
        let limit = f64::from_bits(self.limit_f.load(Relaxed));
        let next = (limit * gradient + limit.sqrt() / 2.0).clamp(
            f64::from(self.cfg.min_limit.max(1)),
            f64::from(self.cfg.max_limit.max(1)),
        );
        self.limit_f.store(next.to_bits(), Relaxed);
        self.limit.store(next.round() as u32, Relaxed);
        if now >= self.next_probe.load(Relaxed) {
            self.probing.store(true, Relaxed);
        }
    }
}

impl Permit {
    /// The app answered: its latency (to the answer's head) feeds the limit.
    pub fn answered(self) {
        self.limiter.sample(self.start.elapsed(), self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdaptiveConfig {
        AdaptiveConfig {
            min_limit: 3,
            max_limit: 1000,
            min_rtt_interval: Duration::from_secs(30),
            tolerance_percent: 10.0,
        }
    }

    /// An app with `c` workers of `service` each: the latency of a request at concurrency
    /// `n` (its share of the queue).
    fn app_latency(n: u32, c: u32, service: Duration) -> Duration {
        service.mul_f64((f64::from(n) / f64::from(c)).max(1.0))
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_settles_just_above_the_apps_own_concurrency() {
        let a = Arc::new(Adaptive::new(cfg()));
        let (c, service) = (8, Duration::from_millis(20));
        // Offered far above capacity: as many requests as the limit admits, every round.
        let mut limits = Vec::new();
        for _ in 0..600 {
            let mut permits = Vec::new();
            while let Ok(p) = a.acquire() {
                permits.push(p);
                if permits.len() > 1000 {
                    break;
                }
            }
            let n = permits.len() as u32;
            tokio::time::advance(app_latency(n, c, service)).await;
            for p in permits {
                p.answered();
            }
            limits.push(a.limit());
        }
        assert_eq!(a.min_rtt(), Some(service), "measured at min_limit");
        let tail = &limits[limits.len() - 100..];
        let mean = tail.iter().sum::<u32>() as f64 / tail.len() as f64;
        assert!(
            (8.0..=14.0).contains(&mean),
            "settles a little above the app's 8 workers: {mean} ({tail:?})"
        );
        assert!(a.shed() > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shed_requests_free_nothing_and_permits_free_their_place() {
        let a = Arc::new(Adaptive::new(cfg()));
        let held: Vec<_> = (0..3).map(|_| a.acquire().expect("under min")).collect();
        assert_eq!(a.acquire().unwrap_err(), 3);
        assert_eq!(a.shed(), 1);
        drop(held);
        assert!(a.acquire().is_ok());
    }
}
