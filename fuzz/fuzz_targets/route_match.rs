//! Route rules from config (built by `mesh-model`, as the control plane admits and the proxy
//! converts them) plus a request from a client: the first two bytes give the length
//! of an encoded `Route`; the rest is `METHOD URI` then `name: value` header lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
    let (route, request) = data[2..].split_at(n);
    let Ok(route) = mesh_proto::v1::Route::decode(route) else {
        return;
    };
    let Ok(route) = mesh_model::Route::try_from(&route) else {
        return;
    };
    let router = mesh_model::route::Router::new(route.rules);
    let text = String::from_utf8_lossy(request);
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let (method, uri) = first.split_once(' ').unwrap_or((first, "/"));
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method.as_bytes()),
        uri.parse::<http::Uri>(),
    ) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    if let Some(i) = router.route(&method, &uri, &headers) {
        assert!(i < router.rules.len());
    }
});
