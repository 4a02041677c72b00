//! HTTP plumbing shared by the inbound, outbound and admin listeners.

pub mod body;
pub mod coalesce;
pub mod errors;
pub mod framing;
pub mod h2client;
pub mod router;
pub mod server;
pub mod upgrade;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::{Either, Full};

/// Errors of bodies and connections, boxed (what hyper and h2 accept).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Response body: a proxied body, or one the proxy made (errors, admin pages).
pub type Body = Either<body::RespBody, Full<Bytes>>;

/// Set by the outbound proxy when the app spoke HTTP/1.x; the inbound proxy uses it to talk
/// HTTP/1.1 to its app (the hop between sidecars is always HTTP/2).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-mesh-orig-proto");
pub const ORIG_PROTO_H1: &str = "HTTP/1.1";
/// Why the proxy answered instead of the upstream.
pub const MESH_ERROR: HeaderName = HeaderName::from_static("x-mesh-error");
/// The caller's identity, as the inbound proxy verified it (Envoy's XFCC format).
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// A gRPC call's status, in the trailers (or the head of a trailers-only answer).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// `http://<authority><path?query>`: the absolute form HTTP/2 needs (`:authority`, `:path`).
/// `authority` None keeps the URI's own (`localhost` if it has none). A URI already in that
/// form (what an HTTP/2 caller sends) is kept as it is, without parsing it again.
pub fn absolute_uri(authority: Option<&str>, uri: http::Uri) -> Result<http::Uri, http::Error> {
    let own = uri.authority().map(|a| a.as_str());
    if uri.scheme() == Some(&http::uri::Scheme::HTTP)
        && own.is_some()
        && (authority.is_none() || authority == own)
    {
        return Ok(uri);
    }
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    http::Uri::builder()
        .scheme("http")
        .authority(authority.or(own).unwrap_or("localhost"))
        .path_and_query(pq)
        .build()
}

/// A body made by the proxy.
pub fn full(b: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(b.into()))
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Nearly every request and answer has none: one pass over a few names is much cheaper
    // than the eight parsed, hashed lookups below (~2,000 instructions per request).
    if !h.iter().any(|(n, v)| is_hop_by_hop(n, v)) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        h.remove(n);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// A field `strip_hop_by_hop` removes on its own (`TE: trailers` stays; names listed in
/// `Connection` are caught through `Connection` itself).
fn is_hop_by_hop(n: &HeaderName, v: &http::HeaderValue) -> bool {
    n == header::CONNECTION
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == header::PROXY_AUTHORIZATION
        || (n == header::TE && v != "trailers")
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
}

/// True for gRPC requests (errors then go out as gRPC status, not HTTP status).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn end_to_end_fields_stay_and_hop_by_hop_ones_go() {
        let mut h = map(&[("content-type", "application/grpc"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "nothing to strip: {h:?}");

        let mut h = map(&[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic e30="),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "left: {h:?}");
        assert_eq!(h["x-kept"], "yes");

        // One hop-by-hop field alone is enough to be found.
        for name in ["keep-alive", "proxy-connection", "upgrade"] {
            let mut h = map(&[("accept", "*/*")]);
            h.insert(
                HeaderName::from_static(name),
                http::HeaderValue::from_static("x"),
            );
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept");
            assert!(h.contains_key("accept"));
        }
    }

    #[test]
    fn absolute_uri_keeps_an_absolute_one_and_completes_the_rest() {
        let abs: http::Uri = "http://web:8080/a?b=1".parse().unwrap();
        assert_eq!(absolute_uri(None, abs.clone()).unwrap(), abs);
        assert_eq!(absolute_uri(Some("web:8080"), abs.clone()).unwrap(), abs);
        // Another authority wins over the URI's own.
        assert_eq!(
            absolute_uri(Some("api"), abs).unwrap().to_string(),
            "http://api/a?b=1"
        );
        let origin: http::Uri = "/x?y".parse().unwrap();
        assert_eq!(
            absolute_uri(Some("web"), origin.clone())
                .unwrap()
                .to_string(),
            "http://web/x?y"
        );
        assert_eq!(
            absolute_uri(None, origin).unwrap().to_string(),
            "http://localhost/x?y"
        );
        let https: http::Uri = "https://web/z".parse().unwrap();
        assert_eq!(
            absolute_uri(None, https).unwrap().to_string(),
            "http://web/z"
        );
    }
}
