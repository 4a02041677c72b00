//! HTTP/1.1 Upgrade (WebSocket, or any other token) and CONNECT through the mesh.
//!
//! An upgrade turns one request into a byte stream, so it cannot share the multiplexed HTTP/2
//! connection between sidecars: the outbound proxy carries it on a dedicated mTLS connection
//! that speaks HTTP/1.1 (ALPN `http/1.1`, which the inbound listener accepts), the inbound
//! proxy on a dedicated connection to its app. Once each hop has answered `101 Switching
//! Protocols`, the proxy copies bytes both ways until either side closes. Authorization,
//! routing and the caller's identity apply to the request that asked for the upgrade, as to
//! any other request.

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
pub fn answer(
    mut resp: Response<hyper::body::Incoming>,
    caller: OnUpgrade,
) -> Response<super::Body> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        super::strip_hop_by_hop(resp.headers_mut());
        return resp.map(|b| http_body_util::Either::Left(http_body_util::Either::Left(b)));
    }
    let next = hyper::upgrade::on(&mut resp);
    tokio::spawn(splice_upgrades(caller, next));
    switching(&resp).map(|()| super::full(""))
}

/// Copies bytes both ways between the caller's upgraded connection, once hyper hands it over
/// (after the `101` or `2xx` went out), and `other`, until either side closes.
pub async fn splice<T>(caller: OnUpgrade, mut other: T)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match caller.await {
        Ok(up) => {
            let mut up = TokioIo::new(up);
            match tokio::io::copy_bidirectional(&mut up, &mut other).await {
                Ok((a, b)) => tracing::debug!(to_next = a, to_caller = b, "upgraded stream closed"),
                Err(e) => tracing::debug!(error = %e, "upgraded stream ended"),
            }
        }
        Err(e) => tracing::debug!(error = %e, "caller's connection not upgraded"),
    }
}

/// As [`splice`], with the other side an upgrade still to come from a response.
pub async fn splice_upgrades(caller: OnUpgrade, next: OnUpgrade) {
    match next.await {
        Ok(up) => splice(caller, TokioIo::new(up)).await,
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
}
