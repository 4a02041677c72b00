//! The injection webhook's input as the API server (or anyone reaching the port) sends it: any
//! bytes must give an AdmissionReview answer or a "malformed" error, never a crash; and every
//! patch the webhook returns must apply to the pod it came with.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_inject::{InjectConfig, review::review};

fuzz_target!(|data: &[u8]| {
    let cfg = InjectConfig::default();
    let Ok(resp) = review(data, &cfg) else {
        return;
    };
    let Some(patch) = resp["response"]["patch"].as_str() else {
        return;
    };
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("the webhook's patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSONPatch");
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(data) else {
        panic!("a patch for a body that is not JSON");
    };
    let mut pod = req["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to its pod");
});
