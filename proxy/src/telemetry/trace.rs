//! Request spans (OpenTelemetry, exported over OTLP with `--otlp-endpoint` or the standard
//! `OTEL_*` variables): each proxy a
//! request crosses makes one span, a client span outbound and a server span inbound, joining the
//! caller's W3C `traceparent` trace (or starting one, sampled at `--trace-sampling`) and passing
//! its own span on as the next hop's parent. Spans are queued, never awaited (`mesh_otel`).

use super::Detail;
use super::metrics::{Direction, Outcome};
use crate::http::errors::REASONS;
use mesh_otel::{Attribute, Exporter, Kind, Span, TraceContext};
use std::sync::OnceLock;

struct Tracer {
    exporter: Exporter,
    sampling: f64,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Starts exporting (once per process). The resource is the workload: `service.name` its
/// service (or what `OTEL_SERVICE_NAME` says), `service.namespace`, the node as
/// `service.instance.id`, and its identity.
pub fn start(
    settings: &mesh_otel::ExportSettings,
    sampling: f64,
    node_id: &str,
    identity: &str,
    namespace: &str,
) -> Result<(), mesh_otel::OtelError> {
    let exporter = Exporter::start(
        settings,
        vec![
            Attribute::new("service.namespace", namespace.to_string()),
            Attribute::new("service.instance.id", node_id.to_string()),
            Attribute::new("mesh.identity", identity.to_string()),
        ],
    )?;
    let _ = TRACER.set(Tracer { exporter, sampling });
    Ok(())
}

pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Spans dropped because the export queue was full.
pub fn dropped() -> u64 {
    TRACER.get().map_or(0, |t| t.exporter.dropped())
}

/// This hop's span for a request whose `traceparent` was `parent` (None when tracing is off).
pub fn begin(parent: Option<&http::HeaderValue>) -> Option<Span> {
    let t = TRACER.get()?;
    let parent = parent
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    Some(Span::begin(parent, t.sampling))
}

/// Ends the span of a finished request.
pub fn end(span: &Span, d: &Detail, o: &Outcome) {
    let Some(t) = TRACER.get() else { return };
    if !span.context.sampled {
        return;
    }
    let kind = match d.direction {
        Direction::Inbound => Kind::Server,
        Direction::Outbound => Kind::Client,
    };
    let mut attrs = vec![
        Attribute::new("mesh.direction", d.direction.as_str()),
        Attribute::new("http.request.method", d.method.to_string()),
        Attribute::new("url.path", d.path.clone()),
        Attribute::new("server.address", d.authority.clone()),
        Attribute::new("http.response.status_code", i64::from(o.status)),
        Attribute::new("mesh.service", d.service.to_string()),
        Attribute::new("mesh.route", d.route.to_string()),
        Attribute::new("mesh.peer_identity", d.peer.to_string()),
    ];
    if let Some(v) = &d.version {
        attrs.push(Attribute::new("mesh.backend_version", v.to_string()));
    }
    if let Some(u) = d.upstream {
        attrs.push(Attribute::new("network.peer.address", u.to_string()));
    }
    if let Some(tried) = &d.tried {
        attrs.push(Attribute::new(
            "mesh.attempts",
            tried.attempts().len() as i64,
        ));
    }
    if let Some(g) = o.grpc.filter(|g| *g != u16::MAX) {
        attrs.push(Attribute::new("rpc.grpc.status_code", i64::from(g)));
    }
    let reason = o.error.map(|i| REASONS.get(i).copied().unwrap_or("other"));
    if let Some(r) = reason {
        attrs.push(Attribute::new("mesh.error", r));
    }
    let error = reason
        .map(str::to_string)
        .or_else(|| (o.status >= 500).then(|| format!("status {}", o.status)));
    let name = format!("{} {} {}", d.direction.as_str(), d.method, d.service);
    t.exporter.end(span, name, kind, attrs, error);
    // A retried request: each attempt is a span of its own under this hop's, saying where it
    // went and how it ended.
    let attempts = d.tried.as_ref().map(|t| t.attempts()).unwrap_or_default();
    if attempts.len() > 1 {
        for (i, a) in attempts.iter().enumerate() {
            let Some((end, outcome)) = &a.end else {
                continue;
            };
            let mut attrs = vec![
                Attribute::new("mesh.attempt", i as i64 + 1),
                Attribute::new("network.peer.address", a.addr.to_string()),
                Attribute::new("mesh.endpoint", a.id.to_string()),
                Attribute::new("mesh.service", d.service.to_string()),
            ];
            if let Some(v) = &a.version {
                attrs.push(Attribute::new("mesh.backend_version", v.to_string()));
            }
            let error = match outcome {
                Ok(status) => {
                    attrs.push(Attribute::new(
                        "http.response.status_code",
                        i64::from(*status),
                    ));
                    (*status >= 500).then(|| format!("status {status}"))
                }
                Err(why) => Some(why.clone()),
            };
            let name = format!("attempt {} {} {}", i + 1, d.method, d.service);
            t.exporter
                .end_at(&span.child(a.start), name, Kind::Client, attrs, error, *end);
        }
    }
}
