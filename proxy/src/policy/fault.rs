//! Fault injection for chaos testing: delay a share of requests, and answer a share with a
//! status instead of sending them. Off unless the policy sets it; each request draws on its own.

use crate::http::errors::ProxyError;
use futures_util::future::{BoxFuture, Either};
use http::Request;
use std::task::{Context, Poll};
use tower::{Layer, Service};

pub use mesh_model::policy::FaultConfig;

#[derive(Debug, Clone, Copy)]
pub struct FaultLayer(pub Option<FaultConfig>);

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner, cfg: self.0 }
    }
}

#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    cfg: Option<FaultConfig>,
}

fn hit(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

impl<S, B> Service<Request<B>> for Fault<S>
where
    S: Service<Request<B>, Error = ProxyError> + Send + 'static,
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
        let Some(cfg) = self.cfg else {
            return Either::Left(self.inner.call(req));
        };
        let delay = hit(cfg.delay_percent).then_some(cfg.delay);
        let abort = hit(cfg.abort_percent);
        if delay.is_none() && !abort {
            return Either::Left(self.inner.call(req));
        }
        let fut = (!abort).then(|| self.inner.call(req));
        Either::Right(Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            match fut {
                Some(f) => f.await,
                None => Err(ProxyError::FaultAbort(cfg.abort_status)),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::ServiceExt;

    fn ok() -> impl Service<Request<()>, Response = &'static str, Error = ProxyError, Future: Send>
    + Send
    + Clone
    + 'static {
        tower::service_fn(|_: Request<()>| async { Ok::<_, ProxyError>("ok") })
    }

    #[tokio::test(start_paused = true)]
    async fn aborts_the_configured_share() {
        fastrand::seed(7);
        let cfg = FaultConfig {
            delay: Duration::ZERO,
            delay_percent: 0.0,
            abort_status: 503,
            abort_percent: 10.0,
        };
        let svc = FaultLayer(Some(cfg)).layer(ok());
        let mut aborted = 0;
        for _ in 0..10_000 {
            if let Err(ProxyError::FaultAbort(503)) = svc.clone().oneshot(Request::new(())).await {
                aborted += 1;
            }
        }
        assert!((900..=1100).contains(&aborted), "{aborted}");
    }

    #[tokio::test(start_paused = true)]
    async fn delays_then_sends() {
        let cfg = FaultConfig {
            delay: Duration::from_millis(100),
            delay_percent: 100.0,
            abort_status: 0,
            abort_percent: 0.0,
        };
        let start = tokio::time::Instant::now();
        let r = FaultLayer(Some(cfg))
            .layer(ok())
            .oneshot(Request::new(()))
            .await;
        assert_eq!(r.unwrap(), "ok");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        let r = FaultLayer(None).layer(ok()).oneshot(Request::new(())).await;
        assert_eq!(r.unwrap(), "ok");
    }
}
