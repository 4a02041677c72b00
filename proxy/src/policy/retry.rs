//! Retries: a bounded number of attempts on the conditions the policy names, with exponential
//! backoff and full jitter, inside a budget (retries ≤ a share of recent requests plus a floor)
//! so that retries never multiply an outage.
//!
//! Idempotency: a request that provably never reached the upstream (connect failure, TLS
//! failure, REFUSED_STREAM, GOAWAY past its stream) may always be retried. Otherwise only
//! idempotent methods are retried, unless the policy opts in, the request carries an
//! `Idempotency-Key`, or it is a gRPC call failing with a gRPC code the policy lists (gRPC's own
//! retry design leaves that judgement to the service owner). Bodies are replayed from a copy
//! of at most 64 KiB (`http::body`); a larger body that was already sent is not retried.

use super::hedge::{HedgeConfig, Recent};
use crate::balance::Tried;
use crate::http::body::{ReplayBody, ReqBody};
use crate::http::errors::ProxyError;
use crate::http::{GRPC_STATUS, is_grpc};
use futures_util::future::{BoxFuture, Either};
use http::{Method, Request, Response};
use http_body::Body;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// A request that carries one may be sent again whatever its method (IETF httpapi draft).
const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

pub use mesh_model::policy::{RetryConfig, RetryOn};
/// The budget looks at this many one-second slots.
const BUDGET_WINDOW_SECS: u64 = 10;

/// Why a result may be retried, and whether the request may have reached the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Done,
    NeverSent,
    Sent,
    /// A gRPC code the policy lists: retried for gRPC calls whatever the method.
    GrpcCode,
}

/// How the policy judges one attempt's result.
fn verdict<B>(cfg: &RetryConfig, r: &Result<Response<B>, ProxyError>) -> Verdict {
    let on = &cfg.on;
    match r {
        Err(ProxyError::Connect { .. } | ProxyError::Tls { .. }) if on.connect_failure => {
            Verdict::NeverSent
        }
        Err(ProxyError::Refused(_)) if on.refused_stream || on.connect_failure => {
            Verdict::NeverSent
        }
        Err(ProxyError::Upstream(_)) if on.reset => Verdict::Sent,
        Err(ProxyError::Timeout { per_try: true, .. }) if on.timeout || on.any_5xx => Verdict::Sent,
        Err(_) => Verdict::Done,
        Ok(resp) => {
            let s = resp.status().as_u16();
            if (on.any_5xx && s >= 500)
                || (on.gateway_error && matches!(s, 502..=504))
                || on.statuses.contains(&s)
            {
                return Verdict::Sent;
            }
            let grpc = resp
                .headers()
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u8>().ok());
            match grpc {
                Some(c) if on.grpc_codes.contains(&c) => Verdict::GrpcCode,
                _ => Verdict::Done,
            }
        }
    }
}

/// Full jitter: uniform in [0, min(max, base · 2^(n-1))].
fn backoff(cfg: &RetryConfig, retry: u32) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let cap = exp.min(cfg.backoff_max);
    cap.mul_f64(fastrand::f64())
}

/// RFC 9110 §9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[derive(Debug, Default)]
struct Slot {
    sec: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Requests and retries over the last ten seconds, in one-second slots (lock-free).
#[derive(Debug)]
pub struct Budget {
    origin: Instant,
    slots: [Slot; BUDGET_WINDOW_SECS as usize],
    /// Retries granted since the budget was made (for `/metrics`).
    retried: AtomicU64,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            slots: Default::default(),
            retried: AtomicU64::new(0),
        }
    }
}

impl Budget {
    fn slot(&self) -> (u64, &Slot) {
        let sec = Instant::now()
            .saturating_duration_since(self.origin)
            .as_secs()
            + 1;
        let slot = &self.slots[(sec % BUDGET_WINDOW_SECS) as usize];
        let old = slot.sec.load(Ordering::Relaxed);
        if old != sec
            && slot
                .sec
                .compare_exchange(old, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        (sec, slot)
    }

    fn totals(&self, now: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| now - s.sec.load(Ordering::Relaxed).min(now) < BUDGET_WINDOW_SECS)
            .fold((0, 0), |(q, r), s| {
                (
                    q + s.requests.load(Ordering::Relaxed),
                    r + s.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        self.slot().1.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it has room.
    pub fn withdraw(&self, percent: f64, min_per_second: u32) -> bool {
        let (sec, slot) = self.slot();
        let (requests, retries) = self.totals(sec);
        let allowed = (requests as f64 * percent / 100.0) as u64
            + u64::from(min_per_second) * BUDGET_WINDOW_SECS;
        if retries >= allowed {
            return false;
        }
        slot.retries.fetch_add(1, Ordering::Relaxed);
        self.retried.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Retries granted since the budget was made.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// (requests, retries) in the window, for /config_dump.
    pub fn usage(&self) -> (u64, u64) {
        let (sec, _) = self.slot();
        self.totals(sec)
    }
}

/// Hedging of a rule: when, and the rule's recent answer times and hedge count.
#[derive(Debug, Clone)]
pub struct Hedging {
    pub cfg: HedgeConfig,
    pub recent: Arc<Recent>,
}

#[derive(Debug, Clone)]
pub struct RetryLayer {
    cfg: Option<Arc<RetryConfig>>,
    hedge: Option<Hedging>,
    budget: Arc<Budget>,
}

impl RetryLayer {
    /// Retries as `cfg` says, hedges as `hedge` says; with hedging alone, no retries but the
    /// budget's defaults (hedges are drawn from it).
    pub fn new(cfg: Option<RetryConfig>, hedge: Option<Hedging>, budget: Arc<Budget>) -> Self {
        let cfg = cfg
            .filter(|c| c.max_retries > 0)
            .or_else(|| hedge.as_ref().map(|_| RetryConfig::budget_only()))
            .map(Arc::new);
        Self { cfg, hedge, budget }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            cfg: self.cfg.clone(),
            hedge: self.hedge.clone(),
            budget: self.budget.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    cfg: Option<Arc<RetryConfig>>,
    hedge: Option<Hedging>,
    budget: Arc<Budget>,
}

/// One attempt, hedged: if it has not answered after the delay, a copy goes (to another
/// endpoint: both share `tried`) when `copy` can give its body and the budget has room; the
/// first answer wins, and an attempt that failed without an answer waits for the other. The
/// first attempt's time (to the winning answer) teaches the rule's p95.
#[allow(clippy::too_many_arguments)]
async fn hedged<S, RB>(
    inner: S,
    head: &http::request::Parts,
    body: ReqBody,
    copy: impl FnOnce() -> Option<ReqBody>,
    tried: &Tried,
    h: &Hedging,
    budget: &Budget,
    cfg: &RetryConfig,
) -> Result<Response<RB>, ProxyError>
where
    S: Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError> + Clone,
{
    let start = Instant::now();
    let first = inner.clone().oneshot(attempt(head, body, tried));
    tokio::pin!(first);
    let res = 'race: {
        let Some(delay) = h.recent.delay(&h.cfg) else {
            break 'race first.await;
        };
        tokio::select! {
            r = &mut first => break 'race r,
            () = tokio::time::sleep(delay) => {}
        }
        let Some(body) =
            copy().filter(|_| budget.withdraw(cfg.budget_percent, cfg.budget_min_per_second))
        else {
            break 'race first.await;
        };
        h.recent.hedged();
        let second = inner.oneshot(attempt(head, body, tried));
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => match r {
                Err(_) => second.await,
                ok => ok,
            },
            r = &mut second => match r {
                Err(_) => first.await,
                ok => ok,
            },
        }
    };
    h.recent.record(start.elapsed());
    res
}

/// A copy of the request head for one attempt (extensions are not copied: only `Tried`).
fn attempt(head: &http::request::Parts, body: ReqBody, tried: &Tried) -> Request<ReqBody> {
    let mut r = Request::new(body);
    *r.method_mut() = head.method.clone();
    *r.uri_mut() = head.uri.clone();
    *r.version_mut() = head.version;
    *r.headers_mut() = head.headers.clone();
    r.extensions_mut().insert(tried.clone());
    r
}

impl<S, RB> Service<Request<ReqBody>> for Retry<S>
where
    S: Service<Request<ReqBody>, Response = Response<RB>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<RB>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(cfg) = self.cfg.clone() else {
            return Either::Left(self.inner.call(req));
        };
        self.budget.deposit();
        let budget = self.budget.clone();
        let inner = self.inner.clone();
        let hedge = self.hedge.clone();
        Either::Right(Box::pin(async move {
            let grpc = is_grpc(req.headers());
            let may_resend = idempotent(req.method())
                || cfg.non_idempotent
                || req.headers().contains_key(IDEMPOTENCY_KEY);
            let (head, body) = req.into_parts();
            let replay = match body {
                ReqBody::Incoming(b) if !b.is_end_stream() => Some(ReplayBody::new(b)),
                ReqBody::Replay(b) => Some(b),
                _ => None,
            };
            let next_body = || match &replay {
                Some(r) => r.replay().map(ReqBody::Replay),
                None => Some(ReqBody::Empty),
            };
            // The debug header may have put one in already: keep it, so it sees every attempt.
            let tried = head.extensions.get::<Tried>().cloned().unwrap_or_default();
            let mut body = next_body().unwrap_or(ReqBody::Empty);
            let mut retries = 0;
            loop {
                let res = match &hedge {
                    Some(h) if may_resend => {
                        // A copy needs the whole body in hand.
                        let copy = || match &replay {
                            Some(r) if !r.complete() => None,
                            _ => next_body(),
                        };
                        hedged(inner.clone(), &head, body, copy, &tried, h, &budget, &cfg).await
                    }
                    _ => inner.clone().oneshot(attempt(&head, body, &tried)).await,
                };
                let ok = match verdict(&cfg, &res) {
                    Verdict::Done => false,
                    Verdict::NeverSent => true,
                    Verdict::Sent => may_resend,
                    Verdict::GrpcCode => may_resend || grpc,
                };
                if !ok || retries >= cfg.max_retries {
                    return res;
                }
                let Some(b) = next_body() else { return res };
                if !budget.withdraw(cfg.budget_percent, cfg.budget_min_per_second) {
                    tracing::debug!("retry budget exhausted");
                    return res;
                }
                drop(res);
                retries += 1;
                body = b;
                tokio::time::sleep(backoff(&cfg, retries)).await;
            }
        }))
    }
}

#[cfg(test)]
mod tests;
