//! Timeouts: the whole request (retries included) and each attempt. The request timeout also
//! honours the client's gRPC deadline (`grpc-timeout`): the shorter of the two wins, and the
//! upstream is told the deadline that is left, so it can give up when the caller would.

use crate::http::errors::ProxyError;
use futures_util::future::{BoxFuture, Either};
use http::{HeaderMap, HeaderValue, Request};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Which timeout a layer enforces (they answer differently: see `ProxyError::Timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    PerTry,
}

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    kind: Kind,
}

impl TimeoutLayer {
    /// Whole-request timeout (and the client's grpc-timeout, even when `timeout` is None).
    pub fn request(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::Request,
        }
    }
    pub fn per_try(timeout: Option<Duration>) -> Self {
        Self {
            timeout,
            kind: Kind::PerTry,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
            kind: self.kind,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
    kind: Kind,
}

/// Parses a `grpc-timeout` value (gRPC over HTTP/2: up to 8 digits and a unit H M S m u n).
pub fn parse_grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a deadline as `grpc-timeout` (milliseconds, rounded up, at most 8 digits).
pub fn grpc_timeout_value(d: Duration) -> HeaderValue {
    let ms = d.as_nanos().div_ceil(1_000_000).min(99_999_999);
    HeaderValue::try_from(format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m"))
}

impl<S, B, R> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Response = R, Error = ProxyError> + Send,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<R, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut limit = self.timeout;
        let mut from_client = false;
        if self.kind == Kind::Request
            && let Some(client) = parse_grpc_timeout(req.headers())
            && limit.is_none_or(|t| client < t)
        {
            limit = Some(client);
            from_client = true;
        }
        let Some(after) = limit else {
            return Either::Left(self.inner.call(req));
        };
        if self.kind == Kind::Request && req.headers().contains_key(GRPC_TIMEOUT) {
            req.headers_mut()
                .insert(GRPC_TIMEOUT, grpc_timeout_value(after));
        }
        let kind = self.kind;
        let fut = self.inner.call(req);
        Either::Right(Box::pin(async move {
            match tokio::time::timeout(after, fut).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::Timeout {
                    after,
                    per_try: kind == Kind::PerTry,
                    deadline: from_client,
                }),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;
    use tower_test::mock;

    #[test]
    fn grpc_timeout_header() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("100m", Duration::from_millis(100)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("5000u", Duration::from_millis(5)),
        ] {
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(v));
            assert_eq!(parse_grpc_timeout(&h), Some(d), "{v}");
        }
        for bad in ["", "m", "10x", "123456789m", "-1m"] {
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(bad));
            assert_eq!(parse_grpc_timeout(&h), None, "{bad}");
        }
        assert_eq!(grpc_timeout_value(Duration::from_micros(1500)), "2m");
    }

    #[tokio::test(start_paused = true)]
    async fn fires_after_the_timeout_and_not_before() {
        let (svc, mut handle) = mock::pair::<Request<()>, &'static str>();
        let svc = svc.map_err(|_| ProxyError::Upstream("mock".into()));
        let mut svc = TimeoutLayer::request(Some(Duration::from_millis(200))).layer(svc);
        let start = tokio::time::Instant::now();
        let call = svc.ready().await.unwrap().call(Request::new(()));
        let (_req, _send) = handle.next_request().await.unwrap();
        let err = call.await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout { per_try: false, .. }));
        assert_eq!(start.elapsed(), Duration::from_millis(200));

        handle.allow(1);
        let call = svc.ready().await.unwrap().call(Request::new(()));
        let (_req, send) = handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        send.send_response("ok");
        assert_eq!(call.await.unwrap(), "ok");
    }

    #[tokio::test(start_paused = true)]
    async fn the_shorter_grpc_deadline_wins_and_is_propagated() {
        let (svc, mut handle) = mock::pair::<Request<()>, &'static str>();
        let svc = svc.map_err(|_| ProxyError::Upstream("mock".into()));
        let mut svc = TimeoutLayer::request(Some(Duration::from_secs(2))).layer(svc);
        let mut req = Request::new(());
        req.headers_mut()
            .insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        let start = tokio::time::Instant::now();
        let call = svc.ready().await.unwrap().call(req);
        let (seen, _send) = handle.next_request().await.unwrap();
        assert_eq!(seen.headers()[GRPC_TIMEOUT], "300m");
        let err = call.await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout { deadline: true, .. }));
        assert_eq!(start.elapsed(), Duration::from_millis(300));

        // A longer client deadline is cut to the route's, and the upstream is told so.
        handle.allow(1);
        let mut req = Request::new(());
        req.headers_mut()
            .insert(GRPC_TIMEOUT, HeaderValue::from_static("10S"));
        let _call = svc.ready().await.unwrap().call(req);
        let (seen, _send) = handle.next_request().await.unwrap();
        assert_eq!(seen.headers()[GRPC_TIMEOUT], "2000m");
    }
}
