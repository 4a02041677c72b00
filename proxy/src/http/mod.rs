//! HTTP plumbing shared by the inbound, outbound and admin listeners.

pub mod body;
pub mod coalesce;
pub mod errors;
pub mod router;
pub mod server;
pub mod stack;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Response body: a proxied body, or one the proxy made (errors, admin pages).
pub type Body = Either<Incoming, Full<Bytes>>;

/// Set by the outbound proxy when the app spoke HTTP/1.x; the inbound proxy uses it to talk
/// HTTP/1.1 to its app (the hop between sidecars is always HTTP/2).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-mesh-orig-proto");
pub const ORIG_PROTO_H1: &str = "HTTP/1.1";
/// Why the proxy answered instead of the upstream.
pub const MESH_ERROR: HeaderName = HeaderName::from_static("x-mesh-error");
/// The caller's identity, as the inbound proxy verified it (Envoy's XFCC format).
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `http://<authority><path?query>`: the absolute form HTTP/2 needs (`:authority`, `:path`).
pub fn absolute_uri(authority: &str, uri: &http::Uri) -> Result<http::Uri, http::Error> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
}

/// A body made by the proxy.
pub fn full(b: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(b.into()))
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), including those named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
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

/// True for gRPC requests (errors then go out as gRPC status, not HTTP status).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}
