//! The inbound proxy's connections to its local app: one HTTP/2 connection shared by every
//! request that speaks HTTP/2, and HTTP/1.1 connections that carry one request at a time.
//! Requests reach the app as a direct caller would have sent them (`http::framing::for_origin`:
//! origin-form and Host for HTTP/1.1, `:authority` for HTTP/2); the address is always the app's.

use crate::balance::state::Now;
use crate::http::body::Resend;
use crate::http::body::{ReqBody, RespBody};
use crate::http::coalesce::Coalesce;
use crate::http::errors::ProxyError;
use crate::http::h2client::{H2Sender, SendError, never_processed};
use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest as Http1Sender;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;

/// A request body to the app: the caller's, or empty when a bodyless request is replayed.
pub(super) type AppBody =
    http_body_util::Either<crate::http::body::Upload, http_body_util::Empty<bytes::Bytes>>;

/// A new connection to the app.
async fn connect_app(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| ProxyError::App(format!("connecting to {addr}: {e}")))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// How long an HTTP/1.1 connection to the app may stay unused: 3 s, as Linkerd's inbound
/// HTTP/1.1 pool. It is under the keep-alive timeouts app servers close idle connections with
/// (Node's `http` and uvicorn 5 s), so the sidecar closes first instead of racing the app's
/// close with a request, and connections opened for a burst close soon after it, since
/// requests keep to the most recently used ones (`take_latest`).
pub(super) const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often `AppH1::sweep` runs: often enough that a connection closes within about
/// `APP_IDLE_TIMEOUT` + 1 s of its last use, still under a 5 s app timeout.
pub(crate) const APP_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// HTTP/1.1 connections to the app, one request at a time each. Every open connection is in
/// `conns`, busy or not: a request takes the most recently used one that is ready for a new
/// request, and opens another when none is. The lock is held for that scan or a push, never
/// across an await; with one worker, the sidecar's default, it is never contended. This
/// replaced hyper-util's general pool, whose checkout, key hashing and return task cost ~15%
/// of a proxy's instructions per HTTP/1.1 request.
pub(super) struct AppH1 {
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

impl AppH1 {
    pub(super) fn new(addr: SocketAddr, idle_timeout: Duration) -> Self {
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
        take_latest(
            &mut self.conns(),
            |c| c.sender.is_closed(),
            |c| c.sender.is_ready(),
        )
        .map(|c| c.sender)
    }

    /// Puts a connection back as soon as the answer's head is in; it is not ready for another
    /// request until the body is through, and `take_ready` passes it over until then.
    fn put(&self, sender: Http1Sender<AppBody>) {
        let used_ms = Now::get().ms();
        self.conns().push(H1Conn { sender, used_ms });
    }

    async fn connect(&self) -> Result<Http1Sender<AppBody>, ProxyError> {
        let io = connect_app(self.addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| app_error(&e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/1.1 app connection closed");
            }
        });
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
    pub(super) async fn request(
        &self,
        req: Request<AppBody>,
        replay: Option<Resend>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender().await?;
        let again = match sender.try_send_request(req).await {
            Ok(r) => {
                self.put(sender);
                return Ok(r);
            }
            Err(mut e) => match (e.take_message(), replay) {
                (Some(unsent), _) => unsent,
                (None, Some(head)) if e.error().is_incomplete_message() => {
                    tracing::debug!("app closed the connection before answering; sent again");
                    head.with_body(AppBody::Right(http_body_util::Empty::new()))
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

    /// Sends a request that asks to switch protocols on a connection of its own, which the
    /// answer's upgrade then owns (never pooled).
    pub(super) async fn upgrade(
        &self,
        req: Request<AppBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let io = connect_app(self.addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| app_error(&e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "app connection for an upgrade closed");
            }
        });
        sender.send_request(req).await.map_err(|e| app_error(&e))
    }

    /// Closes connections unused for `idle_timeout`.
    pub(super) fn sweep(&self) {
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

/// Takes the last ready entry of `list`, which is in the order entries were put back, and
/// drops the closed ones it passes on the way; the scan stops at the first ready one from the
/// end, usually the last. The order is kept (`remove`, not `swap_remove`, which would move
/// the newest entry to where an older one was taken), so that requests keep to the most
/// recently used connections and the others go idle and are swept.
fn take_latest<T>(
    list: &mut Vec<T>,
    closed: impl Fn(&T) -> bool,
    ready: impl Fn(&T) -> bool,
) -> Option<T> {
    let mut i = list.len();
    while i > 0 {
        i -= 1;
        let c = list.get(i)?;
        if closed(c) {
            list.remove(i);
        } else if ready(c) {
            return Some(list.remove(i));
        }
    }
    None
}

/// The one HTTP/2 connection to the app, shared by every request that goes to it over
/// HTTP/2. It is opened on first use and again after the app closes it. A request takes it
/// with an atomic load and a clone, without the general pool's checkout, key hashing and
/// extra channel, which cost ~4% of a proxy's instructions per gRPC request. It is driven with
/// h2 directly (see `http::h2client`), like the connections to peer sidecars.
pub(super) struct AppH2 {
    addr: SocketAddr,
    ready: ArcSwapOption<H2Sender>,
    /// Serialises connecting, so a burst of first requests opens one connection.
    connecting: tokio::sync::Mutex<()>,
    /// The app's protocol is detected, not declared: each new connection is proven with a
    /// PING, and an app that does not answer it as HTTP/2 is marked `h1_only`.
    detect: bool,
    h1_only: AtomicBool,
}

/// How long an app has to answer the PING that proves it speaks HTTP/2.
const H2_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl AppH2 {
    pub(super) fn new(addr: SocketAddr, detect: bool) -> Self {
        Self {
            addr,
            ready: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            detect,
            h1_only: AtomicBool::new(false),
        }
    }

    /// False once detection found that the app does not speak HTTP/2. The first call (and
    /// the first after the app closed its connection) connects, so that the request knows
    /// before it is shaped and sent.
    pub(super) async fn speaks_h2(&self) -> bool {
        if self.h1_only.load(Ordering::Relaxed) {
            return false;
        }
        if !self.detect || self.ready.load().as_ref().is_some_and(|s| !s.is_closed()) {
            return true;
        }
        // A connect error other than the failed proof is the request's own to report.
        let _ = Box::pin(self.connect()).await;
        !self.h1_only.load(Ordering::Relaxed)
    }

    fn live(&self) -> Option<Arc<H2Sender>> {
        self.ready.load_full().filter(|s| !s.is_closed())
    }

    async fn sender(&self) -> Result<Arc<H2Sender>, ProxyError> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        // Boxed: connecting is rare, and inline it would more than double the size of every
        // request's future.
        Box::pin(self.connect()).await
    }

    async fn connect(&self) -> Result<Arc<H2Sender>, ProxyError> {
        let _g = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        // Writes coalesced: HTTP/2 only, since hyper writes an HTTP/1.1 message in one go.
        let io = Coalesce::new(connect_app(self.addr).await?);
        let sender = if self.detect {
            H2Sender::handshake_checked(io, H2_CHECK_TIMEOUT, self.addr)
                .await
                .inspect_err(|e| {
                    tracing::info!(addr = %self.addr, error = %e, "the app does not speak HTTP/2 (h2c); HTTP/1.1 from now on");
                    self.h1_only.store(true, Ordering::Relaxed);
                })
        } else {
            H2Sender::handshake(io, None, self.addr).await
        }
        .map_err(|e| app_error(&e))?;
        let sender = Arc::new(sender);
        self.ready.store(Some(sender.clone()));
        Ok(sender)
    }

    /// Sends `req`; a request the connection gave back unsent (the app closed it or is closing
    /// it) goes once more on a new connection, and so does `replay` (a copy of a bodyless
    /// request) when the app's GOAWAY or REFUSED_STREAM says it never processed the stream
    /// (RFC 9113 §6.8, §8.7): what a graceful close by the app leaves in flight.
    pub(super) async fn request(
        &self,
        mut req: Request<ReqBody>,
        replay: Option<Resend>,
    ) -> Result<Response<RespBody>, ProxyError> {
        for _ in 0..2 {
            let sender = self.sender().await?;
            match H2Sender::clone(&sender).send(req).await {
                Ok(resp) => return Ok(resp.map(RespBody::Right)),
                Err(SendError::Unsent(back, e)) => {
                    // No longer offered: the next attempt opens a new connection (unless
                    // another request did already).
                    tracing::debug!(addr = %self.addr, error = %e, "app connection gave the request back");
                    self.ready.compare_and_swap(&Some(sender), None);
                    req = *back;
                }
                Err(SendError::Failed(e)) => match replay.as_ref().and_then(Resend::again) {
                    Some(again) if never_processed(&e) => {
                        tracing::debug!(addr = %self.addr, error = %e, "the app did not process the stream; sent again");
                        self.ready.compare_and_swap(&Some(sender), None);
                        req = again;
                    }
                    _ => return Err(app_error(&e)),
                },
            }
        }
        Err(ProxyError::App(format!(
            "HTTP/2 connection to {} closed before the request went out, twice",
            self.addr
        )))
    }
}

fn app_error(e: &dyn std::error::Error) -> ProxyError {
    let why = e
        .source()
        .map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
    tracing::debug!(error = %why, "app request failed");
    ProxyError::App(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use tokio::net::TcpListener;

    fn get() -> Request<ReqBody> {
        Request::builder()
            .uri("http://app/hello")
            .version(Version::HTTP_2)
            .body(ReqBody::Empty)
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
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
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
        let app = AppH2::new(addr, false);
        for i in 0..3 {
            let resp = tokio::time::timeout(Duration::from_secs(5), app.request(get(), None))
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
        let e = AppH2::new(addr, false)
            .request(get(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::App(_)), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}

#[cfg(test)]
mod h1_tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
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

    /// Entries `(id, closed, ready)`; what `take_latest` takes, and the order it leaves.
    #[test]
    fn app_h1_takes_the_latest_ready_connection_and_keeps_the_order() {
        let take = |l: &mut Vec<(u8, bool, bool)>| take_latest(l, |c| c.1, |c| c.2).map(|c| c.0);
        // Put back oldest first: 1, 2, 3, 4; the two newest still busy with their bodies.
        let mut l = vec![
            (1, false, true),
            (2, false, true),
            (3, false, false),
            (4, false, false),
        ];
        assert_eq!(take(&mut l), Some(2));
        assert_eq!(l.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(take(&mut l), Some(1));
        assert_eq!(
            l.iter().map(|c| c.0).collect::<Vec<_>>(),
            [3, 4],
            "the newest stays last, so it is the next one taken once ready"
        );
        // Closed ones are dropped on the way; none ready: none taken, the rest in order.
        let mut l = vec![(1, false, false), (2, true, true), (3, false, false)];
        assert_eq!(take(&mut l), None);
        assert_eq!(l.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
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
        let (parts, b) = req.into_parts();
        let replay = Some(Resend::head(&parts));
        let req = Request::from_parts(parts, b);
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
