//! What the proxy tells about the requests it carries: Prometheus metrics (`metrics`), the
//! golden-metric reports to the control plane (`report`), and the per-request observation that
//! feeds them. A request is observed from its start until its response body ends (or is
//! dropped): the response body is wrapped in `ObservedBody`, which sees the bytes, the gRPC
//! status in trailers, and the end, and records once.

pub mod access_log;
pub mod metrics;
pub mod report;
pub mod scrape;
pub mod standard;
pub mod tap;
pub mod trace;

pub use report::TelemetryReporter;

use crate::http::body::IdleTimer;
use crate::http::errors::reason_index;
use crate::http::{Body, GRPC_STATUS, MESH_ERROR};
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Frame, SizeHint};
use http_body_util::Either;
use metrics::{Direction, Outcome, RequestMetrics, TargetMetrics};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

/// Where a request's counters are: fixed (inbound: per connection) or chosen by the version
/// that answered (outbound: per route target).
#[derive(Debug, Clone)]
pub enum Counters {
    Fixed(Arc<RequestMetrics>),
    Target(Arc<TargetMetrics>),
}

/// What access logs and tap events say of a request beyond its counters; gathered only while
/// one of them is on (`Detail::wanted`).
#[derive(Debug, Clone)]
pub struct Detail {
    pub start: SystemTime,
    pub direction: Direction,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    /// The other side: the caller's identity inbound, the destination's outbound.
    pub peer: Arc<str>,
    /// The destination service (this proxy's own, inbound).
    pub service: Arc<str>,
    pub route: Arc<str>,
    pub version: Option<Arc<str>>,
    pub upstream: Option<SocketAddr>,
    pub trace_id: Option<String>,
    /// This hop's span, when tracing is on.
    pub span: Option<mesh_otel::Span>,
    /// Endpoints tried (outbound, traced requests: the span's attempt count).
    pub tried: Option<crate::balance::Tried>,
}

impl Detail {
    /// True when something will read a request's detail.
    pub fn wanted() -> bool {
        access_log::enabled() || tap::tap().active() || trace::enabled()
    }

    /// The detail of `req` as it arrives (the rest is filled in as the proxy handles it).
    pub fn of<B>(direction: Direction, req: &http::Request<B>) -> Box<Self> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
            .unwrap_or("")
            .to_string();
        let empty: Arc<str> = Arc::from("");
        let traceparent = req.headers().get(crate::http::TRACEPARENT);
        let span = trace::begin(traceparent);
        let trace_id = match &span {
            Some(s) => Some(s.context.trace_id_hex()),
            None => traceparent
                .and_then(|v| v.to_str().ok())
                .and_then(mesh_otel::TraceContext::parse)
                .map(|c| c.trace_id_hex()),
        };
        Box::new(Self {
            start: SystemTime::now(),
            direction,
            method: req.method().clone(),
            authority,
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            peer: empty.clone(),
            service: empty.clone(),
            route: empty,
            version: None,
            upstream: None,
            trace_id,
            span,
            tried: None,
        })
    }
}

/// One request under observation.
#[derive(Debug)]
pub struct Observation {
    start: Instant,
    counters: Option<Counters>,
    pub detail: Option<Box<Detail>>,
    stream_idle: Option<std::time::Duration>,
    /// The request body's size, known from its head (no body; Content-Length, which hyper
    /// holds the body to).
    request_bytes: u64,
    /// Or counted as the body streams (see [`Observation::count_request`]).
    request_counted: Option<Arc<AtomicU64>>,
}

impl Observation {
    /// `counters`: where the request counts (None: outbound, until a service is resolved; a
    /// request that ends before that counts as unresolved).
    pub fn start(counters: Option<Counters>, detail: Option<Box<Detail>>) -> Self {
        Self {
            start: Instant::now(),
            counters,
            detail,
            stream_idle: None,
            request_bytes: 0,
            request_counted: None,
        }
    }

    /// Takes note of the request body's size. Known from the head for most requests (no body,
    /// or a Content-Length), so nothing is counted per frame; otherwise (chunked, gRPC
    /// streams) returns the counter its upload adds to.
    pub fn count_request(&mut self, body: &hyper::body::Incoming) -> Option<Arc<AtomicU64>> {
        use http_body::Body as _;
        if body.is_end_stream() {
            return None;
        }
        if let Some(n) = body.size_hint().exact() {
            self.request_bytes = n;
            return None;
        }
        let c = Arc::new(AtomicU64::new(0));
        self.request_counted = Some(c.clone());
        Some(c)
    }

    /// The answer's body is ended if it moves nothing for `d` (a route's stream idle timeout).
    pub fn set_stream_idle(&mut self, d: Option<std::time::Duration>) {
        self.stream_idle = d;
    }

    pub fn set_counters(&mut self, c: Counters) {
        self.counters = Some(c);
    }

    /// Wraps the response: from here the body's end records the request.
    pub fn finish(mut self, resp: Response<Body>) -> Response<ObservedBody> {
        let answered = match resp.body() {
            Either::Left(Either::Right(h2)) => h2.answered(),
            _ => None,
        };
        let version = answered.and_then(|a| a.version.as_ref());
        if let (Some(d), Some(a)) = (self.detail.as_mut(), answered) {
            d.version = a.version.clone();
            d.upstream = Some(a.addr);
        }
        let counters = match &self.counters {
            Some(Counters::Fixed(m)) => Some(m.clone()),
            Some(Counters::Target(t)) => t.get(version).cloned(),
            // Outbound, before a service was resolved: it named none the proxy knows.
            None => Some(metrics::metrics().unresolved()),
        };
        let h = resp.headers();
        let outcome = Outcome {
            status: resp.status().as_u16(),
            grpc: grpc_status(h),
            error: h.get(MESH_ERROR).map(|v| reason_index(v.as_bytes())),
            request_bytes: self.request_bytes,
            ..Outcome::default()
        };
        let grpc = crate::http::is_grpc(h);
        let idle = self.stream_idle.map(IdleTimer::new);
        let endpoint = answered.map(|a| a.state.clone());
        resp.map(|inner| ObservedBody {
            inner,
            idle,
            pending: counters.map(|counters| Pending {
                start: self.start,
                counters,
                outcome,
                grpc,
                endpoint,
                request_counted: self.request_counted,
                detail: self.detail,
            }),
        })
    }
}

/// The gRPC status of a head or trailer block, if it carries one.
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[derive(Debug)]
struct Pending {
    start: Instant,
    counters: Arc<RequestMetrics>,
    outcome: Outcome,
    grpc: bool,
    /// The endpoint that answered (outbound), whose telemetry counts the same latency.
    endpoint: Option<Arc<crate::balance::state::EndpointState>>,
    /// The streaming request body's count so far (all of it, unless the answer ended first).
    request_counted: Option<Arc<AtomicU64>>,
    detail: Option<Box<Detail>>,
}

impl Pending {
    fn record(mut self) {
        self.outcome.latency = self.start.elapsed();
        if let Some(c) = &self.request_counted {
            self.outcome.request_bytes = c.load(std::sync::atomic::Ordering::Relaxed);
        }
        if self.grpc && self.outcome.grpc.is_none() {
            // The stream ended without a status: the client went away or the peer reset.
            self.outcome.grpc = Some(u16::MAX);
        }
        self.counters.record(&self.outcome);
        if let Some(e) = &self.endpoint {
            e.answered_in(self.outcome.latency);
        }
        let Some(d) = self.detail else { return };
        if let Some(span) = &d.span {
            trace::end(span, &d, &self.outcome);
        }
        let t = tap::tap();
        if t.wants(&d.service) {
            if access_log::enabled() {
                t.send((d.clone(), self.outcome));
            } else {
                t.send((d, self.outcome));
                return;
            }
        }
        access_log::log(d, self.outcome);
    }
}

/// The response body on its way to the client; records the request when it ends.
#[derive(Debug)]
pub struct ObservedBody {
    inner: Body,
    idle: Option<IdleTimer>,
    pending: Option<Pending>,
}

impl ObservedBody {
    fn done(&mut self) {
        if let Some(p) = self.pending.take() {
            p.record();
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if let Some(Poll::Ready(e)) = this.idle.as_mut().map(|t| t.poll_expired(cx)) {
                    tracing::debug!(error = %e, "answer body ended");
                    this.done();
                    return Poll::Ready(Some(Err(e.into())));
                }
                return Poll::Pending;
            }
            Poll::Ready(r) => {
                if let Some(t) = this.idle.as_mut() {
                    t.touch();
                }
                r
            }
        };
        match &r {
            Some(Ok(f)) => {
                if let Some(p) = this.pending.as_mut() {
                    if let Some(d) = f.data_ref() {
                        p.outcome.response_bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref() {
                        p.outcome.grpc = grpc_status(t).or(p.outcome.grpc);
                    }
                }
                if this.inner.is_end_stream() {
                    this.done();
                }
            }
            Some(Err(_)) | None => this.done(),
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
