//! What the proxy tells about the requests it carries: Prometheus metrics (`metrics`), the
//! golden-metric reports to the control plane (`report`), and the per-request observation that
//! feeds them. A request is observed from its start until its response body ends (or is
//! dropped): the response body is wrapped in `ObservedBody`, which sees the bytes, the gRPC
//! status in trailers, and the end, and records once.

pub mod metrics;
pub mod report;

pub use report::TelemetryReporter;

use crate::http::errors::reason_index;
use crate::http::{Body, MESH_ERROR};
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Frame, SizeHint};
use metrics::{Outcome, RequestMetrics, TargetMetrics};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Which endpoint answered a request: put in the response's extensions by the endpoint service.
#[derive(Debug, Clone)]
pub struct Answered {
    pub version: Option<Arc<str>>,
    pub addr: SocketAddr,
}

/// Where a request's counters are: fixed (inbound: per connection) or chosen by the version
/// that answered (outbound: per route target).
#[derive(Debug, Clone)]
pub enum Counters {
    Fixed(Arc<RequestMetrics>),
    Target(Arc<TargetMetrics>),
}

/// One request under observation.
#[derive(Debug)]
pub struct Observation {
    start: Instant,
    counters: Option<Counters>,
}

impl Observation {
    pub fn start(counters: Option<Counters>) -> Self {
        Self {
            start: Instant::now(),
            counters,
        }
    }

    pub fn set_counters(&mut self, c: Counters) {
        self.counters = Some(c);
    }

    /// Wraps the response: from here the body's end records the request.
    pub fn finish(self, resp: Response<Body>) -> Response<ObservedBody> {
        let version = resp
            .extensions()
            .get::<Answered>()
            .and_then(|a| a.version.as_ref());
        let counters = match &self.counters {
            Some(Counters::Fixed(m)) => Some(m.clone()),
            Some(Counters::Target(t)) => t.get(version).cloned(),
            None => None,
        };
        let h = resp.headers();
        let outcome = Outcome {
            status: resp.status().as_u16(),
            grpc: grpc_status(h),
            error: h.get(MESH_ERROR).map(|v| reason_index(v.as_bytes())),
            ..Outcome::default()
        };
        let grpc = crate::http::is_grpc(h);
        resp.map(|inner| ObservedBody {
            inner,
            pending: counters.map(|counters| Pending {
                start: self.start,
                counters,
                outcome,
                grpc,
            }),
        })
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[derive(Debug)]
struct Pending {
    start: Instant,
    counters: Arc<RequestMetrics>,
    outcome: Outcome,
    grpc: bool,
}

impl Pending {
    fn record(mut self) {
        self.outcome.latency = self.start.elapsed();
        if self.grpc && self.outcome.grpc.is_none() {
            // The stream ended without a status: the client went away or the peer reset.
            self.outcome.grpc = Some(u16::MAX);
        }
        self.counters.record(&self.outcome);
    }
}

/// The response body on its way to the client; records the request when it ends.
#[derive(Debug)]
pub struct ObservedBody {
    inner: Body,
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
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
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
