//! The bottom of the outbound stack: pick an endpoint (balancer), take the pooled mTLS HTTP/2
//! connection to its sidecar, send, and tell the balancer how it went (latency for EWMA,
//! success or failure for outlier ejection).

use super::pool::{Pool, Sender};
use crate::balance::outlier::OutlierConfig;
use crate::balance::{
    Balancer, GrpcPending, Judge, LbConfig, PickError, Picked, Tried, Verdict, hash_bytes,
};
use crate::http::body::Resend;
use crate::http::body::{ReqBody, RespBody};
use crate::http::errors::ProxyError;
use crate::http::h2client::{SendError, never_processed};
use crate::policy::GrpcFailures;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// The endpoint service: one shared [`Endpoint`], so that the per-request clones of the stack
/// (and the one each call takes) cost one reference count, not one per field.
#[derive(Clone, Debug)]
pub struct EndpointService(pub Arc<Endpoint>);

/// What the endpoint service needs of a service's config (no back-reference to the service).
pub struct Endpoint {
    pub service: Arc<str>,
    pub identity: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub lb: LbConfig,
    pub outlier: Option<OutlierConfig>,
    /// Which gRPC statuses fail an attempt.
    pub grpc_failures: GrpcFailures,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool: Arc<Pool>,
    /// The service's cumulative ejection counter (`/metrics`; set with `outlier`).
    pub ejections: Option<Arc<AtomicU64>>,
    /// A service outside the mesh: its addresses are reached by its own TLS (or plaintext).
    pub external: Option<Arc<super::external::External>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Extra attempts, on other endpoints, for a request that was never handed to a connection
/// (the endpoint refused the connection, or its connection gave the request back unsent) or
/// that the peer provably never processed (REFUSED_STREAM, a GOAWAY below its stream). Always
/// safe, policy or not: this is what keeps a rolling update free of errors.
const TRANSPARENT_RETRIES: usize = 2;

impl Endpoint {
    fn pick(&self, hash: Option<u64>, avoid: &[SocketAddr]) -> Result<Picked, ProxyError> {
        self.balancer
            .pick(&self.lb, hash, avoid)
            .map_err(|e| match e {
                PickError::NoEndpoints => ProxyError::NoEndpoints(self.service.to_string()),
                PickError::AllEjected => ProxyError::CircuitOpen(format!(
                    "every endpoint of {:?} is ejected",
                    self.service
                )),
            })
    }

    /// Tells the balancer (and outlier detection) how the attempt went.
    fn finish(&self, picked: Picked, ok: bool) {
        if picked.finish(ok, &self.balancer, self.outlier.as_ref())
            && let Some(n) = &self.ejections
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Judges an answer by its head: a 5xx fails; a gRPC answer is judged by its grpc-status,
    /// in the head of a trailers-only answer, or else in the trailers (the verdict is then
    /// left to the body, returned here).
    fn judge_head<B>(self: &Arc<Self>, resp: &Response<B>, picked: Picked) -> Option<GrpcPending> {
        if resp.status() == http::StatusCode::TOO_MANY_REQUESTS {
            picked.refused();
            return None;
        }
        if resp.status().is_server_error() || !crate::http::is_grpc(resp.headers()) {
            self.finish(picked, !resp.status().is_server_error());
            return None;
        }
        let head_status = resp
            .headers()
            .get(crate::http::GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match head_status {
            Some(code) => {
                self.finish(picked, !self.grpc_failures.failed(Some(code)));
                None
            }
            None => Some(GrpcPending {
                verdict: picked.head_only(),
                judge: self.clone(),
            }),
        }
    }

    /// An attempt that got no answer: the balancer and outlier detection are told, and so is
    /// the request's record of attempts (`why` is made only when there is one).
    fn failed(&self, picked: Picked, tried: Option<&Tried>, why: impl FnOnce() -> String) {
        self.finish(picked, false);
        if let Some(t) = tried {
            t.ended(Err(why()));
        }
    }

    /// The pooled connection to `addr` (whose certificate names `identity`), or a new one.
    async fn connect(&self, addr: SocketAddr, identity: &Arc<str>) -> Result<Sender, ProxyError> {
        self.pool
            .get(addr, identity, self.connect_timeout, self.idle_timeout)
            .await
    }

    async fn send(
        self: Arc<Self>,
        mut req: Request<ReqBody>,
    ) -> Result<Response<RespBody>, ProxyError> {
        // Kept to go again, on another endpoint, if a peer that may leave streams unprocessed
        // (not a mesh sidecar) says with its GOAWAY or REFUSED_STREAM that it never processed
        // the stream.
        let mut resend: Option<Resend> = None;
        let hash = self
            .lb
            .hash_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
            .map(|v| hash_bytes(v.as_bytes()));
        let tried = req.extensions_mut().remove::<Tried>();
        let mut avoid = tried.as_ref().map(Tried::list).unwrap_or_default();
        let mut attempt = 0;
        loop {
            let picked = self.pick(hash, &avoid)?;
            if let Some(t) = &tried {
                t.push(&picked);
            }
            let (addr, id) = (picked.addr, picked.id.clone());
            if let Some(x) = &self.external {
                // Rare, and boxed so that a mesh request's future does not grow by it.
                return Box::pin(self.send_external(x, picked, tried, req)).await;
            }
            let sender = match self
                .connect(addr, picked.answered.identity_or(&self.identity))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.failed(picked, tried.as_ref(), || e.to_string());
                    if attempt < TRANSPARENT_RETRIES {
                        attempt += 1;
                        avoid.push(addr);
                        tracing::debug!(%addr, error = %e, "connect failed; trying another endpoint");
                        continue;
                    }
                    return Err(e);
                }
            };
            if sender.may_leave_unprocessed && resend.is_none() {
                let (kept, copy) = Resend::keep(req);
                (req, resend) = (kept, Some(copy));
            }
            match sender.send(req).await {
                Ok(resp) => {
                    if let Some(t) = &tried {
                        t.ended(Ok(resp.status().as_u16()));
                    }
                    let answered = picked.answered.clone();
                    let pending = self.judge_head(&resp, picked);
                    return Ok(resp.map(|mut b| {
                        b.set_answered(answered);
                        if let Some(p) = pending {
                            b.set_pending(p);
                        }
                        RespBody::Right(b)
                    }));
                }
                Err(SendError::Unsent(r, e)) => {
                    // The connection is closed or going away: the next request opens another.
                    self.pool
                        .evict(addr, picked.answered.identity_or(&self.identity));
                    self.failed(picked, tried.as_ref(), || format!("not sent: {e}"));
                    if attempt < TRANSPARENT_RETRIES {
                        attempt += 1;
                        avoid.push(addr);
                        tracing::debug!(%addr, error = %e, "connection gave the request back; trying again");
                        req = *r;
                        continue;
                    }
                    return Err(ProxyError::Refused(format!("{id} ({addr}): {e}")));
                }
                Err(SendError::Failed(e)) => {
                    if e.is_go_away() || e.is_io() {
                        self.pool
                            .evict(addr, picked.answered.identity_or(&self.identity));
                    }
                    self.failed(picked, tried.as_ref(), || e.to_string());
                    let what = format!("{id} ({addr}): {e}");
                    if !never_processed(&e) {
                        return Err(ProxyError::Upstream(what));
                    }
                    if attempt < TRANSPARENT_RETRIES
                        && let Some(again) = resend.as_ref().and_then(Resend::again)
                    {
                        attempt += 1;
                        avoid.push(addr);
                        tracing::debug!(%addr, error = %e, "the peer did not process the stream; sent again");
                        req = again;
                        continue;
                    }
                    return Err(ProxyError::Refused(what));
                }
            }
        }
    }
}

impl Endpoint {
    /// One attempt to an external service's address (hyper's client retries a request its
    /// pooled connection gave back unsent; the policy's retries do the rest).
    async fn send_external(
        self: &Arc<Self>,
        x: &super::external::External,
        picked: Picked,
        tried: Option<Tried>,
        req: Request<ReqBody>,
    ) -> Result<Response<RespBody>, ProxyError> {
        match x.send(picked.addr, self.connect_timeout, req).await {
            Ok(resp) => {
                if let Some(t) = &tried {
                    t.ended(Ok(resp.status().as_u16()));
                }
                // The verdict is the head's: an external answer's body is not watched for
                // trailers.
                if resp.status() == http::StatusCode::TOO_MANY_REQUESTS {
                    picked.refused();
                } else {
                    self.finish(picked, !resp.status().is_server_error());
                }
                Ok(resp.map(RespBody::Left))
            }
            Err(e) => {
                self.failed(picked, tried.as_ref(), || e.to_string());
                Err(e)
            }
        }
    }
}

impl Judge for Endpoint {
    fn judge(&self, v: Verdict, status: Option<u16>) {
        let success = !self.grpc_failures.failed(status);
        if v.finish(success, &self.balancer, self.outlier.as_ref())
            && let Some(n) = &self.ejections
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl tower::Service<Request<ReqBody>> for EndpointService {
    type Response = Response<RespBody>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<RespBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        Box::pin(self.0.clone().send(req))
    }
}
