//! HTTP/2 connections to peer sidecars over mTLS, one per (endpoint, expected identity), shared
//! by all requests. The fast path is a map read and a clone; connecting is serialised per key so
//! a burst of first requests opens one connection, not hundreds.

use crate::http::errors::ProxyError;
use crate::tls::TlsContext;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Default TCP + TLS connect timeout to a peer sidecar.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Key = (SocketAddr, Arc<str>);
pub type Sender = SendRequest<Incoming>;

pub struct Pool {
    tls: Arc<TlsContext>,
    ready: DashMap<Key, Sender>,
    connecting: DashMap<Key, Arc<tokio::sync::Mutex<()>>>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(tls: Arc<TlsContext>) -> Self {
        Self {
            tls,
            ready: DashMap::new(),
            connecting: DashMap::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    fn ready_sender(&self, key: &Key) -> Option<Sender> {
        self.ready
            .get(key)
            .filter(|s| !s.is_closed())
            .map(|s| s.clone())
    }

    /// A sender to `addr` whose certificate must name `identity`.
    pub async fn get(&self, addr: SocketAddr, identity: &Arc<str>) -> Result<Sender, ProxyError> {
        let key = (addr, identity.clone());
        if let Some(s) = self.ready_sender(&key) {
            return Ok(s);
        }
        let gate = self.connecting.entry(key.clone()).or_default().clone();
        let _g = gate.lock().await;
        if let Some(s) = self.ready_sender(&key) {
            return Ok(s);
        }
        let s = tokio::time::timeout(self.connect_timeout, self.connect(addr, identity))
            .await
            .map_err(|_| ProxyError::Connect {
                addr,
                reason: format!("timed out after {:?}", self.connect_timeout),
            })??;
        self.ready.insert(key, s.clone());
        Ok(s)
    }

    /// Drops connections to endpoints no longer in the config. Requests still using one keep
    /// their handle; the connection closes when they finish.
    pub fn retain(&self, live: &std::collections::HashSet<(SocketAddr, Arc<str>)>) {
        self.ready.retain(|k, _| live.contains(k));
        self.connecting.retain(|k, _| live.contains(k));
    }

    /// Forgets a connection that failed (the next request reconnects).
    pub fn evict(&self, addr: SocketAddr, identity: &Arc<str>) {
        self.ready.remove(&(addr, identity.clone()));
    }

    async fn connect(&self, addr: SocketAddr, identity: &Arc<str>) -> Result<Sender, ProxyError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| ProxyError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let cfg = self
            .tls
            .client_config(identity)
            .map_err(|e| ProxyError::Tls {
                addr,
                reason: e.to_string(),
            })?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| ProxyError::Tls {
                addr,
                reason: e.to_string(),
            })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ProxyError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "peer connection closed");
            }
        });
        tracing::debug!(%addr, %identity, "peer connection open");
        Ok(sender)
    }
}
