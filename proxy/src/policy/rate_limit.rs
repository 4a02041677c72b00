//! Rate limiting as a token bucket, kept lock-free as GCRA (one atomic "theoretical arrival
//! time" per bucket; a request either moves it forward by one interval or is refused with the
//! time until it would pass). Outbound it is a layer per destination service; inbound the
//! proxy checks the service-wide and per-caller buckets itself before forwarding.

use crate::http::errors::ProxyError;
use dashmap::DashMap;
use futures_util::future::{Either, Ready, ready};
use http::Request;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

/// Most distinct callers tracked per service; callers past it share one bucket.
pub const MAX_CALLERS: usize = 10_000;

pub use mesh_model::policy::Rate;

/// One bucket. Times are nanoseconds since `origin`.
#[derive(Debug)]
pub struct Gcra {
    origin: Instant,
    tat: AtomicU64,
}

impl Default for Gcra {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }
}

impl Gcra {
    /// Takes one token, or says how long until one is free.
    pub fn check(&self, rate: Rate) -> Result<(), Duration> {
        let interval = rate.interval_ns();
        self.check_ns(interval, interval * u64::from(rate.burst.saturating_sub(1)))
    }

    /// As `check`, for a rate given as the nanoseconds between two tokens and a burst as the
    /// time it may run ahead (a share of a global limit is rarely a whole number per second).
    pub fn check_ns(&self, interval: u64, tolerance: u64) -> Result<(), Duration> {
        let now = Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > tolerance {
                return Err(Duration::from_nanos(start - now - tolerance));
            }
            match self.tat.compare_exchange_weak(
                tat,
                start + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

impl Gcra {
    /// Carries the bucket over to a new rate: the time it runs ahead of now (the tokens owed)
    /// is scaled by `factor` (new interval / old) and capped at `cap` nanoseconds, so a bucket
    /// that ran far ahead at a tiny rate does not refuse everything at a larger one.
    pub fn rescale(&self, factor: f64, cap: u64) {
        let now = Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let ahead = ((tat.saturating_sub(now)) as f64 * factor) as u64;
            let next = now + ahead.min(cap);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }
}

/// One bucket per key (caller identity), bounded.
#[derive(Debug, Default)]
pub struct PerKey {
    buckets: DashMap<Arc<str>, Arc<Gcra>>,
    overflow: Gcra,
}

impl PerKey {
    pub fn check(&self, key: &Arc<str>, rate: Rate) -> Result<(), Duration> {
        if let Some(b) = self.buckets.get(key) {
            return b.check(rate);
        }
        if self.buckets.len() >= MAX_CALLERS {
            return self.overflow.check(rate);
        }
        let b = self.buckets.entry(key.clone()).or_default().clone();
        b.check(rate)
    }
}

#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    rate: Option<Rate>,
    bucket: Arc<Gcra>,
}

impl RateLimitLayer {
    pub fn new(rate: Option<Rate>, bucket: Arc<Gcra>) -> Self {
        Self { rate, bucket }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            rate: self.rate,
            bucket: self.bucket.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    rate: Option<Rate>,
    bucket: Arc<Gcra>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<S::Future, Ready<Result<S::Response, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(rate) = self.rate
            && let Err(retry_after) = self.bucket.check(rate)
        {
            return Either::Right(ready(Err(ProxyError::RateLimited { retry_after })));
        }
        Either::Left(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn passes_the_rate_and_the_burst_and_refuses_the_rest() {
        let g = Gcra::default();
        let rate = Rate::new(50, 5);
        let passed = (0..20).filter(|_| g.check(rate).is_ok()).count();
        assert_eq!(passed, 5, "a burst of 5 at once");
        let wait = g.check(rate).unwrap_err();
        assert!(wait <= Duration::from_millis(20), "{wait:?}");
        // Over one second at 200/s offered, about 50 more pass.
        let mut ok = 0;
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(5)).await;
            ok += usize::from(g.check(rate).is_ok());
        }
        assert!((49..=51).contains(&ok), "{ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn callers_have_their_own_buckets() {
        let p = PerKey::default();
        let rate = Rate::new(10, 1);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(p.check(&a, rate).is_ok());
        assert!(p.check(&a, rate).is_err());
        assert!(p.check(&b, rate).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn layer_answers_rate_limited() {
        let svc = tower::service_fn(|_: Request<()>| async { Ok::<_, ProxyError>("ok") });
        let mut svc = RateLimitLayer::new(Some(Rate::new(1, 1)), Arc::default()).layer(svc);
        assert_eq!(
            svc.ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .unwrap(),
            "ok"
        );
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::RateLimited { .. }));
        let svc = tower::service_fn(|_: Request<()>| async { Ok::<_, ProxyError>("ok") });
        let mut off = RateLimitLayer::new(None, Arc::default()).layer(svc);
        assert!(
            off.ready()
                .await
                .unwrap()
                .call(Request::new(()))
                .await
                .is_ok()
        );
    }
}
