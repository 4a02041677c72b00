//! Clients a test calls through the sidecars with: HTTP/1.1 and h2c through an outbound
//! listener (or inside a network namespace), single requests, paced and constant load.

use crate::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Always dials one address (a sidecar's outbound port), whatever the URI's host: an HTTP proxy
/// client. The proxy's own connector to its local app does exactly this.
/// Connects every request to one address (a sidecar's port), whatever the URI says; from
/// inside a network namespace the test made when `ns` is set.
#[derive(Clone)]
pub struct Dial {
    addr: SocketAddr,
    ns: Option<Arc<str>>,
}

impl Dial {
    /// Dials `addr` from this process's namespace.
    pub fn to(addr: SocketAddr) -> Self {
        Self { addr, ns: None }
    }

    /// Dials `addr` from inside namespace `ns`.
    pub fn in_netns(ns: &str, addr: SocketAddr) -> Self {
        Self {
            addr,
            ns: Some(ns.into()),
        }
    }
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, ns) = (self.addr, self.ns.clone());
        Box::pin(async move {
            let s = match ns {
                None => tokio::net::TcpStream::connect(addr).await?,
                Some(ns) => {
                    // The socket is made by a thread inside the namespace and stays there.
                    let std = tokio::task::spawn_blocking(move || {
                        netns::in_netns(&ns, move || {
                            let s = std::net::TcpStream::connect_timeout(
                                &addr,
                                Duration::from_secs(3),
                            )?;
                            s.set_nonblocking(true)?;
                            Ok(s)
                        })
                    })
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
                    tokio::net::TcpStream::from_std(std)?
                }
            };
            let _ = s.set_nodelay(true);
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

pub type HttpClient = Client<Dial, Full<Bytes>>;

/// An HTTP/1.1 client that sends everything through `proxy`.
pub fn h1_client(proxy: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new()).build(Dial::to(proxy))
}

/// An h2c (prior knowledge) client that sends everything through `proxy`.
pub fn h2c_client(proxy: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(Dial::to(proxy))
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub json: serde_json::Value,
    pub text: String,
}

/// GET `url` with `client`; the body is parsed as JSON when it is.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<Reply> {
    let resp = client
        .request(http::Request::get(url).body(Full::new(Bytes::new()))?)
        .await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_str(&text).unwrap_or_default(),
        text,
    })
}

/// GET `url` on a sidecar's admin port over plain HTTP/1.1.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(Dial::to(addr));
    get(&client, &format!("http://{addr}{path}")).await
}

/// Sends `n` requests; returns how many each version served and how many failed.
pub async fn split(
    client: &HttpClient,
    url: &str,
    n: usize,
) -> anyhow::Result<(std::collections::BTreeMap<String, usize>, usize)> {
    let mut by_version = std::collections::BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match get(client, url).await {
            Ok(r) if r.status.is_success() => {
                *by_version
                    .entry(r.json["version"].as_str().unwrap_or("?").to_string())
                    .or_insert(0) += 1;
            }
            _ => failed += 1,
        }
    }
    Ok((by_version, failed))
}

/// Requests an example app served so far (its `/admin/stats`, straight to the app).
pub async fn app_requests(app: SocketAddr) -> anyhow::Result<u64> {
    let r = admin_get(app, "/admin/stats").await?;
    r.json["requests"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("bad stats: {}", r.text))
}

/// Sends `req()` `n` times, at most `concurrency` at once; returns each result in order of
/// completion (status, `x-mesh-error`, latency), or the error as text.
pub async fn load<F>(
    client: &HttpClient,
    n: usize,
    concurrency: usize,
    req: F,
) -> Vec<Result<(u16, String, Duration), String>>
where
    F: Fn(usize) -> http::Request<Full<Bytes>>,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (client, r) = (client.clone(), req(i));
        tasks.spawn(async move {
            let _permit = permit;
            one(&client, r).await
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.map_err(|e| e.to_string()).and_then(|r| r));
    }
    out
}

/// Sends one request and reads the response whole.
async fn one(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, String, Duration), String> {
    let start = tokio::time::Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("x-mesh-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, reason, start.elapsed()))
}

/// Sends `req()` at `rps` for `n` requests whatever the responses take (an open-loop load);
/// returns the statuses.
pub async fn paced<F>(client: &HttpClient, rps: u32, n: usize, req: F) -> Vec<u16>
where
    F: Fn(usize) -> http::Request<Full<Bytes>>,
{
    paced_timed(client, rps, n, req)
        .await
        .into_iter()
        .map(|r| r.map_or(0, |r| r.0))
        .collect()
}

/// As [`paced`], with each result as [`load`] gives it (status, `x-mesh-error`, latency).
pub async fn paced_timed<F>(
    client: &HttpClient,
    rps: u32,
    n: usize,
    req: F,
) -> Vec<Result<(u16, String, Duration), String>>
where
    F: Fn(usize) -> http::Request<Full<Bytes>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tick.tick().await;
        let (client, r) = (client.clone(), req(i));
        tasks.spawn(async move { one(&client, r).await });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.map_err(|e| e.to_string()).and_then(|r| r));
    }
    out
}

/// The `q` quantile (0..=1) of `d`, nearest rank (None when empty).
pub fn quantile(d: &mut [Duration], q: f64) -> Option<Duration> {
    d.sort();
    let i = ((d.len() as f64 * q).ceil() as usize).clamp(1, d.len().max(1)) - 1;
    d.get(i).copied()
}

/// A GET of `url` with an empty body.
pub fn get_req(url: &str) -> http::Request<Full<Bytes>> {
    let mut r = http::Request::new(Full::new(Bytes::new()));
    *r.uri_mut() = url.parse().unwrap_or_default();
    r
}

/// One request of the constant load: when it was sent, and the version that answered (None
/// for a failure).
pub type Sample = (tokio::time::Instant, Option<String>);

/// Sends GETs at `rps` until `stop` turns true (bounded by `max`); returns every sample.
pub async fn constant_load(
    http: HttpClient,
    rps: u32,
    max: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..max {
        tick.tick().await;
        if *stop.borrow() {
            break;
        }
        let http = http.clone();
        tasks.spawn(async move {
            let sent = tokio::time::Instant::now();
            let v = match get(&http, "http://backend/").await {
                Ok(r) if r.status == 200 => r.json["version"].as_str().map(str::to_string),
                _ => None,
            };
            (sent, v)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(s) = r {
            out.push(s);
        }
    }
    out
}

/// A constant load running in the background.
pub struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Load {
    /// GETs of `http://backend/` at `rps`, for at most a minute.
    pub fn start(http: HttpClient, rps: u32) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(constant_load(http, rps, rps as usize * 60, rx));
        Self { stop, task }
    }

    /// Stops the load; returns every sample.
    pub async fn finish(self) -> anyhow::Result<Vec<Sample>> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}
