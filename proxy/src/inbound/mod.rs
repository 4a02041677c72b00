//! Inbound: terminates mTLS from mesh peers (client certificate required: STRICT), learns the
//! caller's SPIFFE identity, and forwards to the local app in the protocol the caller's app
//! spoke (`x-mesh-orig-proto`), telling the app who called in `x-forwarded-client-cert`.

use crate::http::body::RespBody;
use crate::http::errors::ProxyError;
use crate::http::server::{Client as Caller, serve_bounded};
use crate::http::{
    Body, ORIG_PROTO, ORIG_PROTO_H1, XFCC, framing, is_grpc, strip_hop_by_hop, upgrade,
};
use crate::outbound::transparent::{DETECT_TIMEOUT, Detected, detect};
use crate::policy::adaptive::Permit;
use crate::snapshot::Snapshots;
use crate::telemetry::metrics::{ConnGuard, ConnKind, Direction, Handshake, metrics};
use crate::telemetry::{Counters, Detail, Observation, ObservedBody};
use crate::tls::{ALPN_OPAQUE, TlsContext, spiffe_id_and_expiry};
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::server::graceful::Watcher;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

mod app;

use crate::http::body::Resend;
use crate::http::body::{ReqBody, Upload};
pub(crate) use app::APP_SWEEP_INTERVAL;
use app::{APP_IDLE_TIMEOUT, AppBody, AppH1, AppH2};

/// First byte of a TLS record carrying a handshake (ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Time a peer has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The service's authorization for one request (an opaque stream has no method or path):
/// Denied names the deciding rule; in audit mode a would-be denial is logged and let through.
fn authorize(
    service: &str,
    svc: &crate::snapshot::Service,
    caller: &Arc<str>,
    method: &str,
    path: &str,
) -> Result<(), ProxyError> {
    let Some(authz) = &svc.authz else {
        return Ok(());
    };
    let who = (!caller.is_empty()).then_some(&**caller);
    let d = authz.decide(who, method, path);
    if d.allowed {
        return Ok(());
    }
    if authz.audit {
        tracing::info!(%service, %caller, method, path, policy = %d.by, "authz audit: would deny; let through");
        return Ok(());
    }
    tracing::debug!(%service, %caller, method, path, policy = %d.by, "authz: denied");
    Err(ProxyError::Denied(d.by.to_string()))
}

/// How long a request waits for this proxy's own service config before it is refused.
const OWN_CONFIG_WAIT: Duration = Duration::from_secs(3);

/// Replaces the request's path by its normal form (`mesh_authz::path::normalize`), keeping
/// the query; refuses it when the path is malformed, or ambiguous while `strict`.
fn normalize_path<B>(req: &mut Request<B>, strict: bool) -> Result<(), ProxyError> {
    let path = match mesh_authz::path::normalize(req.uri().path(), strict) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
    };
    tracing::debug!(from = req.uri().path(), to = %path, "path normalised");
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e: http::uri::InvalidUri| ProxyError::BadRequest(e.to_string()))?,
    );
    *req.uri_mut() =
        http::Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    Ok(())
}

/// Methods RFC 9110 lets a client repeat on its own (safe or idempotent).
fn idempotent(m: &http::Method) -> bool {
    use http::Method as M;
    matches!(
        *m,
        M::GET | M::HEAD | M::OPTIONS | M::TRACE | M::PUT | M::DELETE
    )
}

/// The protocol the local app speaks on its port, declared or detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AppProtocol {
    /// Every request reaches the app as HTTP/1.1, whatever the caller spoke (gRPC cannot).
    Http1,
    /// Every request reaches the app as HTTP/2 with prior knowledge (h2c).
    Http2,
    /// The caller's protocol, except that an app found not to answer HTTP/2 (proven with a
    /// PING on each new connection) gets HTTP/1.1 from then on.
    #[default]
    Detect,
}

pub struct Inbound {
    pub tls: Arc<TlsContext>,
    /// This proxy's own identity (the `By=` of XFCC).
    pub identity: Arc<str>,
    h1: AppH1,
    h2: AppH2,
    snapshots: Arc<Snapshots>,
    /// The service this proxy fronts: its policy's inbound rate limits apply here.
    service: Option<Arc<str>>,
    /// The proxy's own ports, which an opaque stream may not be connected to.
    own_ports: Vec<u16>,
    app_protocol: AppProtocol,
    /// The app's address (loopback and its port).
    app: SocketAddr,
    /// Turns true when the proxy drains.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// What the inbound proxy is made of (see the fields of [`Inbound`]).
pub struct InboundConfig {
    pub tls: Arc<TlsContext>,
    pub identity: Arc<str>,
    pub app: SocketAddr,
    pub snapshots: Arc<Snapshots>,
    pub service: Option<Arc<str>>,
    pub own_ports: Vec<u16>,
    pub app_protocol: AppProtocol,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl Inbound {
    pub fn new(c: InboundConfig) -> Self {
        let h1 = AppH1::new(c.app, APP_IDLE_TIMEOUT);
        let h2 = AppH2::new(c.app, c.app_protocol == AppProtocol::Detect);
        Self {
            tls: c.tls,
            identity: c.identity,
            h1,
            h2,
            snapshots: c.snapshots,
            service: c.service,
            own_ports: c.own_ports,
            app_protocol: c.app_protocol,
            app: c.app,
            stop: c.stop,
        }
    }

    /// Closes connections to the app left unused (called every few seconds).
    pub fn sweep(&self) {
        self.h1.sweep();
    }

    /// This proxy's service as the current config has it. Until its authorization and mTLS
    /// settings are known nothing is served (fail closed): a request waits for them at most
    /// `OWN_CONFIG_WAIT` (they follow the endpoint's registration by milliseconds).
    async fn own_service(&self, name: &str) -> Result<Arc<crate::snapshot::Service>, ProxyError> {
        if let Some(svc) = self.snapshots.load().services.get(name) {
            return Ok(svc.clone());
        }
        Box::pin(self.snapshots.wait_for(name, OWN_CONFIG_WAIT))
            .await
            .ok_or(ProxyError::NotReady(
                "the service's own authorization and mTLS settings are not known yet",
            ))
    }

    /// The path normalised (`mesh_authz::path`: what the app receives is what was
    /// authorized), authorization, the service-wide and per-caller inbound rate limits of
    /// this proxy's service, its share of the global limit, then its adaptive concurrency
    /// limit. Ok: what the service declares its app speaks on this port, and the request's place
    /// under the limit.
    async fn admit<B>(
        &self,
        caller: &Arc<str>,
        req: &mut Request<B>,
    ) -> Result<(Option<mesh_model::AppProtocol>, Option<Permit>), ProxyError> {
        let Some(name) = &self.service else {
            return Ok((None, None));
        };
        let guard = self.snapshots.load();
        let owned;
        let svc = match guard.services.get(name) {
            Some(svc) => svc,
            None => {
                drop(guard);
                owned = self.own_service(name).await?;
                &owned
            }
        };
        let strict = svc.authz.as_ref().is_some_and(|a| a.matches_paths());
        normalize_path(req, strict)?;
        authorize(name, svc, caller, req.method().as_str(), req.uri().path())?;
        let p = &svc.policy;
        svc.state
            .check_inbound(p, || caller.clone())
            .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        if let (Some(g), Some(shares)) = (p.rate_global, &svc.state.global) {
            shares
                .check(g, caller)
                .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        }
        let permit = match &svc.state.adaptive {
            Some(a) => Some(a.acquire().map_err(ProxyError::Overloaded)?),
            None => None,
        };
        Ok((svc.app_protocols.of(self.app.port()), permit))
    }

    /// True when this proxy's service accepts plaintext too (PERMISSIVE mTLS).
    fn permissive(&self) -> bool {
        let Some(name) = &self.service else {
            return false;
        };
        self.snapshots
            .load()
            .services
            .get(name)
            .is_some_and(|s| s.mtls_permissive)
    }

    /// Handles one accepted TCP connection: mTLS, or plaintext if the service is PERMISSIVE
    /// (told apart by the first byte: a TLS record starts with 0x16), then HTTP.
    pub async fn accept(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, watcher: Watcher) {
        let mut first = [0u8; 1];
        // A client of a server-first protocol (the server speaks first) sends nothing: on a
        // PERMISSIVE service, silence past the detection window makes it a plaintext TCP
        // client. A STRICT service only ever waits for a TLS ClientHello.
        let peeked = match tokio::time::timeout(DETECT_TIMEOUT, tcp.peek(&mut first)).await {
            Err(_) if self.permissive() => {
                self.plaintext_tcp(tcp, peer).await;
                return;
            }
            Err(_) => tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await,
            Ok(r) => Ok(r),
        };
        match peeked {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(1)) => {
                if !self.permissive() {
                    tracing::info!(%peer, "plaintext connection refused: the service is STRICT (mTLS only)");
                    return;
                }
                // No certificate, no identity: the app is told nothing about the caller.
                // A plaintext client of another protocol than HTTP passes through as TCP.
                if detect(&tcp).await == Detected::Http {
                    self.serve_http(tcp, Arc::from(""), None, watcher, None)
                        .await;
                } else {
                    self.plaintext_tcp(tcp, peer).await;
                }
                return;
            }
            _ => return,
        }
        let cfg = match self.tls.server_config() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no TLS config yet; refusing connection");
                return;
            }
        };
        let tls = match tokio::time::timeout(
            TLS_HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
        )
        .await
        {
            Ok(Ok(s)) => {
                metrics().handshake(Direction::Inbound, Handshake::Ok);
                s
            }
            Ok(Err(e)) => {
                metrics().handshake(Direction::Inbound, Handshake::Failed);
                tracing::info!(%peer, error = %e, "inbound TLS handshake refused");
                return;
            }
            Err(_) => {
                metrics().handshake(Direction::Inbound, Handshake::TimedOut);
                tracing::info!(%peer, "inbound TLS handshake timed out");
                return;
            }
        };
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let Some((caller, expires)) = leaf.and_then(|c| spiffe_id_and_expiry(c)) else {
            tracing::info!(%peer, "peer certificate has no SPIFFE identity; closing");
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_OPAQUE) {
            self.serve_opaque(tls, caller, peer).await;
            return;
        }
        let xfcc = HeaderValue::from_str(&format!("By={};URI={caller}", self.identity)).ok();
        self.serve_http(tls, caller.into(), xfcc, watcher, Some(expires))
            .await;
    }

    /// An opaque stream from a peer (transparent interception of a protocol that is not
    /// HTTP): the app port it is for, then bytes both ways. Authorization by caller identity
    /// alone (there is no method or path).
    async fn serve_opaque<S>(&self, mut s: S, caller: String, peer: SocketAddr)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let mut port = [0u8; 2];
        if tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, s.read_exact(&mut port))
            .await
            .map_or(true, |r| r.is_err())
        {
            return;
        }
        let port = u16::from_be_bytes(port);
        if port == 0 || self.own_ports.contains(&port) {
            tracing::info!(%peer, port, "opaque stream to a port of the proxy itself refused");
            return;
        }
        self.tcp_to_app(s, caller.into(), port).await;
    }

    /// A plaintext caller (PERMISSIVE) that does not speak HTTP: bytes both ways with the
    /// app's port, authorized as a caller without identity.
    async fn plaintext_tcp(&self, s: TcpStream, peer: SocketAddr) {
        tracing::debug!(%peer, "plaintext caller that is not HTTP: passed through as TCP");
        self.tcp_to_app(s, Arc::from(""), self.app.port()).await;
    }

    /// Bytes both ways between a caller and `port` of the app, if the service's authorization
    /// lets the caller in by identity alone (there is no method or path).
    async fn tcp_to_app<S>(&self, mut s: S, caller: Arc<str>, port: u16)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if let Some(name) = &self.service {
            match self.own_service(name).await {
                Ok(svc) if authorize(name, &svc, &caller, "", "").is_ok() => {}
                Ok(_) => return,
                Err(e) => {
                    tracing::info!(%caller, port, error = %e, "opaque stream refused");
                    return;
                }
            }
        }
        let _open = ConnGuard::new(ConnKind::InboundPeer);
        match TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(mut app) => {
                use crate::telemetry::metrics::{Direction, TcpStream as Counted, metrics};
                let _ = app.set_nodelay(true);
                let empty: Arc<str> = Arc::from("");
                let counted =
                    Counted::open(metrics().tcp(Direction::Inbound, &caller, &empty, &empty));
                let (from_caller, to_caller) = tokio::io::copy_bidirectional(&mut s, &mut app)
                    .await
                    .unwrap_or_default();
                counted.closed(from_caller, to_caller);
            }
            Err(e) => {
                tracing::debug!(%caller, port, error = %e, "opaque stream: app port unreachable")
            }
        }
    }

    /// Serves HTTP from one caller (`""`: a plaintext caller, no identity); a mesh peer's
    /// connection until its certificate expires (`expires`, Unix seconds) at the latest.
    async fn serve_http<I>(
        self: Arc<Self>,
        io: I,
        caller: Arc<str>,
        xfcc: Option<HeaderValue>,
        watcher: Watcher,
        expires: Option<i64>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let counters = Counters::Fixed(metrics().inbound(&caller));
        let client = if caller.is_empty() {
            Caller::App
        } else {
            Caller::MeshPeer
        };
        let _open = ConnGuard::new(ConnKind::InboundPeer);
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let detail = Detail::wanted().then(|| {
                let mut d = Detail::of(Direction::Inbound, &req);
                d.peer = caller.clone();
                if let Some(l) = metrics().local() {
                    d.service = l.service.clone();
                    d.version = Some(l.version.clone());
                }
                d
            });
            let obs = Observation::start(Some(counters.clone()), detail);
            this.clone().handle(caller.clone(), xfcc.clone(), req, obs)
        });
        let bound = expires.map(|at| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let left = Duration::from_secs(at.saturating_sub(now).max(0) as u64);
            (self.stop.clone(), tokio::time::Instant::now() + left)
        });
        serve_bounded(io, svc, client, watcher, bound).await;
    }

    async fn handle(
        self: Arc<Self>,
        caller: Arc<str>,
        xfcc: Option<HeaderValue>,
        mut req: Request<Incoming>,
        mut obs: Observation,
    ) -> Result<Response<ObservedBody>, Infallible> {
        let grpc = is_grpc(req.headers());
        if let Some(why) = framing::malformed(&req) {
            return Ok(obs.finish(ProxyError::Malformed(why).to_response(grpc)));
        }
        let counted = obs.count_request(req.body());
        let resp = match self.admit(&caller, &mut req).await {
            Err(e) => e.to_response(grpc),
            Ok((declared, permit)) => match self
                .forward(xfcc, traceparent(&obs), req, grpc, declared, counted)
                .await
            {
                Ok(r) => {
                    if let Some(p) = permit {
                        p.answered();
                    }
                    r
                }
                Err(e) => e.to_response(grpc),
            },
        };
        Ok(obs.finish(resp))
    }

    /// Whether a request goes to the app as HTTP/1.1: what the proxy's own setting declares
    /// (`--app-protocol`, the pod's annotation), else what the service declares for the app
    /// port, else what the caller spoke (unless the app was found to speak only HTTP/1.1).
    async fn app_h1(
        &self,
        caller_h1: bool,
        grpc: bool,
        declared: Option<mesh_model::AppProtocol>,
    ) -> bool {
        use mesh_model::AppProtocol as Declared;
        match (self.app_protocol, declared) {
            (AppProtocol::Http1, _) | (AppProtocol::Detect, Some(Declared::Http1)) => true,
            (AppProtocol::Http2, _) | (AppProtocol::Detect, Some(Declared::Http2)) => false,
            (AppProtocol::Detect, _) => caller_h1 || (!grpc && !self.h2.speaks_h2().await),
        }
    }

    /// A request that asks to switch protocols: sent on a connection of its own to the app;
    /// once the app answers 101, bytes are copied both ways between the two connections.
    async fn upgrade(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        up: HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let caller = upgrade::prepare(&mut parts, up)?;
        let resp = self
            .h1
            .upgrade(Request::from_parts(
                parts,
                AppBody::Left(Upload::new(body, None)),
            ))
            .await?;
        Ok(upgrade::answer(resp, caller, upgrade::Asked::Upgrade))
    }

    async fn forward(
        &self,
        xfcc: Option<HeaderValue>,
        traceparent: Option<HeaderValue>,
        req: Request<Incoming>,
        grpc: bool,
        declared: Option<mesh_model::AppProtocol>,
        counted: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        if let Some(tp) = traceparent {
            parts.headers.insert(crate::http::TRACEPARENT, tp);
        }
        // The caller's own protocol: what a mesh peer says it was, or what a plaintext
        // (PERMISSIVE) caller speaks itself.
        let caller_h1 = parts
            .headers
            .remove(ORIG_PROTO)
            .is_some_and(|v| v == ORIG_PROTO_H1)
            || parts.version < Version::HTTP_2;
        let up = if parts.version < Version::HTTP_2 {
            upgrade::requested(&parts.headers)
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers);
        match xfcc {
            Some(v) => parts.headers.insert(XFCC, v),
            None => parts.headers.remove(XFCC),
        };
        if let Some(up) = up {
            // Boxed: rare, and its handshake inline would enlarge every request's future.
            return Box::pin(self.upgrade(parts, body, up)).await;
        }
        let h1 = self.app_h1(caller_h1, grpc, declared).await;
        framing::for_origin(&mut parts, h1).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        // An app may close a connection as a request goes out on it: an HTTP/1.1 app a pooled
        // keep-alive connection (RFC 9110 §9.2.2), an HTTP/2 app with GOAWAY (RFC 9113 §6.8).
        // The request is then sent once more on a fresh connection, so the caller never sees
        // that race: over HTTP/1.1 a bodyless idempotent one; over HTTP/2 any one the app says
        // it never processed, with its body replayed if that fitted the replay buffer.
        use hyper::body::Body as _;
        let mut resp = if h1 {
            let replay =
                (body.is_end_stream() && idempotent(&parts.method)).then(|| Resend::head(&parts));
            let body = Upload::new(body, None).counting(counted);
            let req = Request::from_parts(parts, AppBody::Left(body));
            self.h1.request(req, replay).await?.map(RespBody::Left)
        } else {
            let body = Upload::new(body, None).counting(counted);
            let req = Request::from_parts(parts, ReqBody::Incoming(body));
            let (req, replay) = Resend::keep(req);
            self.h2.request(req, Some(replay)).await?
        };
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(Body::Left))
    }
}

/// The `traceparent` that makes this hop's span the app's parent (tracing on).
fn traceparent(obs: &Observation) -> Option<HeaderValue> {
    let span = obs.detail.as_ref()?.span.as_ref()?;
    HeaderValue::from_str(&span.context.header()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(snapshots: Arc<Snapshots>) -> Inbound {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("CA");
        let tls = Arc::new(TlsContext::new(&ca.cert.pem()).expect("bundle"));
        Inbound::new(InboundConfig {
            tls,
            identity: Arc::from("spiffe://mesh.local/ns/default/sa/api"),
            app: SocketAddr::from(([127, 0, 0, 1], 1)),
            snapshots,
            service: Some(Arc::from("api")),
            own_ports: vec![],
            app_protocol: AppProtocol::Detect,
            stop: tokio::sync::watch::channel(false).1,
        })
    }

    /// Before its own service's settings arrive, the inbound proxy refuses requests (after a
    /// bounded wait) instead of serving them unchecked.
    #[tokio::test(start_paused = true)]
    async fn nothing_is_served_before_the_services_own_settings() {
        let (snapshots, _rx) = Snapshots::new();
        let inbound = inbound(snapshots);
        let mut req = Request::get("http://api/admin").body(()).unwrap();
        let caller: Arc<str> = Arc::from("spiffe://mesh.local/ns/default/sa/web");
        let e = inbound.admit(&caller, &mut req).await.unwrap_err();
        assert!(matches!(e, ProxyError::NotReady(_)), "{e}");
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn the_normalised_path_replaces_the_requests_and_keeps_the_query() {
        let mut req = Request::get("http://api//a/./b/../%61dmin?x=%2F")
            .body(())
            .unwrap();
        normalize_path(&mut req, true).unwrap();
        assert_eq!(req.uri().to_string(), "http://api/a/admin?x=%2F");
        let mut req = Request::get("/a%2Fb").body(()).unwrap();
        assert!(matches!(
            normalize_path(&mut req, true),
            Err(ProxyError::BadRequest(_))
        ));
        assert!(normalize_path(&mut req, false).is_ok());
    }
}
