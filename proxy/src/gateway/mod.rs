//! Ingress gateway: the edge of the mesh for outside clients. A proxy started with
//! `--gateway-https-addr` (and/or `--gateway-http-addr`) and `--service <gateway name>`
//! terminates TLS with the operator's certificates (`certs`), then routes each request by the
//! route of its own service, whose rules match hosts and paths and send to other services
//! (`meshctl route set edge --match host:shop.example.com --match prefix:/api --to svc/api`,
//! or Gateway API `HTTPRoute`s attached to a `Gateway`). From there a request goes the way an
//! app's outbound request goes (`Outbound`): the same matching, weights, mirrors, header
//! edits, retries and timeouts, over mesh mTLS with the gateway's own identity, so that
//! authorization rules can name it. Before routing, the gateway's service policy admits it:
//! its inbound rate limits, per client keyed by the client's address or a header.

pub mod certs;

use crate::http::errors::ProxyError;
use crate::http::server::{Client, accept_loop, serve};
use crate::lifecycle::Lifecycle;
use crate::outbound::Outbound;
use crate::snapshot::Service;
use crate::telemetry::{Observation, ObservedBody};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use certs::{CertFiles, Certs};

/// Time an outside client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The gateway's listeners, from the flags.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// The port redirects to HTTPS name (None: the HTTPS listener's).
    pub redirect_port: Option<u16>,
    pub certs: Vec<CertFiles>,
}

impl GatewayConfig {
    /// None when no gateway listener is asked for.
    pub fn from_flags(
        https: Option<SocketAddr>,
        http: Option<SocketAddr>,
        redirect_port: Option<u16>,
        certs: &[String],
    ) -> Result<Option<Self>, String> {
        let certs = certs
            .iter()
            .map(|c| CertFiles::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        match (https, http) {
            (None, None) if certs.is_empty() && redirect_port.is_none() => return Ok(None),
            (None, None) => {
                return Err(
                    "--gateway-cert and --gateway-redirect-port need --gateway-https-addr".into(),
                );
            }
            (Some(_), _) if certs.is_empty() => {
                return Err("--gateway-https-addr needs at least one --gateway-cert".into());
            }
            (None, Some(_)) if !certs.is_empty() => {
                return Err("--gateway-cert needs --gateway-https-addr".into());
            }
            _ => {}
        }
        Ok(Some(Self {
            https,
            http,
            redirect_port,
            certs,
        }))
    }
}

/// The client's address, as a request extension (the per-client rate limit's default key).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Admits a gateway request under its own service's inbound limits, as a service's proxy
/// admits its callers (`PolicyState::check_inbound`); a client is the value of
/// `rate_limit.client_header`, else its IP address. Clients without the header share one
/// bucket.
pub fn admit(gateway: &Service, parts: &http::request::Parts) -> Result<(), ProxyError> {
    let p = &gateway.policy;
    let client = || -> Arc<str> {
        match &p.client_header {
            Some(h) => parts
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .into(),
            None => parts
                .extensions
                .get::<ClientAddr>()
                .map_or_else(|| "".into(), |a| a.0.ip().to_string().into()),
        }
    };
    gateway
        .state
        .check_inbound(p, client)
        .map_err(|retry_after| ProxyError::RateLimited { retry_after })
}

/// One gateway listener's request handling.
struct Listener {
    outbound: Arc<Outbound>,
    service: Arc<str>,
    /// `https` or `http`, for `x-forwarded-proto`.
    proto: &'static str,
    /// Some: a plaintext listener that answers with a redirect to this HTTPS port.
    redirect_to: Option<u16>,
}

impl Listener {
    async fn handle(
        self: Arc<Self>,
        client: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<ObservedBody>, Infallible> {
        if let Some(port) = self.redirect_to {
            return Ok(Observation::start(None, None).finish(to_https(&req, port)));
        }
        let h = req.headers_mut();
        // Outside clients do not get the mesh's internals (endpoints, attempts).
        h.remove(crate::outbound::DEBUG_HEADER);
        let forwarded = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", client.ip())),
            None => HeaderValue::from_str(&client.ip().to_string()),
        };
        if let Ok(v) = forwarded {
            h.insert(X_FORWARDED_FOR, v);
        }
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        req.extensions_mut().insert(ClientAddr(client));
        self.outbound
            .clone()
            .gateway(self.service.clone(), req)
            .await
    }
}

/// The redirect a plaintext listener answers with: the same host and target over HTTPS.
fn to_https<B>(req: &Request<B>, port: u16) -> Response<crate::http::Body> {
    let host = mesh_model::route::request_host(req.uri(), req.headers());
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return ProxyError::NoAuthority.to_response(false);
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let mut r = Response::new(crate::http::full(""));
    // 301 is what browsers and clients expect; 308 keeps a POST a POST.
    *r.status_mut() = if matches!(*req.method(), Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(http::header::LOCATION, v);
            r
        }
        Err(_) => ProxyError::BadRequest("the host cannot be redirected".into()).to_response(false),
    }
}

/// Bound gateway listeners, ready to serve.
pub struct Listeners {
    pub https: Option<(TcpListener, Arc<Certs>)>,
    pub http: Option<TcpListener>,
    pub redirect_port: Option<u16>,
}

impl Listeners {
    /// Binds the listeners and loads the certificates (errors stop the proxy at start).
    pub async fn bind(c: &GatewayConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let https = match c.https {
            Some(addr) => {
                let certs = Certs::load(c.certs.clone()).context("--gateway-cert")?;
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind gateway HTTPS listener on {addr}"))?;
                Some((l, certs))
            }
            None => None,
        };
        let http = match c.http {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind gateway HTTP listener on {addr}"))?,
            ),
            None => None,
        };
        let https_port = https
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
            .map(|a| a.port());
        Ok(Self {
            https,
            http,
            redirect_port: c.redirect_port.or(https_port),
        })
    }

    /// Serves both listeners until drain; returns their accept loops.
    pub fn serve(
        self,
        outbound: Arc<Outbound>,
        service: Arc<str>,
        lifecycle: Arc<Lifecycle>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut loops = Vec::new();
        let redirect_to = self.https.as_ref().and(self.redirect_port);
        if let Some((l, certs)) = self.https {
            let acceptor = tokio_rustls::TlsAcceptor::from(certs::server_config(certs.clone())?);
            tokio::spawn(certs.watch());
            let listener = Arc::new(Listener {
                outbound: outbound.clone(),
                service: service.clone(),
                proto: "https",
                redirect_to: None,
            });
            loops.push(tokio::spawn(accept_loop(
                l,
                lifecycle.clone(),
                move |s, peer, w| {
                    let (listener, acceptor) = (listener.clone(), acceptor.clone());
                    async move {
                        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s))
                            .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "gateway TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "gateway TLS handshake timed out");
                                return;
                            }
                        };
                        let svc =
                            hyper::service::service_fn(move |r| listener.clone().handle(peer, r));
                        serve(tls, svc, Client::App, w).await
                    }
                },
            )));
        }
        if let Some(l) = self.http {
            let listener = Arc::new(Listener {
                outbound,
                service,
                proto: "http",
                redirect_to,
            });
            loops.push(tokio::spawn(accept_loop(
                l,
                lifecycle,
                move |s, peer, w| {
                    let listener = listener.clone();
                    async move {
                        let svc =
                            hyper::service::service_fn(move |r| listener.clone().handle(peer, r));
                        serve(s, svc, Client::App, w).await
                    }
                },
            )));
        }
        Ok(loops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked_together() {
        let a: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert!(
            GatewayConfig::from_flags(None, None, None, &[])
                .unwrap()
                .is_none()
        );
        let e = GatewayConfig::from_flags(Some(a), None, None, &[]).unwrap_err();
        assert!(e.contains("needs at least one --gateway-cert"), "{e}");
        let e = GatewayConfig::from_flags(None, Some(a), None, &["c:k".into()]).unwrap_err();
        assert!(e.contains("needs --gateway-https-addr"), "{e}");
        let e = GatewayConfig::from_flags(None, None, None, &["c:k".into()]).unwrap_err();
        assert!(e.contains("need --gateway-https-addr"), "{e}");
        let c = GatewayConfig::from_flags(Some(a), Some(a), Some(443), &["c.pem:k.pem".into()])
            .unwrap()
            .unwrap();
        assert_eq!(c.certs[0].key, std::path::PathBuf::from("k.pem"));
        assert!(GatewayConfig::from_flags(None, Some(a), None, &[]).is_ok());
    }

    #[test]
    fn plaintext_requests_are_redirected_to_https() {
        let req = |m: Method, uri: &str, host: Option<&str>| {
            let mut b = Request::builder().method(m).uri(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap()
        };
        let r = to_https(
            &req(Method::GET, "/a?b=1", Some("shop.example.com:80")),
            443,
        );
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(r.headers()["location"], "https://shop.example.com/a?b=1");
        let r = to_https(&req(Method::POST, "/a", Some("shop.example.com")), 8443);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()["location"], "https://shop.example.com:8443/a");
        let r = to_https(&req(Method::GET, "/", None), 443);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
