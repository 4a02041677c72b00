//! The bottom of the outbound stack: pick an endpoint (balancer), take the pooled mTLS HTTP/2
//! connection to its sidecar, send, and tell the balancer how it went (latency for EWMA,
//! success or failure for outlier ejection).

use super::pool::{Pool, Sender};
use crate::balance::outlier::OutlierConfig;
use crate::balance::{Balancer, LbConfig, PickError, Picked, Tried, hash_bytes};
use crate::http::body::ReqBody;
use crate::http::errors::ProxyError;
use crate::telemetry::Answered;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// What the endpoint service needs of a service's config (no back-reference to the service).
#[derive(Clone)]
pub struct EndpointService {
    pub service: Arc<str>,
    pub identity: Arc<str>,
    pub balancer: Arc<Balancer>,
    pub lb: Arc<LbConfig>,
    pub outlier: Option<Arc<OutlierConfig>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool: Arc<Pool>,
    /// The service's cumulative ejection counter (`/metrics`; set with `outlier`).
    pub ejections: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for EndpointService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointService")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// True when hyper says the request provably never reached the peer: returned unsent, or
/// refused by the peer with REFUSED_STREAM or a GOAWAY that did not cover its stream.
fn never_processed(e: &hyper::Error) -> bool {
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || h2.is_go_away();
        }
        src = s.source();
    }
    false
}

/// Extra attempts, on other endpoints, for a request that was never handed to a connection
/// (the endpoint refused the connection, or hyper gave the request back unsent). Always safe,
/// policy or not: this is what keeps a rolling update free of errors.
const TRANSPARENT_RETRIES: usize = 2;

impl EndpointService {
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
        if picked.finish(ok, &self.balancer, self.outlier.as_deref())
            && let Some(n) = &self.ejections
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A ready connection to `addr` (one fresh attempt if the pooled one just closed).
    async fn connect(&self, addr: SocketAddr) -> Result<Sender, ProxyError> {
        let get = || {
            self.pool.get(
                addr,
                &self.identity,
                self.connect_timeout,
                self.idle_timeout,
            )
        };
        let mut sender = get().await?;
        if sender.ready().await.is_err() {
            self.pool.evict(addr, &self.identity);
            sender = get().await?;
        }
        Ok(sender)
    }

    async fn send(self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, ProxyError> {
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
            let mut sender = match self.connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    self.finish(picked, false);
                    if attempt < TRANSPARENT_RETRIES {
                        attempt += 1;
                        avoid.push(addr);
                        tracing::debug!(%addr, error = %e, "connect failed; trying another endpoint");
                        continue;
                    }
                    return Err(e);
                }
            };
            match sender.try_send_request(req).await {
                Ok(mut resp) => {
                    let ok = !resp.status().is_server_error();
                    let version = picked.version.clone();
                    self.finish(picked, ok);
                    resp.extensions_mut().insert(Answered { version, addr });
                    return Ok(resp);
                }
                Err(mut e) => {
                    self.finish(picked, false);
                    let unsent = e.take_message();
                    let e = e.into_error();
                    if e.is_closed() || e.is_canceled() {
                        self.pool.evict(addr, &self.identity);
                    }
                    match unsent {
                        Some(r) if attempt < TRANSPARENT_RETRIES => {
                            attempt += 1;
                            avoid.push(addr);
                            req = r;
                            continue;
                        }
                        unsent => {
                            let what = format!("{id} ({addr}): {e}");
                            return Err(if unsent.is_some() || never_processed(&e) {
                                ProxyError::Refused(what)
                            } else {
                                ProxyError::Upstream(what)
                            });
                        }
                    }
                }
            }
        }
    }
}

impl tower::Service<Request<ReqBody>> for EndpointService {
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}
