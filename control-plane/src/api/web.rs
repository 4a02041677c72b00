//! The control plane's plain-HTTP port (default 127.0.0.1:15014, like istiod's monitoring
//! port): `/metrics` for Prometheus, the dashboard at `/` and its data at `/api/dashboard`,
//! and the probes: `/live` (the process answers) and `/ready` (its store answers too).
//! Read-only. The dashboard shows the whole mesh's services and traffic, so on any address but
//! loopback it needs an admin credential with the read scope (HTTP Basic with the credential as
//! password, which browsers prompt for, or `Authorization: Bearer`); `/metrics` and the probes
//! stay open for Prometheus and the kubelet.

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Time a client has to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP port serves from.
pub struct Web {
    pub metrics: prometheus_client::registry::Registry,
    pub dashboard: crate::api::dashboard::Dashboard,
    /// The root admin token, when the dashboard needs a credential (not bound to loopback).
    pub dashboard_auth: Option<Arc<str>>,
}

/// The credential a request presents: `Bearer <credential>`, or HTTP Basic with it as password.
fn presented(req: &Request<Incoming>) -> Option<String> {
    use base64::Engine;
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    let b = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .ok()?;
    let pair = String::from_utf8(raw).ok()?;
    pair.split_once(':').map(|(_, p)| p.to_string())
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

impl Web {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if let ("/" | "/api/dashboard", Some(root)) = (req.uri().path(), &self.dashboard_auth) {
            let held = presented(&req).and_then(|c| {
                crate::api::admin::scope::lookup(&self.dashboard.registry, root.as_bytes(), &c)
            });
            if !held.is_some_and(|h| h.has(crate::api::admin::scope::Scope::Read)) {
                let mut r = reply(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "the dashboard needs an admin credential with the read scope \
                     (meshctl token create --scope read), as the password\n",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static(
                        "Basic realm=\"mesh dashboard\", charset=\"UTF-8\"",
                    ),
                );
                return Ok(r);
            }
        }
        Ok(match req.uri().path() {
            "/metrics" => match crate::observe::metrics::encode(&self.metrics) {
                Ok(text) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding metrics failed: {e}\n"),
                ),
            },
            "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
            "/ready" if self.dashboard.registry.store_up() => {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
            "/ready" => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "not ready: store {} unavailable\n",
                    self.dashboard.registry.store_name()
                ),
            ),
            "/" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::api::dashboard::INDEX_HTML,
            ),
            "/api/dashboard" => reply(
                StatusCode::OK,
                "application/json",
                self.dashboard.snapshot().await.to_string(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /, /api/dashboard, /metrics, /live, /ready\n",
            ),
        })
    }

    /// Serves until `stop` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await.map(|_| ());
        };
        tokio::pin!(stopped);
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut stopped => return,
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| this.clone().handle(r));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            });
        }
    }
}
