//! The control plane's own spans (with `--otlp-endpoint` or the standard `OTEL_*` variables): one per admin API call (joining a
//! caller's `traceparent`) and one per config push to a proxy. Exported like the proxies'
//! (`mesh_otel`: queued, never awaited).

use futures_util::future::BoxFuture;
use mesh_otel::{Attribute, Exporter, Kind, Span, TraceContext};
use std::sync::OnceLock;
use std::task::{Context, Poll};

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Starts exporting (once per process), to `flag_endpoint` or where the standard `OTEL_*`
/// variables say (nothing when neither does).
pub fn start(flag_endpoint: Option<&str>) -> Result<(), mesh_otel::OtelError> {
    let env = |k: &str| std::env::var(k).ok();
    let Some(settings) =
        mesh_otel::ExportSettings::resolve(flag_endpoint, "mesh-control-plane", env)?
    else {
        return Ok(());
    };
    let e = Exporter::start(&settings, Vec::new())?;
    let _ = EXPORTER.set(e);
    Ok(())
}

/// Records a config push to `node` (no-op when tracing is off).
pub fn push(span: Option<Span>, node: &str, revision: u64, resources: usize, removed: usize) {
    let (Some(e), Some(span)) = (EXPORTER.get(), span) else {
        return;
    };
    e.end(
        &span,
        "push",
        Kind::Producer,
        vec![
            Attribute::new("mesh.node_id", node.to_string()),
            Attribute::new("mesh.revision", revision as i64),
            Attribute::new("mesh.resources", resources as i64),
            Attribute::new("mesh.removed", removed as i64),
        ],
        None,
    );
}

/// A span begun now, when tracing is on.
pub fn begin() -> Option<Span> {
    EXPORTER.get().map(|_| Span::begin(None, 1.0))
}

/// Wraps the admin gRPC server: one server span per call.
#[derive(Clone, Debug)]
pub struct Traced<S>(pub S);

impl<S, B, RB> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(e) = EXPORTER.get() else {
            return Box::pin(self.0.call(req));
        };
        let parent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let span = Span::begin(parent, 1.0);
        let method = req.uri().path().to_string();
        let fut = self.0.call(req);
        Box::pin(async move {
            let r = fut.await;
            // An error answer is trailers-only: its grpc-status is in the headers.
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            let error = (code != 0).then(|| format!("grpc-status {code}"));
            e.end(
                &span,
                format!("admin {method}"),
                Kind::Server,
                vec![
                    Attribute::new("rpc.system", "grpc"),
                    Attribute::new("rpc.method", method),
                    Attribute::new("rpc.grpc.status_code", code),
                ],
                error,
            );
            r
        })
    }
}
