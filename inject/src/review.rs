//! The AdmissionReview exchange of the mutating webhook, as a pure function: an
//! `admission.k8s.io/v1` AdmissionReview in, the same review with a JSONPatch (RFC 6902) out,
//! computed as the difference between the pod and its injected form. The control plane serves
//! it over HTTPS.

use super::{InjectConfig, Outcome, inject_pod};
use base64::Engine;
use serde_json::{Value, json};

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
