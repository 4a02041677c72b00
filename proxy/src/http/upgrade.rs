//! HTTP/1.1 Upgrade (WebSocket, or any other token) and CONNECT through the mesh.
//!
//! An upgrade turns one request into a byte stream, so it cannot share the multiplexed HTTP/2
//! connection between sidecars: the outbound proxy carries it on a dedicated mTLS connection
//! that speaks HTTP/1.1 (ALPN `http/1.1`, which the inbound listener accepts), the inbound
//! proxy on a dedicated connection to its app. Once each hop has answered `101 Switching
//! Protocols`, the proxy copies bytes both ways until either side closes. Authorization,
//! routing and the caller's identity apply to the request that asked for the upgrade, as to
//! any other request.
//!
//! An HTTP/2 caller asks with extended CONNECT instead (RFC 8441: `:method CONNECT`,
//! `:protocol websocket`, `:path`): the outbound proxy turns it into the HTTP/1.1 upgrade
//! request the rest of the way expects (`GET`, `Upgrade`, and for WebSocket a
//! `Sec-WebSocket-Key` of its own, which RFC 8441 §5 drops), and the app's `101` into the `200`
//! that opens the caller's stream.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The `Upgrade` a request asks for, when `Connection` names it (RFC 9110 §7.8): an
/// `Upgrade` field without that is not an upgrade request and is dropped as hop-by-hop.
pub fn requested(h: &HeaderMap) -> Option<HeaderValue> {
    let up = h.get(header::UPGRADE)?;
    let named = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    named.then(|| up.clone())
}

/// Puts the upgrade fields back on a head whose hop-by-hop fields were removed: the next hop
/// must see the same request to switch protocols.
pub fn ask(h: &mut HeaderMap, upgrade: HeaderValue) {
    h.insert(header::UPGRADE, upgrade);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The `101` head passed back to the caller: the next hop's fields, hop-by-hop ones removed
/// except the two that make it a switch.
pub fn switching<B>(next: &Response<B>) -> Response<()> {
    let mut h = next.headers().clone();
    let up = h.get(header::UPGRADE).cloned();
    super::strip_hop_by_hop(&mut h);
    if let Some(up) = up {
        ask(&mut h, up);
    }
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *r.headers_mut() = h;
    r
}

/// How the caller asked to switch protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// HTTP/1.1 `Upgrade`: the next hop's `101` is passed back.
    Upgrade,
    /// Extended CONNECT (RFC 8441): a `101` reaches the caller as `200`. `own_key`: the proxy
    /// made up the `Sec-WebSocket-Key`, so the app's `Sec-WebSocket-Accept` is not passed back
    /// (a caller that sent a key of its own, as Envoy does, gets the accept value for it).
    ExtendedConnect { own_key: bool },
}

/// An extended CONNECT (RFC 8441) as the HTTP/1.1 upgrade request it stands for: the method
/// becomes GET and the `:protocol` the `Upgrade` token (returned); a WebSocket without a
/// `Sec-WebSocket-Key` (RFC 8441 §5 drops it) gets one, as RFC 6455 requires of the app's
/// side. None: not an extended CONNECT.
pub fn from_extended_connect(parts: &mut http::request::Parts) -> Option<(HeaderValue, Asked)> {
    let protocol = parts.extensions.remove::<hyper::ext::Protocol>()?;
    let up = HeaderValue::from_str(protocol.as_str()).ok()?;
    parts.method = http::Method::GET;
    let own_key = protocol.as_str().eq_ignore_ascii_case("websocket")
        && !parts.headers.contains_key(header::SEC_WEBSOCKET_KEY);
    if own_key {
        use base64::Engine as _;
        let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        if let Ok(v) = HeaderValue::from_str(&key) {
            parts.headers.insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
    Some((up, Asked::ExtendedConnect { own_key }))
}

/// The caller's side of an upgrade (or CONNECT), taken out of its request.
pub fn take(parts: &mut http::request::Parts) -> Result<OnUpgrade, super::errors::ProxyError> {
    parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
        super::errors::ProxyError::BadRequest("this connection cannot be upgraded".into())
    })
}

/// Readies an upgrade request for the next hop (origin-form, Host, the upgrade fields) and
/// takes the caller's side of the upgrade out of it.
pub fn prepare(
    parts: &mut http::request::Parts,
    up: HeaderValue,
) -> Result<OnUpgrade, super::errors::ProxyError> {
    use super::errors::ProxyError;
    let caller = take(parts)?;
    super::framing::for_origin(parts, true).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    ask(&mut parts.headers, up);
    Ok(caller)
}

/// The next hop's answer to an upgrade request, for the caller: a 101 splices the caller's
/// connection with the next hop's (on a task of its own); any other answer passes as it is.
/// A caller that asked with extended CONNECT gets a `101` as `200` without the upgrade fields
/// (RFC 8441 §5).
pub fn answer(
    mut resp: Response<hyper::body::Incoming>,
    caller: OnUpgrade,
    asked: Asked,
) -> Response<super::Body> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        super::strip_hop_by_hop(resp.headers_mut());
        return resp.map(|b| http_body_util::Either::Left(http_body_util::Either::Left(b)));
    }
    let next = hyper::upgrade::on(&mut resp);
    tokio::spawn(splice_upgrades(caller, next));
    let mut r = switching(&resp);
    if let Asked::ExtendedConnect { own_key } = asked {
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        h.remove(header::UPGRADE);
        h.remove(header::CONNECTION);
        if own_key {
            h.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
    }
    r.map(|()| super::full(""))
}

/// Copies bytes both ways between the caller's upgraded connection, once hyper hands it over
/// (after the `101` or `2xx` went out), and `other`, until either side closes. An opaque
/// stream (a CONNECT tunnel) is `counted` in the TCP metrics; an upgraded HTTP request (a
/// WebSocket) counts as the request it was, as Istio counts it.
pub async fn splice<T>(
    caller: OnUpgrade,
    mut other: T,
    counted: Option<crate::telemetry::metrics::TcpStream>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_caller, mut to_caller) = (0, 0);
    match caller.await {
        Ok(up) => {
            let mut up = TokioIo::new(up);
            match tokio::io::copy_bidirectional(&mut up, &mut other).await {
                Ok((a, b)) => {
                    (from_caller, to_caller) = (a, b);
                    tracing::debug!(to_next = a, to_caller = b, "upgraded stream closed");
                }
                Err(e) => tracing::debug!(error = %e, "upgraded stream ended"),
            }
        }
        Err(e) => tracing::debug!(error = %e, "caller's connection not upgraded"),
    }
    if let Some(c) = counted {
        c.closed(from_caller, to_caller);
    }
}

/// As [`splice`], with the other side an upgrade still to come from a response.
pub async fn splice_upgrades(caller: OnUpgrade, next: OnUpgrade) {
    match next.await {
        Ok(up) => splice(caller, TokioIo::new(up), None).await,
        Err(e) => tracing::debug!(error = %e, "next hop's connection not upgraded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_needs_connection_to_name_it() {
        let ws = map(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
        ]);
        assert_eq!(requested(&ws).unwrap(), "websocket");
        assert!(requested(&map(&[("upgrade", "websocket")])).is_none());
        assert!(requested(&map(&[("connection", "upgrade")])).is_none());
    }

    #[test]
    fn the_switch_keeps_end_to_end_fields_and_the_upgrade() {
        let next = Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade, x-hop")
            .header("x-hop", "1")
            .header("sec-websocket-accept", "abc")
            .body(())
            .unwrap();
        let r = switching(&next);
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["connection"], "upgrade");
        assert_eq!(r.headers()["sec-websocket-accept"], "abc");
        assert!(!r.headers().contains_key("x-hop"));
    }

    #[test]
    fn an_extended_connect_becomes_the_upgrade_the_app_expects() {
        let connect = |key: Option<&'static str>, protocol: Option<&'static str>| {
            let mut b = http::Request::builder()
                .method(http::Method::CONNECT)
                .version(http::Version::HTTP_2)
                .uri("http://chat/room");
            if let Some(k) = key {
                b = b.header("sec-websocket-key", k);
            }
            if let Some(p) = protocol {
                b = b.extension(hyper::ext::Protocol::from_static(p));
            }
            b.body(()).unwrap().into_parts().0
        };
        let mut p = connect(None, Some("websocket"));
        let (up, asked) = from_extended_connect(&mut p).unwrap();
        assert_eq!(
            (up.to_str().unwrap(), asked),
            ("websocket", Asked::ExtendedConnect { own_key: true })
        );
        assert_eq!(p.method, http::Method::GET);
        let key = p.headers["sec-websocket-key"].to_str().unwrap();
        assert_eq!(key.len(), 24, "16 bytes, base64: {key}");

        let mut p = connect(Some("dGhlIHNhbXBsZSBub25jZQ=="), Some("websocket"));
        let (_, asked) = from_extended_connect(&mut p).unwrap();
        assert_eq!(asked, Asked::ExtendedConnect { own_key: false });
        assert_eq!(p.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");

        let mut plain = connect(None, None);
        assert!(
            from_extended_connect(&mut plain).is_none(),
            "a CONNECT tunnel"
        );
        assert_eq!(plain.method, http::Method::CONNECT);
    }
}
