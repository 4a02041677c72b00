//! The service-level half of circuit breaking: at most `max_concurrent` requests in flight to
//! a service, at most `max_pending` waiting for a slot; past that the breaker is open and the
//! request gets a fast 503 (`x-mesh-error: circuit-open`) instead of queueing behind a sick
//! service. The per-endpoint half (outlier ejection) is in `balance::outlier`.
//! A slot is held until the response head arrives.

use crate::http::errors::ProxyError;
use futures_util::future::{BoxFuture, Either};
use http::Request;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

pub use mesh_model::policy::LimitsConfig;

#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    slots: Arc<Semaphore>,
    pending: AtomicU32,
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            cfg,
            slots: Arc::new(Semaphore::new(cfg.max_concurrent as usize)),
            pending: AtomicU32::new(0),
        }
    }
    pub fn config(&self) -> LimitsConfig {
        self.cfg
    }
    /// Requests in flight now (for /config_dump).
    pub fn in_flight(&self) -> u32 {
        self.cfg.max_concurrent - self.slots.available_permits() as u32
    }
}

#[derive(Debug, Clone)]
pub struct LimitsLayer(pub Option<Arc<Limits>>);

impl<S> Layer<S> for LimitsLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limits: self.0.clone().filter(|l| l.cfg.max_concurrent > 0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limit<S> {
    inner: S,
    limits: Option<Arc<Limits>>,
}

/// Undoes a pending count however the wait ends (including the request being dropped).
struct Pending<'a>(&'a AtomicU32);
impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> Service<Request<B>> for Limit<S>
where
    S: Service<Request<B>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<S::Response, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(limits) = self.limits.clone() else {
            return Either::Left(self.inner.call(req));
        };
        if let Ok(permit) = limits.slots.clone().try_acquire_owned() {
            let fut = self.inner.call(req);
            return Either::Right(Box::pin(async move {
                let r = fut.await;
                drop(permit);
                r
            }));
        }
        let queued = limits
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                (p < limits.cfg.max_pending).then_some(p + 1)
            })
            .is_ok();
        if !queued {
            return Either::Right(Box::pin(std::future::ready(Err(ProxyError::CircuitOpen(
                format!(
                    "{} requests in flight and {} waiting",
                    limits.cfg.max_concurrent, limits.cfg.max_pending
                ),
            )))));
        }
        let inner = self.inner.clone();
        Either::Right(Box::pin(async move {
            let permit = {
                let _p = Pending(&limits.pending);
                limits.slots.clone().acquire_owned().await
            };
            let Ok(permit) = permit else {
                return Err(ProxyError::CircuitOpen("limits closed".into()));
            };
            let r = inner.oneshot(req).await;
            drop(permit);
            r
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn queues_up_to_max_pending_then_opens() {
        let svc = tower::service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, ProxyError>("ok")
        });
        let limits = Arc::new(Limits::new(LimitsConfig {
            max_concurrent: 2,
            max_pending: 1,
        }));
        let svc = LimitsLayer(Some(limits.clone())).layer(svc);
        let calls: Vec<_> = (0..4)
            .map(|_| tokio::spawn(svc.clone().oneshot(Request::new(()))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(limits.in_flight(), 2);
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.unwrap());
        }
        // Two ran, one waited for a slot and ran, one found the breaker open.
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
        assert!(matches!(results[3], Err(ProxyError::CircuitOpen(_))));
        assert_eq!(limits.pending.load(Ordering::Relaxed), 0);
        assert_eq!(limits.in_flight(), 0);
    }
}
