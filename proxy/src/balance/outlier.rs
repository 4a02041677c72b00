//! Outlier ejection, the per-endpoint half of circuit breaking. An endpoint is ejected after
//! `consecutive_failures` failures in a row, or when its failure rate over a window reaches the
//! threshold. Each ejection lasts longer than the last (base × count, at most 10×). When it
//! ends the endpoint is on probation: one trial request at a time; a success lets it back
//! fully, a failure ejects it again. At most `max_ejection_percent` of the endpoints are
//! ejected at once, and never all of them.

use super::Balancer;
use super::state::{EndpointState, Now};
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use mesh_model::policy::OutlierConfig;
/// Ejections grow up to this many times the base.
const MAX_EJECTION_FACTOR: u32 = 10;

/// Counts one outcome in the endpoint's window (a new window starts when the old one is over).
fn count(s: &EndpointState, failed: bool, now: Now, window: Duration) -> (u32, u32) {
    let start = s.window_start_ms.load(Ordering::Relaxed);
    if now.ms().saturating_sub(start) >= window.as_millis() as u64
        && s.window_start_ms
            .compare_exchange(start, now.ms(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        s.window_total.store(0, Ordering::Relaxed);
        s.window_failed.store(0, Ordering::Relaxed);
    }
    let total = s.window_total.fetch_add(1, Ordering::Relaxed) + 1;
    let failed_n = if failed {
        s.window_failed.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        s.window_failed.load(Ordering::Relaxed)
    };
    (total, failed_n)
}

/// Records one attempt's outcome and ejects the endpoint if the config says so; true when it
/// was ejected now.
pub fn record(
    b: &Balancer,
    s: &EndpointState,
    success: bool,
    trial: bool,
    cfg: &OutlierConfig,
    id: &str,
) -> bool {
    let now = Now::get();
    let (total, failed) = count(s, !success, now, cfg.window);
    if success {
        s.consecutive_failures.store(0, Ordering::Relaxed);
        if trial {
            s.probation.store(false, Ordering::Relaxed);
            let _ = s
                .ejections
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            tracing::info!(endpoint = id, "endpoint passed probation; back in rotation");
        }
        return false;
    }
    let consecutive = s.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    let by_count = cfg.consecutive_failures > 0 && consecutive >= cfg.consecutive_failures;
    let by_rate = cfg.failure_rate_percent > 0.0
        && total >= cfg.min_requests.max(1)
        && f64::from(failed) * 100.0 >= cfg.failure_rate_percent * f64::from(total);
    (trial || by_count || by_rate) && eject(b, s, cfg, now, id)
}

fn eject(b: &Balancer, s: &EndpointState, cfg: &OutlierConfig, now: Now, id: &str) -> bool {
    if s.is_ejected(now) {
        return false;
    }
    let (n, ejected) = b.states().fold((0u32, 0u32), |(n, e), (_, st)| {
        (n + 1, e + u32::from(st.is_ejected(now)))
    });
    let allowed =
        ((f64::from(n) * cfg.max_ejection_percent / 100.0) as u32).min(n.saturating_sub(1));
    if ejected >= allowed {
        tracing::debug!(
            endpoint = id,
            ejected,
            allowed,
            "ejection skipped: at max ejected share"
        );
        return false;
    }
    let count = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let length = cfg.base_ejection * count.min(MAX_EJECTION_FACTOR);
    s.ejected_until_ms
        .store(now.ms() + length.as_millis() as u64, Ordering::Relaxed);
    s.probation.store(true, Ordering::Relaxed);
    s.consecutive_failures.store(0, Ordering::Relaxed);
    s.window_total.store(0, Ordering::Relaxed);
    s.window_failed.store(0, Ordering::Relaxed);
    tracing::info!(
        endpoint = id,
        ejection = count,
        for_ms = length.as_millis() as u64,
        "endpoint ejected"
    );
    true
}
