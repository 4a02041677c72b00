//! Inbound: terminates mTLS from mesh peers (client certificate required: STRICT), learns the
//! caller's SPIFFE identity, and forwards to the local app in the protocol the caller's app
//! spoke (`x-mesh-orig-proto`), telling the app who called in `x-forwarded-client-cert`.

use crate::balance::state::Now;
use crate::http::coalesce::Coalesce;
use crate::http::errors::ProxyError;
use crate::http::server::{Client as Caller, serve};
use crate::http::{Body, ORIG_PROTO, ORIG_PROTO_H1, XFCC, absolute_uri, is_grpc, strip_hop_by_hop};
use crate::snapshot::Snapshots;
use crate::telemetry::metrics::{ConnGuard, ConnKind, Direction, Handshake, metrics};
use crate::telemetry::{Counters, Detail, Observation, ObservedBody};
use crate::tls::{ALPN_OPAQUE, TlsContext, spiffe_id_of};
use arc_swap::ArcSwapOption;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest as Http1Sender;
use hyper::client::conn::http2::SendRequest as Http2Sender;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// First byte of a TLS record carrying a handshake (ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Time a peer has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A new connection to the app, writes coalesced. Requests keep their original authority in
/// the URI (the app sees the Host it was called by); the address is always the app's.
async fn connect_app(addr: SocketAddr) -> Result<TokioIo<Coalesce<TcpStream>>, ProxyError> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| ProxyError::App(format!("connecting to {addr}: {e}")))?;
    let _ = s.set_nodelay(true);
    Ok(TokioIo::new(Coalesce::new(s)))
}

/// Runs a connection to the app until it closes.
fn drive<C>(addr: SocketAddr, proto: &'static str, conn: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, proto, error = %e, "app connection closed");
        }
    });
}

/// How long an HTTP/1.1 connection to the app may stay unused.
const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/1.1 connections to the app, one request at a time each. Every open connection is in
/// `conns`, busy or not: a request takes the most recently used one that is ready for a new
/// request, and opens another when none is. The lock is held for that scan or a push, never
/// across an await; with one worker, the sidecar's default, it is never contended. This
/// replaced hyper-util's general pool, whose checkout, key hashing and return task cost ~15%
/// of a proxy's instructions per HTTP/1.1 request.
struct AppH1 {
    addr: SocketAddr,
    conns: std::sync::Mutex<Vec<H1Conn>>,
    /// How long a connection may stay unused before `sweep` closes it.
    idle_timeout: Duration,
}

struct H1Conn {
    sender: Http1Sender<AppBody>,
    /// `Now` in ms when a request last went out on it.
    used_ms: u64,
}

/// A bodyless idempotent request kept to send again (method, URI, headers).
type Replay = (http::Method, Uri, http::HeaderMap);

impl AppH1 {
    fn new(addr: SocketAddr, idle_timeout: Duration) -> Self {
        Self {
            addr,
            conns: std::sync::Mutex::new(Vec::new()),
            idle_timeout,
        }
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<H1Conn>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used ready connection, taken out of the list; closed ones are dropped.
    fn take_ready(&self) -> Option<Http1Sender<AppBody>> {
        let mut conns = self.conns();
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if conns[i].sender.is_closed() {
                conns.swap_remove(i);
            } else if conns[i].sender.is_ready() {
                return Some(conns.swap_remove(i).sender);
            }
        }
        None
    }

    /// Puts a connection back as soon as the answer's head is in; it is not ready for another
    /// request until the body is through, and `take_ready` passes it over until then.
    fn put(&self, sender: Http1Sender<AppBody>) {
        let used_ms = Now::get().ms();
        self.conns().push(H1Conn { sender, used_ms });
    }

    async fn connect(&self) -> Result<Http1Sender<AppBody>, ProxyError> {
        let io = connect_app(self.addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| app_error(&e))?;
        drive(self.addr, "HTTP/1.1", conn);
        Ok(sender)
    }

    async fn sender(&self) -> Result<Http1Sender<AppBody>, ProxyError> {
        match self.take_ready() {
            Some(s) => Ok(s),
            // Boxed: rare, and it would otherwise enlarge every request's future.
            None => Box::pin(self.connect()).await,
        }
    }

    /// Sends `req`. One the connection gave back unsent goes again on a new connection, and
    /// so does `replay` (a copy of a bodyless idempotent request) if the app closed the
    /// connection before answering: the HTTP/1.1 race where an app closes a keep-alive
    /// connection (idle timeout, unread body) just as a request goes out on it (RFC 9110
    /// §9.2.2). The caller never sees that race.
    async fn request(
        &self,
        req: Request<AppBody>,
        replay: Option<Replay>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender().await?;
        let again = match sender.try_send_request(req).await {
            Ok(r) => {
                self.put(sender);
                return Ok(r);
            }
            Err(mut e) => match (e.take_message(), replay) {
                (Some(unsent), _) => unsent,
                (None, Some((method, uri, headers))) if e.error().is_incomplete_message() => {
                    tracing::debug!(%method, %uri, "app closed the connection before answering; sent again");
                    let mut again = Request::new(AppBody::Right(http_body_util::Empty::new()));
                    *again.method_mut() = method;
                    *again.uri_mut() = uri;
                    *again.version_mut() = Version::HTTP_11;
                    *again.headers_mut() = headers;
                    again
                }
                (None, _) => return Err(app_error(&e.into_error())),
            },
        };
        let mut sender = Box::pin(self.connect()).await?;
        let r = sender
            .send_request(again)
            .await
            .map_err(|e| app_error(&e))?;
        self.put(sender);
        Ok(r)
    }

    /// Closes connections unused for `idle_timeout`.
    fn sweep(&self) {
        let now = Now::get().ms();
        let idle_ms = self.idle_timeout.as_millis() as u64;
        self.conns().retain(|c| {
            !c.sender.is_closed()
                && (!c.sender.is_ready() || now.saturating_sub(c.used_ms) < idle_ms)
        });
    }

    /// Open connections (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns()
            .iter()
            .filter(|c| !c.sender.is_closed())
            .count()
    }
}

/// The one HTTP/2 connection to the app, shared by every request that goes to it over
/// HTTP/2. It is opened on first use and again after the app closes it. A request takes it
/// with an atomic load and a clone, without the general pool's checkout, key hashing and
/// extra channel, which cost ~4% of a proxy's instructions per gRPC request.
struct AppH2 {
    addr: SocketAddr,
    ready: ArcSwapOption<Http2Sender<AppBody>>,
    /// Serialises connecting, so a burst of first requests opens one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl AppH2 {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> Option<Http2Sender<AppBody>> {
        self.ready
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn sender(&self) -> Result<Http2Sender<AppBody>, ProxyError> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        // Boxed: connecting is rare, and inline it would more than double the size of every
        // request's future, which is copied when the request's task is spawned.
        Box::pin(self.connect()).await
    }

    async fn connect(&self) -> Result<Http2Sender<AppBody>, ProxyError> {
        let _g = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let io = connect_app(self.addr).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| app_error(&e))?;
        drive(self.addr, "HTTP/2", conn);
        self.ready.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// Sends `req`; a request the connection gave back unsent (the app closed it) goes once
    /// more on a new connection.
    async fn request(&self, req: Request<AppBody>) -> Result<Response<Incoming>, ProxyError> {
        let req = match self.send_once(req).await {
            Ok(r) => return Ok(r),
            Err(Unsent::Back(req)) => req,
            Err(Unsent::Failed(e)) => return Err(e),
        };
        // A connection that gave a request back is closed, so `live` passes it over now.
        match self.send_once(req).await {
            Ok(r) => Ok(r),
            Err(Unsent::Back(_)) => Err(ProxyError::App(format!(
                "HTTP/2 connection to {} closed before the request went out, twice",
                self.addr
            ))),
            Err(Unsent::Failed(e)) => Err(e),
        }
    }

    async fn send_once(&self, req: Request<AppBody>) -> Result<Response<Incoming>, Unsent> {
        let mut sender = self.sender().await.map_err(Unsent::Failed)?;
        if sender.ready().await.is_err() {
            return Err(Unsent::Back(req));
        }
        sender
            .try_send_request(req)
            .await
            .map_err(|mut e| match e.take_message() {
                Some(req) => Unsent::Back(req),
                None => Unsent::Failed(app_error(&e.into_error())),
            })
    }
}

/// Why a request to the app over HTTP/2 got no answer.
enum Unsent {
    /// The connection closed before taking it: safe to send again.
    Back(Request<AppBody>),
    Failed(ProxyError),
}

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

/// A request body to the app: the caller's, or empty when a bodyless request is replayed.
type AppBody = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

/// Methods RFC 9110 lets a client repeat on its own (safe or idempotent).
fn idempotent(m: &http::Method) -> bool {
    use http::Method as M;
    matches!(
        *m,
        M::GET | M::HEAD | M::OPTIONS | M::TRACE | M::PUT | M::DELETE
    )
}

fn app_error(e: &dyn std::error::Error) -> ProxyError {
    let why = e
        .source()
        .map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
    tracing::debug!(error = %why, "app request failed");
    ProxyError::App(why)
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
}

impl Inbound {
    pub fn new(
        tls: Arc<TlsContext>,
        identity: Arc<str>,
        app: SocketAddr,
        snapshots: Arc<Snapshots>,
        service: Option<Arc<str>>,
        own_ports: Vec<u16>,
    ) -> Self {
        let h1 = AppH1::new(app, APP_IDLE_TIMEOUT);
        let h2 = AppH2::new(app);
        Self {
            tls,
            identity,
            h1,
            h2,
            snapshots,
            service,
            own_ports,
        }
    }

    /// Closes connections to the app left unused (called every few seconds).
    pub fn sweep(&self) {
        self.h1.sweep();
    }

    /// Authorization, then the service-wide and per-caller inbound rate limits of this
    /// proxy's service.
    fn admit<B>(&self, caller: &Arc<str>, req: &Request<B>) -> Result<(), ProxyError> {
        let Some(name) = &self.service else {
            return Ok(());
        };
        let snap = self.snapshots.load();
        let Some(svc) = snap.services.get(name) else {
            return Ok(());
        };
        authorize(name, svc, caller, req.method().as_str(), req.uri().path())?;
        let p = &svc.policy;
        if let Some(rate) = p.rate_inbound_per_caller {
            svc.state
                .per_caller
                .check(caller, rate)
                .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        }
        if let Some(rate) = p.rate_inbound {
            svc.state
                .inbound
                .check(rate)
                .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        }
        Ok(())
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
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(1)) => {
                if !self.permissive() {
                    tracing::info!(%peer, "plaintext connection refused: the service is STRICT (mTLS only)");
                    return;
                }
                // No certificate, no identity: the app is told nothing about the caller.
                self.serve_http(tcp, Arc::from(""), None, watcher).await;
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
        let Some(caller) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| spiffe_id_of(c))
        else {
            tracing::info!(%peer, "peer certificate has no SPIFFE identity; closing");
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_OPAQUE) {
            self.serve_opaque(tls, caller, peer).await;
            return;
        }
        let xfcc = HeaderValue::from_str(&format!("By={};URI={caller}", self.identity)).ok();
        self.serve_http(tls, caller.into(), xfcc, watcher).await;
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
        let snap = self.snapshots.load();
        let caller: Arc<str> = caller.into();
        if let Some((name, svc)) = self
            .service
            .as_ref()
            .and_then(|n| Some((n, snap.services.get(n)?)))
            && authorize(name, svc, &caller, "", "").is_err()
        {
            return;
        }
        let _open = ConnGuard::new(ConnKind::InboundPeer);
        match TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(mut app) => {
                let _ = app.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut s, &mut app).await;
            }
            Err(e) => {
                tracing::debug!(%caller, port, error = %e, "opaque stream: app port unreachable")
            }
        }
    }

    /// Serves HTTP from one caller (`""`: a plaintext caller, no identity).
    async fn serve_http<I>(
        self: Arc<Self>,
        io: I,
        caller: Arc<str>,
        xfcc: Option<HeaderValue>,
        watcher: Watcher,
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
        serve(io, svc, client, watcher).await;
    }

    async fn handle(
        self: Arc<Self>,
        caller: Arc<str>,
        xfcc: Option<HeaderValue>,
        req: Request<Incoming>,
        obs: Observation,
    ) -> Result<Response<ObservedBody>, Infallible> {
        let grpc = is_grpc(req.headers());
        let resp = match self.admit(&caller, &req) {
            Err(e) => e.to_response(grpc),
            Ok(()) => match self.forward(xfcc, traceparent(&obs), req).await {
                Ok(r) => r.map(Body::Left),
                Err(e) => e.to_response(grpc),
            },
        };
        Ok(obs.finish(resp))
    }

    async fn forward(
        &self,
        xfcc: Option<HeaderValue>,
        traceparent: Option<HeaderValue>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        if let Some(tp) = traceparent {
            parts.headers.insert(crate::outbound::TRACEPARENT, tp);
        }
        // The caller's own protocol: what a mesh peer says it was, or what a plaintext
        // (PERMISSIVE) caller speaks itself.
        let h1 = parts
            .headers
            .remove(ORIG_PROTO)
            .is_some_and(|v| v == ORIG_PROTO_H1)
            || parts.version < Version::HTTP_2;
        match xfcc {
            Some(v) => parts.headers.insert(XFCC, v),
            None => parts.headers.remove(XFCC),
        };
        parts.uri = absolute_uri(None, std::mem::take(&mut parts.uri))
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        parts.version = if h1 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        };
        // An HTTP/1.1 app may close a pooled connection as the request goes out on it; a
        // bodyless idempotent request is then sent once more on a fresh connection (RFC 9110
        // §9.2.2), so the caller never sees that race. Only such requests keep a copy.
        use hyper::body::Body as _;
        let replay = (h1 && body.is_end_stream() && idempotent(&parts.method)).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        let req = Request::from_parts(parts, AppBody::Left(body));
        let mut resp = if h1 {
            self.h1.request(req, replay).await?
        } else {
            self.h2.request(req).await?
        };
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
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
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    fn get() -> Request<AppBody> {
        Request::builder()
            .uri("http://app/hello")
            .version(Version::HTTP_2)
            .body(AppBody::Right(http_body_util::Empty::new()))
            .unwrap()
    }

    /// An HTTP/2 app that closes each connection (GOAWAY, then FIN) after one answer, and
    /// reports each closed connection.
    async fn one_answer_per_connection() -> (SocketAddr, tokio::sync::mpsc::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let answered = Arc::new(tokio::sync::Notify::new());
                    let a = answered.clone();
                    let svc = hyper::service::service_fn(move |_req| {
                        a.notify_one();
                        async {
                            Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("hi"))))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = answered.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    let _ = closed_tx.send(()).await;
                });
            }
        });
        (addr, closed)
    }

    #[tokio::test]
    async fn app_h2_connection_closed_by_the_app_is_replaced() {
        let (addr, mut closed) = one_answer_per_connection().await;
        let app = AppH2::new(addr);
        for i in 0..3 {
            let resp = tokio::time::timeout(Duration::from_secs(5), app.request(get()))
                .await
                .expect("answer in time")
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hi");
            // The app has closed the connection that answered before the next request goes.
            tokio::time::timeout(Duration::from_secs(5), closed.recv())
                .await
                .expect("the app closes its connection")
                .expect("app running");
        }
    }

    #[tokio::test]
    async fn app_h2_not_listening_is_app_unavailable() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = AppH2::new(addr).request(get()).await.unwrap_err();
        assert!(matches!(e, ProxyError::App(_)), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}

#[cfg(test)]
mod h1_tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn get(path: &str) -> Request<AppBody> {
        Request::builder()
            .uri(format!("http://app{path}"))
            .body(AppBody::Right(http_body_util::Empty::new()))
            .unwrap()
    }

    async fn fetch(pool: &AppH1, path: &str) -> bytes::Bytes {
        let r = pool.request(get(path), None).await.unwrap();
        r.into_body().collect().await.unwrap().to_bytes()
    }

    /// Notified to let the held `/slow` requests answer, and how many are held.
    type Release = Arc<(tokio::sync::Notify, AtomicUsize)>;

    /// An HTTP/1.1 app counting the connections it accepts; `/slow` waits for a release.
    async fn app() -> (SocketAddr, Arc<AtomicUsize>, Release) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let release: Release = Arc::new((tokio::sync::Notify::new(), AtomicUsize::new(0)));
        let (n, rel) = (accepted.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let rel = rel.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let rel = rel.clone();
                        async move {
                            if req.uri().path() == "/slow" {
                                let released = rel.0.notified();
                                rel.1.fetch_add(1, Ordering::SeqCst);
                                released.await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("hi"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted, release)
    }

    #[tokio::test]
    async fn app_h1_connections_are_reused_and_added_for_concurrent_requests() {
        let (addr, accepted, release) = app().await;
        let pool = AppH1::new(addr, APP_IDLE_TIMEOUT);
        for _ in 0..10 {
            assert_eq!(&fetch(&pool, "/").await[..], b"hi");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one request at a time: one connection"
        );
        // Three at once: each needs a connection of its own.
        let slow = || fetch(&pool, "/slow");
        let released = async {
            while accepted.load(Ordering::SeqCst) < 3 || release.1.load(Ordering::SeqCst) < 3 {
                tokio::task::yield_now().await;
            }
            release.0.notify_waiters();
        };
        let (a, b, c, ()) = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join4(slow(), slow(), slow(), released),
        )
        .await
        .expect("three concurrent requests answered");
        assert!([a, b, c].iter().all(|b| &b[..] == b"hi"));
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.len(), 3);
        for _ in 0..5 {
            fetch(&pool, "/").await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "idle connections are reused"
        );
    }

    #[tokio::test]
    async fn app_h1_connections_unused_past_the_idle_timeout_are_closed() {
        let (addr, accepted, _) = app().await;
        let pool = AppH1::new(addr, Duration::ZERO);
        fetch(&pool, "/").await;
        assert_eq!(pool.len(), 1);
        pool.sweep();
        assert_eq!(pool.len(), 0);
        fetch(&pool, "/").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/1.1 app that answers the first request on each connection and closes the
    /// connection when a second one arrives on it, unanswered: the keep-alive race.
    async fn one_answer_then_close() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    for answered in [false, true] {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        buf.clear();
                        if answered {
                            return;
                        }
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn app_h1_replays_a_bodyless_idempotent_request_the_app_dropped() {
        let (addr, accepted) = one_answer_then_close().await;
        let pool = AppH1::new(addr, APP_IDLE_TIMEOUT);
        let body =
            |r: Response<Incoming>| async { r.into_body().collect().await.unwrap().to_bytes() };
        let r = pool.request(get("/a"), None).await.unwrap();
        assert_eq!(&body(r).await[..], b"hi");
        // The second request goes out on the kept connection, which the app closes unanswered.
        let req = get("/b");
        let replay = Some((
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        ));
        let r = pool
            .request(req, replay)
            .await
            .expect("sent again on a new connection");
        assert_eq!(&body(r).await[..], b"hi");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Without a copy to replay (a request with a body, or not idempotent) the caller is told.
        let e = pool.request(get("/c"), None).await.unwrap_err();
        assert!(matches!(e, ProxyError::App(_)), "{e}");
    }
}
