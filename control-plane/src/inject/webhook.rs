//! The mutating admission webhook: `POST /inject` with an `admission.k8s.io/v1`
//! AdmissionReview, answered with the same review carrying a JSONPatch (RFC 6902) computed as
//! the difference between the pod and its injected form. Served over HTTPS on `--webhook-addr`
//! with the control plane's certificate (its CA bundle goes in the webhook configuration).

use super::{InjectConfig, Outcome, inject_pod};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest review accepted (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
const API_VERSION: &str = "admission.k8s.io/v1";

/// A request that is not an AdmissionReview we can answer: HTTP 400 with this text.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
pub struct MalformedReview(pub String);

/// Answers one AdmissionReview (the request body). Pods are injected unless they opt out or
/// already are; anything else is allowed unchanged; a pod with unusable `mesh.io/*`
/// annotations is refused with the reason.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Value, MalformedReview> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| MalformedReview(format!("bad JSON: {e}")))?;
    if review["apiVersion"] != API_VERSION || review["kind"] != "AdmissionReview" {
        return Err(MalformedReview(format!(
            "apiVersion {} kind {}",
            review["apiVersion"], review["kind"]
        )));
    }
    let req = &review["request"];
    let uid = req["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| MalformedReview("request.uid is missing".into()))?;
    let respond = |response: Value| {
        let mut r = json!({"uid": uid});
        if let (Value::Object(r), Value::Object(extra)) = (&mut r, response) {
            r.extend(extra);
        }
        json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": r})
    };
    let is_pod =
        req["kind"]["kind"] == "Pod" && req["kind"]["group"].as_str().unwrap_or("").is_empty();
    if !is_pod || req["operation"] != "CREATE" {
        return Ok(respond(json!({"allowed": true})));
    }
    let pod = &req["object"];
    if !pod.is_object() {
        return Err(MalformedReview(
            "request.object (the pod) is missing".into(),
        ));
    }
    Ok(match inject_pod(pod, cfg) {
        Ok(Outcome::Injected(new)) => {
            let patch = json_patch::diff(pod, &new);
            let bytes = serde_json::to_vec(&patch)
                .map_err(|e| MalformedReview(format!("patch encoding: {e}")))?;
            respond(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Ok(Outcome::Skipped(why)) => {
            tracing::debug!(uid, why, "pod not injected");
            respond(json!({"allowed": true}))
        }
        Err(e) => respond(json!({
            "allowed": false,
            "status": {"code": 400, "reason": "BadRequest", "message": format!("mesh injection: {e}")},
        })),
    })
}

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
