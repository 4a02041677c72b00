//! Request framing the proxy refuses before anything else sees the request, and the shape a
//! request takes for an origin server (the app).
//!
//! An intermediary that lets an ambiguous request through lets the next hop read it another
//! way (request smuggling, routing by one Host while the app reads another), so each case RFC
//! 9112 §3.2 / §6.3 and RFC 9113 §8.3.1 names is answered 400 and the connection closed.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Uri, Version};

/// Why a request's framing is refused, if it is.
pub fn malformed<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    let mut hosts = h.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        // RFC 9112 §3.2: more than one Host field line.
        return Some("more than one Host header");
    }
    if let Some(v) = host
        && !valid_host(v)
    {
        return Some("invalid Host header");
    }
    match req.version() {
        Version::HTTP_11 if host.is_none() => {
            // RFC 9112 §3.2: an HTTP/1.1 request lacking Host.
            return Some("HTTP/1.1 request without a Host header");
        }
        Version::HTTP_2 | Version::HTTP_3 => {
            // RFC 9113 §8.3.1: a Host that names another entity than :authority.
            if let (Some(v), Some(a)) = (host, req.uri().authority())
                && !v.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
            {
                return Some("Host differs from :authority");
            }
        }
        _ => {}
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        if req.version() < Version::HTTP_11 {
            // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
            return Some("Transfer-Encoding in an HTTP/1.0 request");
        }
        if h.contains_key(header::CONTENT_LENGTH) {
            // RFC 9112 §6.3 (3): both at once is the classic smuggling vector.
            return Some("both Transfer-Encoding and Content-Length");
        }
    }
    None
}

/// A Host value is an authority (host and optional port), without userinfo (RFC 9110 §7.2).
fn valid_host(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && !b.contains(&b'@')
        && http::uri::Authority::try_from(b).is_ok_and(|a| a.as_str().len() == b.len())
}

/// The authority a request names: its URI's (absolute-form, or HTTP/2 `:authority`), which
/// wins over Host (RFC 9112 §3.2.2), else its Host header.
pub fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(a) => Some(a.as_str()),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    }
}

/// Shapes a request head for an origin server, as a direct caller would have sent it:
/// HTTP/1.1 gets the origin-form target and exactly one Host naming the authority (RFC 9112
/// §3.2); HTTP/2 gets `:scheme`, `:authority` and `:path` and no Host (RFC 9113 §8.3.1).
/// A request that names no authority at all is sent for `localhost`.
pub fn for_origin(parts: &mut http::request::Parts, h1: bool) -> Result<(), http::Error> {
    if h1 {
        if let Some(a) = parts.uri.authority() {
            // Absolute-form, or HTTP/2's :authority: it replaces any Host.
            let v = HeaderValue::from_str(a.as_str())?;
            parts.headers.insert(header::HOST, v);
        } else if !parts.headers.contains_key(header::HOST) {
            parts
                .headers
                .insert(header::HOST, HeaderValue::from_static("localhost"));
        }
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = match parts.uri.path_and_query() {
                Some(pq) => Uri::from(pq.clone()),
                None => Uri::from_static("/"),
            };
        }
        parts.version = Version::HTTP_11;
    } else {
        let uri = std::mem::take(&mut parts.uri);
        let host = parts.headers.remove(header::HOST);
        let named = match uri.authority() {
            Some(_) => None,
            None => host.as_ref().and_then(|h| h.to_str().ok()),
        };
        parts.uri = super::absolute_uri(named, uri)?;
        parts.version = Version::HTTP_2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        use Version as V;
        let h11 = V::HTTP_11;
        for (r, why) in [
            (
                req(h11, "/", &[("host", "a"), ("host", "b")]),
                "more than one Host header",
            ),
            (
                req(h11, "/", &[("host", "a"), ("host", "a")]),
                "more than one Host header",
            ),
            (req(h11, "/", &[]), "HTTP/1.1 request without a Host header"),
            (req(h11, "/", &[("host", "u@a")]), "invalid Host header"),
            (req(h11, "/", &[("host", "a b")]), "invalid Host header"),
            (req(h11, "/", &[("host", "")]), "invalid Host header"),
            (
                req(V::HTTP_2, "http://a/", &[("host", "b")]),
                "Host differs from :authority",
            ),
            (
                req(
                    h11,
                    "/",
                    &[
                        ("host", "a"),
                        ("transfer-encoding", "chunked"),
                        ("content-length", "3"),
                    ],
                ),
                "both Transfer-Encoding and Content-Length",
            ),
            (
                req(V::HTTP_10, "/", &[("transfer-encoding", "chunked")]),
                "Transfer-Encoding in an HTTP/1.0 request",
            ),
        ] {
            assert_eq!(malformed(&r), Some(why), "{r:?}");
        }
        for ok in [
            req(h11, "/", &[("host", "a:8080")]),
            req(h11, "/", &[("host", "[::1]:80")]),
            req(h11, "http://a/x", &[("host", "b")]),
            req(V::HTTP_10, "/", &[]),
            req(V::HTTP_2, "http://a/", &[]),
            req(V::HTTP_2, "http://a/", &[("host", "A")]),
            req(h11, "/", &[("host", "a"), ("transfer-encoding", "chunked")]),
        ] {
            assert_eq!(malformed(&ok), None, "{ok:?}");
        }
    }

    fn shaped(r: Request<()>, h1: bool) -> http::request::Parts {
        let (mut p, ()) = r.into_parts();
        for_origin(&mut p, h1).unwrap();
        p
    }

    #[test]
    fn an_http1_origin_gets_origin_form_and_one_host() {
        let p = shaped(req(Version::HTTP_2, "http://web:8080/a?b=1", &[]), true);
        assert_eq!(p.uri.to_string(), "/a?b=1");
        assert_eq!(p.headers[header::HOST], "web:8080");
        assert_eq!(p.version, Version::HTTP_11);
        // Absolute-form wins over a Host that says otherwise (RFC 9112 §3.2.2).
        let p = shaped(req(Version::HTTP_11, "http://a/x", &[("host", "b")]), true);
        assert_eq!(p.uri.to_string(), "/x");
        assert_eq!(p.headers.get_all(header::HOST).iter().count(), 1);
        assert_eq!(p.headers[header::HOST], "a");
        // Origin-form with Host stays as it is.
        let p = shaped(req(Version::HTTP_11, "/x", &[("host", "b")]), true);
        assert_eq!(p.uri.to_string(), "/x");
        assert_eq!(p.headers[header::HOST], "b");
        let p = shaped(req(Version::HTTP_10, "/x", &[]), true);
        assert_eq!(p.headers[header::HOST], "localhost");
        let p = shaped(req(Version::HTTP_11, "http://a", &[]), true);
        assert_eq!(p.uri.to_string(), "/");
    }

    #[test]
    fn an_http2_origin_gets_authority_and_no_host() {
        let p = shaped(req(Version::HTTP_11, "/x?y", &[("host", "web:81")]), false);
        assert_eq!(p.uri.to_string(), "http://web:81/x?y");
        assert!(!p.headers.contains_key(header::HOST));
        assert_eq!(p.version, Version::HTTP_2);
        let p = shaped(req(Version::HTTP_2, "http://a/x", &[]), false);
        assert_eq!(p.uri.to_string(), "http://a/x");
    }
}
