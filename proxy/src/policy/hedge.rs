//! Hedged requests: an idempotent request still unanswered after a delay goes a second time,
//! to another endpoint, and the first answer wins (the other attempt is dropped, which resets
//! its stream). The delay is the rule's own, or the p95 of its recent answers, learned here:
//! so only the slowest ~5% of requests are hedged, and a stall on one endpoint costs the p95
//! plus the answer of another, not the stall. Each hedge is taken from the retry budget, so
//! hedging never doubles the load on a service that is slow everywhere.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub use mesh_model::policy::HedgeConfig;

/// Latencies are kept in buckets growing by a quarter from 100 µs (the last one ~ 100 s).
const BUCKETS: usize = 64;
const FIRST_US: f64 = 100.0;
const GROWTH: f64 = 1.25;
/// Answers are counted in two slots of this long: the p95 is of the last 5 to 10 s.
const SLOT: Duration = Duration::from_secs(5);
/// Fewer answers than this in the window: no p95 yet, so no hedging.
const MIN_SAMPLES: u64 = 20;

#[derive(Debug)]
struct Slot {
    epoch: AtomicU64,
    counts: [AtomicU32; BUCKETS],
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// The recent answer times of one rule (lock-free), and how many requests it hedged.
#[derive(Debug)]
pub struct Recent {
    origin: Instant,
    slots: [Slot; 2],
    hedged: AtomicU64,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            slots: Default::default(),
            hedged: AtomicU64::new(0),
        }
    }
}

fn bucket(d: Duration) -> usize {
    let us = d.as_micros() as f64;
    if us <= FIRST_US {
        return 0;
    }
    ((us / FIRST_US).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

/// The upper bound of bucket `i`.
fn bound(i: usize) -> Duration {
    Duration::from_micros((FIRST_US * GROWTH.powi(i as i32)) as u64)
}

impl Recent {
    fn epoch(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis() as u64
            / SLOT.as_millis() as u64
            + 1
    }

    /// Counts one answer's time (to its head).
    pub fn record(&self, d: Duration) {
        let epoch = self.epoch();
        let slot = &self.slots[(epoch % 2) as usize];
        let old = slot.epoch.load(Ordering::Relaxed);
        if old != epoch
            && slot
                .epoch
                .compare_exchange(old, epoch, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            for c in &slot.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        slot.counts[bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The p95 of the answers of the last 5 to 10 s (rounded up to its bucket's bound), once
    /// there were enough of them.
    pub fn p95(&self) -> Option<Duration> {
        let epoch = self.epoch();
        let mut counts = [0u64; BUCKETS];
        for s in &self.slots {
            if epoch - s.epoch.load(Ordering::Relaxed).min(epoch) <= 1 {
                for (n, c) in counts.iter_mut().zip(&s.counts) {
                    *n += u64::from(c.load(Ordering::Relaxed));
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let rank = total - total / 20;
        let mut seen = 0;
        counts
            .iter()
            .position(|n| {
                seen += n;
                seen >= rank
            })
            .map(bound)
    }

    /// The delay before a hedge under `cfg`: the set one, or the learned p95.
    pub fn delay(&self, cfg: &HedgeConfig) -> Option<Duration> {
        cfg.delay.or_else(|| self.p95())
    }

    pub fn hedged(&self) {
        self.hedged.fetch_add(1, Ordering::Relaxed);
    }

    /// Hedges sent since the rule's state was made (for `/metrics`).
    pub fn total(&self) -> u64 {
        self.hedged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_latencies() {
        for us in [50, 100, 101, 1_000, 12_345, 1_000_000, 30_000_000] {
            let d = Duration::from_micros(us);
            let b = bucket(d);
            assert!(bound(b) >= d, "{us}");
            assert!(b == 0 || bound(b - 1) < d, "{us}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p95_is_learned_from_enough_recent_answers_and_forgotten() {
        let r = Recent::default();
        for _ in 0..19 {
            r.record(Duration::from_millis(10));
        }
        assert_eq!(r.p95(), None, "too few answers");
        for _ in 0..76 {
            r.record(Duration::from_millis(10));
        }
        for _ in 0..5 {
            r.record(Duration::from_secs(1));
        }
        let p = r.p95().expect("p95");
        assert!(
            p >= Duration::from_millis(10) && p < Duration::from_micros(12_500),
            "{p:?}"
        );
        assert_eq!(
            r.delay(&HedgeConfig {
                delay: Some(Duration::from_millis(3))
            }),
            Some(Duration::from_millis(3))
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(r.p95(), None, "older than two slots");
    }
}
