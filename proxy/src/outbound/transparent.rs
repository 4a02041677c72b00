//! Connections redirected to the outbound listener by `mesh-proxy init`: the app dialled some
//! `ip:port` and knows nothing of the mesh. The original destination (`SO_ORIGINAL_DST`) says
//! where it was going:
//!
//! - the app address (IP and app port) of a mesh endpoint, speaking HTTP: served as HTTP for
//!   that endpoint's service (routes, policies, balancing, mTLS), as if the app had called it
//!   by name;
//! - any other port of a mesh endpoint's IP, or a protocol that is not HTTP: an opaque stream
//!   over mTLS to that endpoint's sidecar (ALPN `mesh.opaque/1`), which connects it to that
//!   port of its app;
//! - an address of a declared external service, or port 80 of its IP: HTTP is served as
//!   calls of it (so the proxy originates its TLS), anything else is passed through;
//! - anywhere else: passed through as is, unless the namespace's egress is registry-only:
//!   then HTTP is answered 502 `x-mesh-error: egress-denied` and other streams are closed.
//!
//! The protocol is told by the first bytes the client sends; a client that sends nothing for
//! `DETECT_TIMEOUT` is served opaque, so server-first protocols (the server speaks first) do
//! not stall.

use super::Outbound;
use super::pool::{Dedicated, Pool};
use crate::http::server::{Client, serve};
use hyper_util::server::graceful::Watcher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long the client has to send its first bytes before the stream counts as opaque.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The destination the app dialled, if the connection was redirected (not addressed to the
/// listener itself).
pub fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = s.local_addr().ok()?;
    let orig = match local.ip() {
        IpAddr::V4(_) => getsockopt(s, sockopt::OriginalDst).ok().map(|a| {
            SocketAddr::from((
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }),
        IpAddr::V6(_) => getsockopt(s, sockopt::Ip6tOriginalDst).ok().map(|a| {
            SocketAddr::from((
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            ))
        }),
    }?;
    (orig != local).then_some(orig)
}

/// What the client's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    Opaque,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a prefix of the stream: Some once it can tell, None while more bytes could still
/// make it HTTP.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    let could_be = |token: &[u8]| {
        let n = prefix.len().min(token.len());
        prefix[..n] == token[..n]
    };
    if METHODS.iter().any(|m| prefix.starts_with(m)) || prefix.starts_with(H2_PREFACE) {
        return Some(Detected::Http);
    }
    if METHODS.iter().any(|m| could_be(m)) || could_be(H2_PREFACE) {
        return None;
    }
    Some(Detected::Opaque)
}

/// Peeks at the client's first bytes (without consuming them) until the protocol is clear.
pub(crate) async fn detect(s: &TcpStream) -> Detected {
    detect_within(s, DETECT_TIMEOUT).await.0
}

/// As [`detect`] within `window`; also says whether the client sent nothing at all (a
/// server-first protocol, or a slow client).
async fn detect_within(s: &TcpStream, window: Duration) -> (Detected, bool) {
    let mut silent = true;
    let d = detect_bytes(s, window, &mut silent).await;
    (d, silent)
}

async fn detect_bytes(s: &TcpStream, window: Duration, silent: &mut bool) -> Detected {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Nothing (more) from the client in time, or an error: not HTTP.
            _ => return Detected::Opaque,
        };
        if n == 0 {
            return Detected::Opaque;
        }
        *silent = false;
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        // A prefix of a method or the preface: wait for the next segment.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return Detected::Opaque;
        }
    }
}

/// Serves one redirected connection.
pub async fn handle(out: Arc<Outbound>, s: TcpStream, orig: SocketAddr, watcher: Watcher) {
    let (app, endpoint, vip, declared) = {
        let snap = out.snapshots.load();
        let app = snap.app_addrs.by_addr.get(&orig).cloned();
        let vip = snap.app_addrs.by_vip.get(&orig).cloned();
        // What the service declares its app speaks on the app port this reaches.
        let declared = match (&app, &vip) {
            (Some(t), _) => snap
                .services
                .get(&t.service)
                .and_then(|svc| svc.app_protocols.of(orig.port())),
            (None, Some((service, target))) => snap
                .services
                .get(service)
                .and_then(|svc| svc.app_protocols.of(*target)),
            (None, None) => None,
        };
        (
            app,
            snap.app_addrs.by_ip.get(&orig.ip()).cloned(),
            vip,
            declared,
        )
    };
    // A service's virtual IP (ClusterIP): HTTP goes through the service's routes; anything
    // else goes opaque to one of its ready endpoints, on the port the service port targets.
    if app.is_none()
        && let Some((service, target)) = vip
    {
        if detect_http(&out.ports, &s, orig.port(), declared).await {
            serve_http(out, service, s, watcher).await;
            return;
        }
        let pick = {
            let snap = out.snapshots.load();
            snap.services.get(&service).and_then(|svc| {
                let ready: Vec<_> = svc.endpoints.iter().filter(|e| e.ready).collect();
                let i = fastrand::usize(..ready.len().max(1));
                ready.get(i).map(|e| {
                    let id = e.identity.clone().unwrap_or_else(|| svc.identity.clone());
                    (id, e.addr)
                })
            })
        };
        match pick {
            Some((identity, inbound)) => {
                if let Err(e) = opaque(&out.pool, s, (&service, &identity), inbound, target).await {
                    tracing::debug!(%orig, %service, error = %e, "opaque stream ended");
                }
            }
            None => tracing::debug!(%orig, %service, "no ready endpoint for an opaque stream"),
        }
        return;
    }
    let Some(t) = app.clone().or(endpoint) else {
        let (external, registry_only) = {
            let snap = out.snapshots.load();
            (
                snap.app_addrs.by_external.get(&orig).cloned(),
                snap.registry_only,
            )
        };
        match external {
            Some(service) => {
                if detect_http(&out.ports, &s, orig.port(), None).await {
                    serve_http(out, service, s, watcher).await;
                } else {
                    passthrough(s, orig).await;
                }
            }
            None if registry_only => deny(&out, s, orig, watcher).await,
            None => passthrough(s, orig).await,
        }
        return;
    };
    // Only an app address can be served as HTTP for its service; any other port is opaque.
    if app.is_some() && detect_http(&out.ports, &s, orig.port(), declared).await {
        serve_http(out, t.service.clone(), s, watcher).await;
        return;
    }
    if let Err(e) = opaque(
        &out.pool,
        s,
        (&t.service, &t.identity),
        t.inbound,
        orig.port(),
    )
    .await
    {
        tracing::debug!(%orig, service = %t.service, error = %e, "opaque stream ended");
    }
}

/// Whether the client speaks HTTP. A port its service declares opaque, or that is opaque by
/// default, `--opaque-ports` or learned to be server-first, skips detection; a port declared
/// HTTP waits for a slow client's first bytes as long as a request head may take.
async fn detect_http(
    ports: &PortKinds,
    s: &TcpStream,
    port: u16,
    declared: Option<mesh_model::AppProtocol>,
) -> bool {
    use mesh_model::AppProtocol as A;
    let window = match declared {
        Some(A::Opaque) => return false,
        Some(A::Http1 | A::Http2) => crate::http::server::HEADER_READ_TIMEOUT,
        None => match ports.window(port) {
            Some(w) => w,
            None => return false,
        },
    };
    let (d, silent) = detect_within(s, window).await;
    if declared.is_none() {
        ports.learn(port, d == Detected::Http, silent);
    }
    d == Detected::Http
}

/// Ports whose connections are opaque without detection: server-first or binary protocols
/// (SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch transport, Memcached), as Linkerd
/// lists by default. `--opaque-ports` adds to them.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// What the proxy knows of destination ports: declared opaque, or learned by detection, so a
/// server-first protocol on an undeclared port pays the detection window once per port, and a
/// port known to speak HTTP waits for a slow client's first bytes as long as a request head
/// may take instead of giving up on it.
#[derive(Debug, Default)]
pub struct PortKinds {
    opaque: Vec<u16>,
    learned: crate::FastDashMap<u16, bool>,
}

impl PortKinds {
    /// The default opaque ports plus `extra`.
    pub fn new(extra: &[u16]) -> Self {
        let mut opaque = DEFAULT_OPAQUE_PORTS.to_vec();
        opaque.extend_from_slice(extra);
        Self {
            opaque,
            learned: Default::default(),
        }
    }

    /// How long to wait for a client's first bytes on `port`; None: opaque at once.
    pub fn window(&self, port: u16) -> Option<Duration> {
        if self.opaque.contains(&port) {
            return None;
        }
        match self.learned.get(&port).map(|v| *v) {
            Some(true) => Some(crate::http::server::HEADER_READ_TIMEOUT),
            Some(false) => None,
            None => Some(DETECT_TIMEOUT),
        }
    }

    /// Remembers what a detection found: HTTP, or silence (server-first). A client-first
    /// protocol that is not HTTP is told apart at once anyway and is not remembered.
    pub fn learn(&self, port: u16, http: bool, silent: bool) {
        if http {
            self.learned.insert(port, true);
        } else if silent && self.learned.get(&port).is_none() {
            tracing::info!(
                port,
                "no bytes from the client within the detection window: port {port} is server-first, opaque from now on"
            );
            self.learned.insert(port, false);
        }
    }
}

/// Serves the connection as HTTP calls of `service`, whatever Host they name.
async fn serve_http(out: Arc<Outbound>, service: Arc<str>, s: TcpStream, watcher: Watcher) {
    let service = Some(service);
    serve(
        s,
        hyper::service::service_fn(move |r| out.clone().handle(service.clone(), r)),
        Client::App,
        watcher,
    )
    .await;
}

/// An opaque stream over mTLS to the sidecar of an endpoint of `service` (whose endpoints
/// present `identity`), counted in the `istio_tcp_*` families.
async fn opaque(
    pool: &Pool,
    mut s: TcpStream,
    (service, identity): (&Arc<str>, &Arc<str>),
    inbound: SocketAddr,
    app_port: u16,
) -> std::io::Result<()> {
    use crate::telemetry::metrics::{Direction, TcpStream as Counted, metrics};
    let mut peer = pool
        .dedicated(
            inbound,
            identity,
            Dedicated::Opaque { app_port },
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(std::io::Error::other)?;
    let empty: Arc<str> = Arc::from("");
    let counted = Counted::open(metrics().tcp(Direction::Outbound, &empty, service, identity));
    let r = tokio::io::copy_bidirectional(&mut s, &mut peer).await;
    let (from_caller, to_caller) = r.as_ref().copied().unwrap_or_default();
    counted.closed(from_caller, to_caller);
    r.map(|_| ())
}

/// A destination outside the registry under registry-only egress: HTTP gets a 502 that says
/// why; any other protocol cannot carry one, and the connection is closed.
async fn deny(out: &Outbound, s: TcpStream, orig: SocketAddr, watcher: Watcher) {
    tracing::debug!(%orig, "egress denied: not a mesh service or a declared external");
    if !detect_http(&out.ports, &s, orig.port(), None).await {
        return;
    }
    let why = orig.to_string();
    serve(
        s,
        hyper::service::service_fn(move |r: http::Request<hyper::body::Incoming>| {
            let grpc = crate::http::is_grpc(r.headers());
            let resp = crate::http::errors::ProxyError::EgressDenied(why.clone()).to_response(grpc);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        }),
        Client::App,
        watcher,
    )
    .await;
}

/// Not a mesh destination: connect to it directly (the proxy's own traffic is not redirected)
/// and copy both ways.
async fn passthrough(mut s: TcpStream, orig: SocketAddr) {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(orig)).await {
        Ok(Ok(mut up)) => {
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
        }
        Ok(Err(e)) => tracing::debug!(%orig, error = %e, "passthrough connect failed"),
        Err(_) => tracing::debug!(%orig, "passthrough connect timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_from_other_protocols() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(classify(b"PO"), None, "could still be POST");
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque), "TLS");
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Some(Detected::Opaque),
            "Redis"
        );
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
    }

    #[test]
    fn a_server_first_port_pays_detection_once_and_declared_ones_never() {
        let p = PortKinds::new(&[7000]);
        assert_eq!(p.window(5432), None, "a default opaque port");
        assert_eq!(p.window(7000), None, "declared opaque");
        assert_eq!(p.window(8080), Some(DETECT_TIMEOUT), "unknown: detect");
        p.learn(8080, true, false);
        assert_eq!(
            p.window(8080),
            Some(crate::http::server::HEADER_READ_TIMEOUT),
            "known HTTP: a slow client is waited for"
        );
        p.learn(2525, false, true);
        assert_eq!(p.window(2525), None, "learned server-first");
        p.learn(9000, false, false);
        assert_eq!(
            p.window(9000),
            Some(DETECT_TIMEOUT),
            "client-first, not HTTP"
        );
        // A port once seen speaking HTTP stays HTTP after a silent client.
        p.learn(8080, false, true);
        assert!(p.window(8080).is_some());
    }
}
