//! OpenTelemetry spans of the mesh, shared by the proxy and the control plane: W3C trace
//! context (`traceparent`), span records made after the fact (no SDK tracer on a request path),
//! and a bounded queue to one task that exports batches over OTLP/gRPC. Sending a span never
//! waits: when the queue is full (collector slow or away) the span is dropped and counted.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;

/// Spans waiting for export; past this they are dropped.
pub const QUEUE_SPANS: usize = 4096;
/// Most spans in one export call.
pub const BATCH_SPANS: usize = 512;
/// Time one export call may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// A W3C trace context: which trace, which span, sampled or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` header (version 00): `00-<32 hex>-<16 hex>-<2 hex>`. Invalid or
    /// all-zero ids give None (the request then starts a new trace).
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (ver, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ver.len() != 2
            || ver == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// A span begun: its context (to propagate) and where it hangs in its trace.
#[derive(Debug, Clone)]
pub struct Span {
    pub context: TraceContext,
    pub parent_span_id: Option<u64>,
    pub start: SystemTime,
}

impl Span {
    /// A child of `parent` (the caller's context), or the root of a new trace. A new trace is
    /// sampled with probability `sampling`; a child follows its parent's decision.
    pub fn begin(parent: Option<TraceContext>, sampling: f64) -> Self {
        let span_id = nonzero_u64();
        let context = match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                sampled: p.sampled,
            },
            None => TraceContext {
                trace_id: (u128::from(nonzero_u64()) << 64) | u128::from(fastrand::u64(..)),
                span_id,
                sampled: sampling >= 1.0 || fastrand::f64() < sampling,
            },
        };
        Self {
            context,
            parent_span_id: parent.map(|p| p.span_id),
            start: SystemTime::now(),
        }
    }
}

/// Queues finished spans for export.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<SpanData>,
    dropped: AtomicU64,
    scope: InstrumentationScope,
}

impl Exporter {
    /// Starts the export task to the OTLP/gRPC collector at `endpoint` (e.g.
    /// `http://127.0.0.1:4317`), naming the process `service_name` with `resource` attributes.
    /// Needs a tokio runtime. The collector may be down: export is retried with the next batch.
    pub fn start(
        endpoint: &str,
        service_name: &'static str,
        resource: Vec<KeyValue>,
    ) -> Result<Self, OtelError> {
        use opentelemetry_otlp::WithExportConfig;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| OtelError::Exporter(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(service_name)
                .with_attributes(resource)
                .build(),
        );
        let (tx, mut rx) = mpsc::channel::<SpanData>(QUEUE_SPANS);
        tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH_SPANS {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
                let n = batch.len();
                match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
                    Ok(Ok(())) => failures = 0,
                    Ok(Err(e)) => {
                        failures += 1;
                        // Once per run of failures at info; the rest at debug.
                        if failures == 1 {
                            tracing::info!(error = %e, spans = n, "span export failed; spans dropped");
                        } else {
                            tracing::debug!(error = %e, spans = n, "span export failed");
                        }
                    }
                    Err(_) => tracing::info!(spans = n, "span export timed out; spans dropped"),
                }
            }
        });
        Ok(Self {
            tx,
            dropped: AtomicU64::new(0),
            scope: InstrumentationScope::builder(service_name)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    /// Ends `span` and queues it if its trace is sampled (never waits).
    pub fn end(
        &self,
        span: &Span,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        if !span.context.sampled {
            return;
        }
        let c = span.context;
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(c.trace_id.to_be_bytes()),
                SpanId::from_bytes(c.span_id.to_be_bytes()),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: span
                .parent_span_id
                .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
            parent_span_is_remote: span.parent_span_id.is_some(),
            span_kind: kind,
            name: name.into(),
            start_time: span.start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match error {
                Some(description) => Status::Error {
                    description: description.into(),
                },
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        };
        if self.tx.try_send(data).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_bad_input() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(h).expect("valid");
        assert_eq!(c.header(), h);
        assert!(c.sampled);
        assert!(!TraceContext::parse(&h.replace("-01", "-00")).is_some_and(|c| c.sampled));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn children_keep_the_trace_and_its_sampling_roots_follow_the_rate() {
        let parent = TraceContext {
            trace_id: 7,
            span_id: 9,
            sampled: false,
        };
        let s = Span::begin(Some(parent), 1.0);
        assert_eq!(s.context.trace_id, 7);
        assert_eq!(s.parent_span_id, Some(9));
        assert_ne!(s.context.span_id, 9);
        assert!(!s.context.sampled, "the parent's decision wins");
        assert!(Span::begin(None, 1.0).context.sampled);
        assert!(!Span::begin(None, 0.0).context.sampled);
        let sampled = (0..1000)
            .filter(|_| Span::begin(None, 0.25).context.sampled)
            .count();
        assert!((150..350).contains(&sampled), "{sampled}");
    }
}
