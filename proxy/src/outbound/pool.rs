//! HTTP/2 connections to peer sidecars over mTLS, one per (endpoint, expected identity), shared
//! by all requests. The fast path is a map read and a clone; connecting is serialised per key so
//! a burst of first requests opens one connection, not hundreds. Connections unused for their
//! service's idle timeout are closed by `sweep`. A connection opened under an older certificate
//! of this proxy is replaced after a renewal: the peer closes connections when the certificate
//! that opened them expires, and a close from that side can race a request on its way.

use crate::FastDashMap;
use crate::balance::state::Now;
use crate::http::coalesce::Coalesce;
use crate::http::errors::ProxyError;
use crate::http::h2client::{H2Sender, KeepAlive};
use crate::tls::TlsContext;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

type Key = (SocketAddr, Arc<str>);
pub type Sender = H2Sender;

/// Pings on peer connections, so a peer gone silent (host down, partition) is noticed; sent
/// while idle too, so the next request does not find out first.
const PEER_KEEP_ALIVE: KeepAlive = KeepAlive {
    interval: Duration::from_secs(20),
    timeout: Duration::from_secs(10),
};

struct Conn {
    sender: Sender,
    /// The certificate generation it was opened under (`TlsContext::generation`).
    generation: u64,
    /// `Now` in ms of the last request.
    last_used_ms: AtomicU64,
    idle_timeout: Duration,
}

/// What a dedicated connection to a peer sidecar carries (see [`Pool::dedicated`]).
#[derive(Debug, Clone, Copy)]
pub enum Dedicated {
    /// One HTTP/1.1 request that switches protocols (ALPN `http/1.1`).
    Http1,
    /// Bytes for `app_port` of the endpoint's app (ALPN `mesh.opaque/1`, then the port).
    Opaque { app_port: u16 },
}

pub struct Pool {
    tls: Arc<TlsContext>,
    ready: FastDashMap<Key, Conn>,
    connecting: FastDashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

impl Pool {
    pub fn new(tls: Arc<TlsContext>) -> Self {
        Self {
            tls,
            ready: FastDashMap::default(),
            connecting: FastDashMap::default(),
        }
    }

    fn ready_sender(&self, key: &Key) -> Option<Sender> {
        let generation = self.tls.generation();
        self.ready
            .get(key)
            .filter(|c| !c.sender.is_closed() && c.generation == generation)
            .map(|c| {
                c.last_used_ms.store(Now::get().ms(), Ordering::Relaxed);
                c.sender.clone()
            })
    }

    /// A sender to `addr` whose certificate must name `identity`; a new connection must be
    /// up within `connect_timeout` and is closed after `idle_timeout` unused.
    pub async fn get(
        &self,
        addr: SocketAddr,
        identity: &Arc<str>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Sender, ProxyError> {
        let key = (addr, identity.clone());
        if let Some(s) = self.ready_sender(&key) {
            return Ok(s);
        }
        // Boxed: connecting is rare, and its TLS handshake inline made every request's future
        // ~7.8 KB, allocated and copied per request.
        Box::pin(self.open(key, connect_timeout, idle_timeout)).await
    }

    /// A new connection for `key` (or one another request opened meanwhile).
    async fn open(
        &self,
        key: (SocketAddr, Arc<str>),
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Sender, ProxyError> {
        let (addr, identity) = (key.0, &key.1);
        let gate = self.connecting.entry(key.clone()).or_default().clone();
        let _g = gate.lock().await;
        if let Some(s) = self.ready_sender(&key) {
            return Ok(s);
        }
        let generation = self.tls.generation();
        let s = tokio::time::timeout(connect_timeout, self.connect(addr, identity))
            .await
            .map_err(|_| ProxyError::Connect {
                addr,
                reason: format!("timed out after {connect_timeout:?}"),
            })??;
        self.ready.insert(
            key,
            Conn {
                sender: s.clone(),
                generation,
                last_used_ms: AtomicU64::new(Now::get().ms()),
                idle_timeout,
            },
        );
        Ok(s)
    }

    /// Closes connections idle past their timeout (requests still on one keep it until done).
    pub fn sweep(&self) {
        let now = Now::get().ms();
        self.ready.retain(|(addr, _), c| {
            let idle = now.saturating_sub(c.last_used_ms.load(Ordering::Relaxed));
            let keep = idle < c.idle_timeout.as_millis() as u64;
            if !keep {
                tracing::debug!(%addr, idle_ms = idle, "closing idle peer connection");
            }
            keep
        });
    }

    /// Open connections (for tests and /config_dump); one its peer closed is not counted,
    /// though it stays in the map until the next request for its key or the next sweep.
    pub fn len(&self) -> usize {
        self.ready.iter().filter(|c| !c.sender.is_closed()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// A new mTLS connection to the sidecar at `addr`, which must present `identity`, with
    /// the ALPN of `cfg` (HTTP/2 for the shared connections; HTTP/1.1 or the opaque stream for
    /// a dedicated one).
    pub async fn dial(
        &self,
        addr: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ProxyError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| ProxyError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await;
        let m = crate::telemetry::metrics::metrics();
        use crate::telemetry::metrics::{Direction, Handshake};
        match tls {
            Ok(t) => {
                m.handshake(Direction::Outbound, Handshake::Ok);
                Ok(t)
            }
            Err(e) => {
                m.handshake(Direction::Outbound, Handshake::Failed);
                Err(ProxyError::Tls {
                    addr,
                    reason: e.to_string(),
                })
            }
        }
    }

    /// A dedicated (never pooled) mTLS connection to the sidecar at `addr`, which must
    /// present `identity`, up within `timeout`: HTTP/1.1 for one upgraded request, or an
    /// opaque stream already connected to a port of the endpoint's app.
    pub async fn dedicated(
        &self,
        addr: SocketAddr,
        identity: &Arc<str>,
        what: Dedicated,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ProxyError> {
        let cfg = match what {
            Dedicated::Http1 => self.tls.h1_client_config(identity),
            Dedicated::Opaque { .. } => self.tls.opaque_client_config(identity),
        }
        .map_err(|e| ProxyError::Tls {
            addr,
            reason: e.to_string(),
        })?;
        let mut io = tokio::time::timeout(timeout, self.dial(addr, cfg))
            .await
            .map_err(|_| ProxyError::Connect {
                addr,
                reason: format!("timed out after {timeout:?}"),
            })??;
        if let Dedicated::Opaque { app_port } = what {
            use tokio::io::AsyncWriteExt;
            io.write_all(&app_port.to_be_bytes())
                .await
                .map_err(|e| ProxyError::Upstream(format!("{addr}: {e}")))?;
        }
        Ok(io)
    }

    async fn connect(&self, addr: SocketAddr, identity: &Arc<str>) -> Result<Sender, ProxyError> {
        let cfg = self
            .tls
            .client_config(identity)
            .map_err(|e| ProxyError::Tls {
                addr,
                reason: e.to_string(),
            })?;
        let tls = self.dial(addr, cfg).await?;
        let mesh_peer = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_MESH_H2);
        let mut sender = H2Sender::handshake(Coalesce::new(tls), Some(PEER_KEEP_ALIVE), addr)
            .await
            .map_err(|e| ProxyError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        sender.may_leave_unprocessed = !mesh_peer;
        tracing::debug!(%addr, %identity, mesh_peer, "peer connection open");
        Ok(sender)
    }
}
