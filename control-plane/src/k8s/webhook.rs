//! The mutating admission webhook: `POST /inject` with an `admission.k8s.io/v1`
//! AdmissionReview, answered by `mesh_inject::review` with the same review carrying a
//! JSONPatch. Served over HTTPS on `--webhook-addr` with the control plane's certificate (its
//! CA bundle goes in the webhook configuration).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use mesh_inject::InjectConfig;
use mesh_inject::review::{MAX_REVIEW_BYTES, review};
use std::sync::Arc;

/// Routes one HTTP request of the webhook port.
pub async fn handle<B>(
    req: Request<B>,
    cfg: Arc<InjectConfig>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/inject" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: POST /inject\n".into(),
        ));
    }
    if req.method() != hyper::Method::POST {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body unreadable or over {MAX_REVIEW_BYTES} bytes: {e}\n"),
            ));
        }
    };
    Ok(match review(&body, &cfg) {
        Ok(v) => {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    })
}

/// Serves the webhook on TLS connections from `incoming` (HTTP/1.1 and HTTP/2).
pub async fn serve(
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    cfg: Arc<InjectConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    loop {
        let tls = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r| handle(r, cfg.clone()));
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(error = %e, "webhook connection ended with an error");
            }
        });
    }
}
