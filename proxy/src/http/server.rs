//! Serving HTTP/1.1 and HTTP/2 on accepted connections with the proxy's limits, and the accept
//! loop every listener shares (stop on shutdown; connections drain through `Watcher`).

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Time a client has to send its request headers (slowloris bound).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head, bytes (HTTP/1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most headers in one HTTP/1 request.
pub const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 1024;
/// Open connections per listener; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 10_000;
/// HTTP/2 streams an app may reset before the server answers them (rapid reset bound);
/// past it the connection is closed with GOAWAY.
pub const MAX_PENDING_RESETS: usize = 50;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// An app, or a plaintext caller: bounded as a possibly hostile client.
    App,
    /// Another sidecar (mTLS). Its one connection carries the requests of many of its clients,
    /// and when they go away it cancels their streams at once: a burst of resets is normal
    /// there (each of its clients was bounded by that sidecar), so it may reset as many
    /// streams as it may open rather than having the shared connection closed.
    MeshPeer,
}

/// What one client may make the proxy hold; set once at start (`--max-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_streams: u32,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_header_bytes: MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            max_streams: MAX_STREAMS,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

static LIMITS: OnceLock<ServerLimits> = OnceLock::new();

/// Sets the limits (once, before listening).
pub fn set_limits(l: ServerLimits) {
    let _ = LIMITS.set(l);
}

pub fn limits() -> ServerLimits {
    LIMITS.get().copied().unwrap_or_default()
}

/// A connection builder with the proxy's limits.
pub fn builder(client: Client) -> auto::Builder<TokioExecutor> {
    let l = limits();
    let resets = match client {
        Client::App => MAX_PENDING_RESETS,
        Client::MeshPeer => (l.max_streams as usize).max(MAX_PENDING_RESETS),
    };
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.header_read_timeout)
        .max_buf_size(l.max_header_bytes.max(8192))
        .max_headers(l.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_streams)
        .max_header_list_size(l.max_header_bytes as u32)
        .max_pending_accept_reset_streams(Some(resets))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    if client == Client::App {
        // RFC 8441: an app's HTTP/2 client may open a WebSocket with extended CONNECT.
        b.http2().enable_connect_protocol();
    }
    b
}

/// Serves one connection until it ends or drain completes.
pub async fn serve<I, S, B>(io: I, svc: S, client: Client, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_bounded(io, svc, client, watcher, None).await;
}

/// As [`serve`]; with `bound` (the drain signal, and a deadline) the connection also ends,
/// gracefully (GOAWAY, or `Connection: close` after the request in flight), at the deadline:
/// for a mesh peer, the moment the certificate that opened it expires. A connection lives no
/// longer than that certificate, so a workload whose renewals are refused (revoked) drops
/// out when its certificate expires, not when its connections happen to close. The watcher
/// is held so that drain waits for the connection.
pub async fn serve_bounded<I, S, B>(
    io: I,
    svc: S,
    client: Client,
    watcher: Watcher,
    bound: Option<(watch::Receiver<bool>, tokio::time::Instant)>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let b = builder(client);
    // Each request's future boxed: hyper spawns every HTTP/2 stream as a task holding it, and
    // moves it several times on the way in; a pointer moves cheaper than a whole handler.
    let svc = hyper::service::service_fn(move |req| Box::pin(svc.call(req)));
    let io = super::coalesce::Coalesce::new(io);
    let turns = io.turns();
    let conn = b
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    let Some((stop, until)) = bound else {
        if let Err(e) = turns.drive(watcher.watch(conn)).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return;
    };
    // The deadline and the drain signal are watched by a task of their own, which flags the
    // connection and wakes it: polling a timer and a watch channel along with the connection
    // on every wake cost ~1,000 instructions per request.
    let signal = Arc::new(Signal::default());
    let flag = signal.clone();
    let timer = tokio::spawn(async move {
        let why = tokio::select! {
            _ = stopped(stop) => "draining",
            _ = tokio::time::sleep_until(until) => "the peer's certificate expired",
        };
        tracing::debug!(why, "closing the connection gracefully");
        flag.fired.store(true, std::sync::atomic::Ordering::Release);
        flag.waker.wake();
    });
    let served = async move {
        let _held = watcher;
        tokio::pin!(conn);
        let mut shut = false;
        let r = std::future::poll_fn(|cx| {
            if !shut {
                signal.waker.register(cx.waker());
                if signal.fired.load(std::sync::atomic::Ordering::Acquire) {
                    conn.as_mut().graceful_shutdown();
                    shut = true;
                }
            }
            conn.as_mut().poll(cx)
        })
        .await;
        timer.abort();
        r
    };
    if let Err(e) = turns.drive(served).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Set (and the connection's task woken) when a bounded connection must close.
#[derive(Default)]
struct Signal {
    fired: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts until `shutdown` turns true; each connection is handed to `on_conn` on its own task,
/// with a `Watcher` so drain waits for it.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    lifecycle: Arc<crate::lifecycle::Lifecycle>,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = stopped(lifecycle.closing());
    tokio::pin!(stop);
    let open = Arc::new(Semaphore::new(limits().max_connections));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        // At the limit: close at once rather than queue (a flood must not
                        // grow memory or starve the connections already open).
                        crate::telemetry::metrics::metrics().connection_refused();
                        tracing::debug!(%peer, "connection limit reached; closing new connection");
                        continue;
                    };
                    // Past the drain's end: nothing new is served.
                    let Some(watcher) = lifecycle.watcher() else {
                        return;
                    };
                    let _ = s.set_nodelay(true);
                    let conn = on_conn(s, peer, watcher);
                    tokio::spawn(async move {
                        conn.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => return,
        }
    }
}
