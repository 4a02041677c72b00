//! `mesh-example`: the example workloads of the demo and the end-to-end tests.
//!
//! `serve` answers HTTP/1.1 and h2c with a JSON description of the request (service, version,
//! protocol, the caller identity its sidecar reported) and serves the gRPC `Echo` service on the
//! same port; `/status/<code>` answers with that status, `/delay/<ms>` answers after a delay;
//! `/bytes/<n>` answers n bytes (benchmarks); with `--call` it calls another mesh service through its sidecar first.
//! Controlled failures for the resilience tests: `/fail/<pct>` fails that share of its requests
//! (500, spread evenly), `/reset` reads the body then drops the connection without answering;
//! `/admin/sick/<pct>` makes that share of all requests fail with 500 (100: all, 0: none), `/admin/delay/<ms>` delays every
//! request, `/admin/stats` counts the requests served (admin paths excluded).
//! `load` sends requests at a fixed rate through a sidecar and prints the split by version.
#![forbid(unsafe_code)]

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proto::example::{EchoReply, EchoRequest, echo_server};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_stream::Stream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Parser)]
#[command(about = "Example workloads for the mesh demo and tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1, h2c and gRPC on one port.
    Serve {
        #[arg(long)]
        service: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Mesh service to call on each request (through --proxy).
        #[arg(long, requires = "proxy")]
        call: Option<String>,
        /// The sidecar's outbound address.
        #[arg(long)]
        proxy: Option<SocketAddr>,
        /// Runtime threads (default: one per core). One costs least per request, but serves
        /// nothing while its thread waits for a core (`mesh-bench --app-threads`).
        #[arg(long)]
        threads: Option<std::num::NonZeroUsize>,
    },
    /// Send requests through a sidecar at a fixed rate and print the split by version.
    Load {
        #[arg(long)]
        proxy: SocketAddr,
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 20)]
        rps: u32,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        duration_secs: Option<u64>,
    },
}

/// Always dials the sidecar, whatever host the URI names (an HTTP proxy client).
#[derive(Clone, Copy)]
struct ProxyConnector(SocketAddr);

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Uri) -> Self::Future {
        let a = self.0;
        Box::pin(async move { Ok(TokioIo::new(TcpStream::connect(a).await?)) })
    }
}

type ProxyClient = Client<ProxyConnector, Full<Bytes>>;

struct App {
    service: String,
    version: String,
    /// Requests being served now (`/inflight` reports it; tests wait on it).
    inflight: std::sync::atomic::AtomicUsize,
    call: Option<(String, ProxyClient)>,
    /// Requests served (not counting /admin/ and /inflight).
    served: AtomicU64,
    /// Sequence of `/fail/<pct>` requests, to spread failures evenly.
    fail_seq: AtomicU64,
    /// Share of requests failed on purpose, percent.
    sick: AtomicU64,
    sick_seq: AtomicU64,
    delay_ms: AtomicU64,
    /// `/bytes/<n>` answers a slice of this, so a benchmark's request allocates no body.
    filler: Bytes,
}

/// The largest `/bytes/<n>` answer.
const MAX_BYTES: usize = 1 << 20;

/// Why the app drops a connection on purpose (`/reset`).
#[derive(Debug, thiserror::Error)]
#[error("reset on purpose after reading the request body")]
struct ResetOnPurpose;

/// The caller identity from `x-forwarded-client-cert: By=…;URI=<caller>`.
/// The caller's identity as its sidecar told it: the mesh's and Envoy's `x-forwarded-client-cert`
/// URI, or Linkerd's `l5d-client-id`.
fn peer_of(h: &http::HeaderMap) -> String {
    h.get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
        .or_else(|| h.get("l5d-client-id").and_then(|v| v.to_str().ok()))
        .unwrap_or("")
        .to_string()
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl App {
    /// `/admin/...`: test controls, answered at once and not counted.
    fn admin(&self, path: &str) -> Response<Body> {
        let num = |p: &str| path.strip_prefix(p).and_then(|n| n.parse::<u64>().ok());
        if let Some(pct) = num("/admin/sick/") {
            self.sick.store(pct.min(100), Ordering::SeqCst);
        } else if let Some(ms) = num("/admin/delay/") {
            self.delay_ms.store(ms.min(60_000), Ordering::SeqCst);
        } else if path != "/admin/stats" {
            return json_response(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "unknown admin path"}),
            );
        }
        json_response(
            StatusCode::OK,
            serde_json::json!({
                "requests": self.served.load(Ordering::SeqCst),
                "sick": self.sick.load(Ordering::SeqCst),
                "delay_ms": self.delay_ms.load(Ordering::SeqCst),
            }),
        )
    }

    async fn http(&self, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
        use std::sync::atomic::Ordering::SeqCst;
        let path = req.uri().path();
        if path.starts_with("/admin/") {
            return Ok(self.admin(path));
        }
        if path == "/inflight" {
            return Ok(json_response(
                StatusCode::OK,
                serde_json::json!({"inflight": self.inflight.load(SeqCst)}),
            ));
        }
        // Read the whole body first, as a well-behaved app does: an HTTP/1.1 server that
        // answers before reading it closes the keep-alive connection under its caller.
        let (req, body) = req.into_parts();
        let body = http_body_util::Limited::new(body, 1 << 20)
            .collect()
            .await?
            .to_bytes();
        let path = req.uri.path();
        self.served.fetch_add(1, SeqCst);
        let delay = self.delay_ms.load(SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let sick = self.sick.load(SeqCst);
        let n = self.sick_seq.fetch_add(1, SeqCst);
        // Spread evenly: request n fails when the running count of failures steps up.
        if sick > 0 && (n + 1) * sick / 100 != n * sick / 100 {
            return Ok(json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": "sick", "version": self.version}),
            ));
        }
        if path == "/reset" {
            // Fails so the server drops the connection / resets the stream.
            return Err(Box::new(ResetOnPurpose));
        }
        if let Some(pct) = path
            .strip_prefix("/fail/")
            .and_then(|p| p.parse::<u64>().ok())
        {
            let n = self.fail_seq.fetch_add(1, SeqCst);
            let pct = pct.min(100);
            if (n + 1) * pct / 100 != n * pct / 100 {
                return Ok(json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": "failing on purpose", "version": self.version}),
                ));
            }
        }
        Ok(self.http_inner(&req, body.len()).await)
    }

    async fn http_inner(&self, req: &http::request::Parts, body_bytes: usize) -> Response<Body> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(n) = req
            .uri
            .path()
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            // Benchmarks: a fixed-size body with no per-request formatting.
            let mut r = Response::new(
                Full::new(self.filler.slice(..n.min(MAX_BYTES)))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            return r;
        }
        self.inflight.fetch_add(1, SeqCst);
        let r = self.respond(req, body_bytes).await;
        self.inflight.fetch_sub(1, SeqCst);
        r
    }

    async fn respond(&self, req: &http::request::Parts, body_bytes: usize) -> Response<Body> {
        let path = req.uri.path().to_string();
        let mut body = serde_json::json!({
            "service": self.service,
            "version": self.version,
            "protocol": format!("{:?}", req.version),
            "method": req.method.as_str(),
            "path": path,
            "query": req.uri.query(),
            "body_bytes": body_bytes,
            "host": req.headers.get("host").and_then(|h| h.to_str().ok()).or(req.uri.authority().map(|a| a.as_str())),
            "peer": peer_of(&req.headers),
            // The W3C trace context the app was called with (its sidecar's span is the parent).
            "traceparent": req.headers.get("traceparent").and_then(|v| v.to_str().ok()),
            "tracestate": req.headers.get("tracestate").and_then(|v| v.to_str().ok()),
            "baggage": req.headers.get("baggage").and_then(|v| v.to_str().ok()),
            // The request's x- headers (route header edits are checked with these).
            "x_headers": req.headers.iter()
                .filter(|(n, _)| n.as_str().starts_with("x-") && n.as_str() != "x-forwarded-client-cert")
                .map(|(n, v)| (n.as_str().to_string(), serde_json::Value::from(v.to_str().unwrap_or(""))))
                .collect::<serde_json::Map<_, _>>(),
        });
        let mut status = StatusCode::OK;
        if let Some(ms) = path
            .strip_prefix("/delay/")
            .and_then(|c| c.parse::<u64>().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        }
        if let Some(code) = path
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
        {
            status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        }
        if let Some((target, client)) = &self.call {
            let uri = format!("http://{target}{path}");
            let r = async {
                let resp = client
                    .request(Request::get(uri).body(Full::new(Bytes::new()))?)
                    .await?;
                let st = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>((
                    st,
                    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or(
                        serde_json::Value::String(String::from_utf8_lossy(&bytes).into()),
                    ),
                ))
            }
            .await;
            match r {
                Ok((st, v)) => {
                    status = st;
                    body["upstream"] = v;
                }
                Err(e) => {
                    status = StatusCode::BAD_GATEWAY;
                    body["upstream_error"] = e.to_string().into();
                }
            }
        }
        json_response(status, body)
    }
}

struct Echo {
    served_by: String,
    app: Arc<App>,
}

impl Echo {
    /// A sick app (`/admin/sick/100`) fails every call as a real gRPC server does: HTTP 200
    /// with UNAVAILABLE, trailers-only for a unary call, in the trailers after the items for
    /// a stream.
    fn sick(&self) -> bool {
        self.app.sick.load(std::sync::atomic::Ordering::SeqCst) >= 100
    }
}

#[tonic::async_trait]
impl echo_server::Echo for Echo {
    async fn unary(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let peer = peer_of(req.metadata().as_ref());
        let grpc_timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let m = req.into_inner();
        if self.sick() {
            return Err(tonic::Status::unavailable("sick on purpose"));
        }
        if m.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(m.delay_ms.min(60_000)))).await;
        }
        Ok(tonic::Response::new(EchoReply {
            message: m.message,
            served_by: self.served_by.clone(),
            peer_identity: peer,
            grpc_timeout,
        }))
    }

    type ServerStreamStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

    async fn server_stream(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        let peer = peer_of(req.metadata().as_ref());
        let m = req.into_inner();
        let count = m.count.min(10_000);
        let served_by = self.served_by.clone();
        let items = (0..count).map(move |i| {
            Ok(EchoReply {
                message: format!("{} {i}", m.message),
                served_by: served_by.clone(),
                peer_identity: peer.clone(),
                grpc_timeout: String::new(),
            })
        });
        let end = self
            .sick()
            .then(|| Err(tonic::Status::unavailable("sick on purpose")));
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(
            items.chain(end),
        ))))
    }

    async fn client_stream(
        &self,
        req: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let peer = peer_of(req.metadata().as_ref());
        let mut stream = req.into_inner();
        let mut words = Vec::new();
        while let Some(m) = stream.message().await? {
            words.push(m.message);
        }
        if self.sick() {
            return Err(tonic::Status::unavailable("sick on purpose"));
        }
        let joined = format!("{} ({})", words.join(" "), words.len());
        Ok(tonic::Response::new(self.reply(joined, &peer)))
    }

    type BidiStreamStream = Pin<Box<dyn Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

    async fn bidi_stream(
        &self,
        req: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::BidiStreamStream>, tonic::Status> {
        let peer = peer_of(req.metadata().as_ref());
        let stream = req.into_inner();
        let echo = Echo {
            served_by: self.served_by.clone(),
            app: self.app.clone(),
        };
        let out = tokio_stream::StreamExt::map(stream, move |m| {
            m.map(|m| echo.reply(format!("echo {}", m.message), &peer))
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

type Grpc = echo_server::EchoServer<Echo>;

impl Echo {
    fn reply(&self, message: String, peer: &str) -> EchoReply {
        EchoReply {
            message,
            served_by: self.served_by.clone(),
            peer_identity: peer.to_string(),
            grpc_timeout: String::new(),
        }
    }
}

fn box_err(e: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(e)
}

/// gRPC to the Echo service, everything else to the HTTP handler.
async fn handle(
    app: Arc<App>,
    mut grpc: Grpc,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let is_grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        let r = tower_service::Service::call(&mut grpc, req)
            .await
            .map_err(box_err)?;
        Ok(r.map(|b| b.map_err(box_err).boxed_unsync()))
    } else if req.uri().path() == "/ws" {
        Ok(websocket(req))
    } else {
        app.http(req).await
    }
}

/// `/ws`: a WebSocket echo (tokio-tungstenite), each message answered as `echo:<message>`.
/// A request that is not a WebSocket handshake gets 426.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()));
    let wants = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let (Some(accept), true) = (key, wants) else {
        return json_response(
            StatusCode::UPGRADE_REQUIRED,
            serde_json::json!({"error": "a WebSocket handshake, please"}),
        );
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(up),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(m)) = ws.next().await {
            let reply = match m {
                Message::Text(t) => Message::text(format!("echo:{}", t.as_str())),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    h.insert("connection", http::HeaderValue::from_static("upgrade"));
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

async fn serve(
    service: String,
    version: String,
    listen: SocketAddr,
    call: Option<(String, SocketAddr)>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let call = call.map(|(t, p)| {
        (
            t,
            Client::builder(TokioExecutor::new()).build(ProxyConnector(p)),
        )
    });
    let served_by = format!("{service}/{version}");
    let app = Arc::new(App {
        service,
        version,
        inflight: 0.into(),
        call,
        served: 0.into(),
        fail_seq: 0.into(),
        sick: 0.into(),
        sick_seq: 0.into(),
        delay_ms: 0.into(),
        filler: Bytes::from(vec![b'x'; MAX_BYTES]),
    });
    let grpc = echo_server::EchoServer::new(Echo {
        served_by,
        app: app.clone(),
    });
    println!(
        "{}",
        serde_json::json!({"event": "listening", "addr": listener.local_addr()?.to_string()})
    );
    loop {
        let (s, _) = listener.accept().await?;
        // Without it, a gRPC answer's trailers wait out Nagle against the caller's delayed ACK.
        let _ = s.set_nodelay(true);
        let (app, grpc) = (app.clone(), grpc.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                handle(app.clone(), grpc.clone(), req)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn load(
    proxy: SocketAddr,
    url: String,
    rps: u32,
    duration: Option<Duration>,
) -> anyhow::Result<()> {
    let client: ProxyClient = Client::builder(TokioExecutor::new()).build(ProxyConnector(proxy));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps.max(1))));
    let started = tokio::time::Instant::now();
    let mut window_start = started;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    loop {
        tick.tick().await;
        if duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        let res = async {
            let resp = client
                .request(Request::get(url.as_str()).body(Full::new(Bytes::new()))?)
                .await?;
            let st = resp.status();
            let v: serde_json::Value =
                serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())
                    .unwrap_or_default();
            // The deepest service in the chain says which version answered.
            let mut leaf = &v;
            while leaf.get("upstream").is_some() {
                leaf = &leaf["upstream"];
            }
            let who = format!(
                "{} {}",
                leaf["service"].as_str().unwrap_or("?"),
                leaf["version"].as_str().unwrap_or("?")
            );
            Ok::<_, BoxError>((st, who))
        }
        .await;
        match res {
            Ok((st, who)) if st.is_success() => {
                ok += 1;
                *counts.entry(who).or_default() += 1;
            }
            _ => failed += 1,
        }
        if window_start.elapsed() >= Duration::from_secs(2) {
            let total: u64 = counts.values().sum();
            let split: Vec<String> = counts
                .iter()
                .map(|(k, n)| format!("{k} {n} ({:.0}%)", *n as f64 * 100.0 / total.max(1) as f64))
                .collect();
            println!("last 2s: {ok} ok, {failed} failed | {}", split.join(" | "));
            counts.clear();
            (ok, failed) = (0, 0);
            window_start = tokio::time::Instant::now();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match cli.cmd {
        Cmd::Serve { threads, .. } => threads,
        Cmd::Load { .. } => None,
    };
    let rt = match threads.map(std::num::NonZeroUsize::get) {
        // One thread: no work stealing, no wake-ups across threads.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Serve {
                service,
                version,
                listen,
                call,
                proxy,
                threads: _,
            } => serve(service, version, listen, call.zip(proxy)).await,
            Cmd::Load {
                proxy,
                url,
                rps,
                duration_secs,
            } => load(proxy, url, rps, duration_secs.map(Duration::from_secs)).await,
        }
    })
}
