//! What the proxy knows about one endpoint, shared by every request and kept across config
//! updates: requests in flight, peak-EWMA latency, and its outlier-ejection state. Atomics only.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Decay time of the latency average: an observation weighs e^-1 after this long.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Floor of the latency estimate, so in-flight counts still break ties between new endpoints.
const MIN_RTT_NS: f64 = 1_000.0;
/// Failures count at least this slow, so a fast-failing endpoint does not attract traffic.
const FAILURE_RTT_NS: f64 = 10_000_000.0;

/// A point in time as nanoseconds since the process's first use of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now(pub u64);

static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Now {
    pub fn get() -> Self {
        let origin = *ORIGIN.get_or_init(Instant::now);
        Now(Instant::now().saturating_duration_since(origin).as_nanos() as u64)
    }
    pub fn ms(self) -> u64 {
        self.0 / 1_000_000
    }
}

#[derive(Debug)]
pub struct EndpointState {
    /// When the proxy first saw this endpoint (warm-up).
    pub(crate) seen: Now,
    pub(crate) in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    ewma_at: AtomicU64,
    // Outlier detection (see `outlier`).
    pub(crate) consecutive_failures: AtomicU32,
    pub(crate) window_start_ms: AtomicU64,
    pub(crate) window_total: AtomicU32,
    pub(crate) window_failed: AtomicU32,
    /// 0: not ejected.
    pub(crate) ejected_until_ms: AtomicU64,
    pub(crate) ejections: AtomicU32,
    /// Back from an ejection but not yet proven healthy: one trial request at a time.
    pub(crate) probation: AtomicBool,
    pub(crate) trial_out: AtomicBool,
    /// Golden metrics since the last telemetry report (taken and reset by `take_stats`).
    requests: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

/// Latency buckets of the telemetry (the API's bounds plus one unbounded).
pub const BUCKETS: usize = mesh_proto::LATENCY_BUCKETS_MS.len() + 1;

/// The telemetry bucket of a latency: the first bound it does not exceed, at microsecond
/// precision (bucket i holds ≤ `LATENCY_BUCKETS_MS[i]`, as `top` and the canary gate read it,
/// and as Prometheus's `le` does), the last one anything slower.
pub fn bucket_of(rtt: Duration) -> usize {
    let us = rtt.as_micros() as u64;
    mesh_proto::LATENCY_BUCKETS_MS
        .iter()
        .position(|b| us <= *b * 1000)
        .unwrap_or(BUCKETS - 1)
}

/// Requests, failures and latency buckets taken from one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub failures: u64,
    pub latency: [u64; BUCKETS],
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.requests += o.requests;
        self.failures += o.failures;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            *a += b;
        }
    }
}

impl Default for EndpointState {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointState {
    pub fn new() -> Self {
        Self {
            seen: Now::get(),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            window_total: AtomicU32::new(0),
            window_failed: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probation: AtomicBool::new(false),
            trial_out: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: Default::default(),
        }
    }

    /// The counters since the previous call, reset to zero.
    pub fn take_stats(&self) -> Stats {
        let mut s = Stats {
            requests: self.requests.swap(0, Ordering::Relaxed),
            failures: self.failures.swap(0, Ordering::Relaxed),
            ..Stats::default()
        };
        for (out, b) in s.latency.iter_mut().zip(self.latency.iter()) {
            *out = b.swap(0, Ordering::Relaxed);
        }
        s
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: Now) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now.ms()
    }

    pub fn on_probation(&self) -> bool {
        self.probation.load(Ordering::Relaxed)
    }

    /// May take a request now (not ejected, and no trial out while on probation).
    pub fn eligible(&self, now: Now) -> bool {
        let trial_taken = self.on_probation() && self.trial_out.load(Ordering::Relaxed);
        !self.is_ejected(now) && !trial_taken
    }

    /// Claims the endpoint for one request: Some(is_trial), or None if it became ineligible.
    pub fn admit(&self, now: Now) -> Option<bool> {
        if self.is_ejected(now) {
            return None;
        }
        let trial = self.on_probation();
        if trial
            && self
                .trial_out
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(trial)
    }

    /// The request was dropped before it finished.
    pub(crate) fn cancel(&self, trial: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if trial {
            self.trial_out.store(false, Ordering::Release);
        }
    }

    /// The outcome of an attempt whose head came earlier ([`EndpointState::head`]): counted
    /// for telemetry, and a trial's end lets the next trial go. Its latency is counted when
    /// the answer ends ([`EndpointState::answered_in`]).
    pub(crate) fn outcome(&self, success: bool, trial: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !success {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if trial {
            self.trial_out.store(false, Ordering::Release);
        }
    }

    /// A request this endpoint answered took `latency` from its arrival at the proxy to the end
    /// of the answer: the one latency `top`, the dashboard, the canary gate and Prometheus's
    /// `istio_request_duration_milliseconds` all count (the balancer's EWMA alone uses time to
    /// the head).
    pub fn answered_in(&self, latency: Duration) {
        if let Some(b) = self.latency.get(bucket_of(latency)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The head of an attempt's answer came after `rtt`: it is no longer in flight, and the
    /// latency feeds the estimate. Peak EWMA: a slower observation is taken at once, faster
    /// ones blend in over time.
    /// An answer whose latency says nothing of the endpoint's (a refusal): only its place
    /// in flight is given back.
    pub(crate) fn refused(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn head(&self, now: Now, rtt: Duration, success: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut rtt = rtt.as_nanos() as f64;
        let prev = self.ewma(now);
        if !success {
            rtt = rtt.max(prev * 2.0).max(FAILURE_RTT_NS);
        }
        let last = self.ewma_at.load(Ordering::Relaxed);
        let w = (-((now.0.saturating_sub(last)) as f64) / EWMA_DECAY.as_nanos() as f64).exp();
        let stored = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let next = if rtt > stored {
            rtt
        } else {
            stored * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now.0, Ordering::Relaxed);
    }

    /// The latency estimate, decayed for the time since the last observation so an endpoint
    /// that stopped getting traffic is tried again eventually.
    pub fn ewma(&self, now: Now) -> f64 {
        let v = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let since = now.0.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
        v * (-since / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// Share of its full weight a new endpoint gets: 10% at first, 100% after `warmup`.
    pub fn warm(&self, now: Now, warmup: Duration) -> f64 {
        if warmup.is_zero() {
            return 1.0;
        }
        let age = now.0.saturating_sub(self.seen.0) as f64;
        (0.1 + 0.9 * age / warmup.as_nanos() as f64).min(1.0)
    }

    /// P2C cost: expected latency times the queue this request would join.
    pub fn cost(&self, now: Now, warmup: Duration) -> f64 {
        self.ewma(now).max(MIN_RTT_NS) * f64::from(self.in_flight() + 1) / self.warm(now, warmup)
    }
}
