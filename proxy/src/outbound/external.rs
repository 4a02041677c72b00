//! Services outside the mesh (`meshctl external add`): an app calls `http://api.example.com`
//! through its sidecar as it calls a mesh service, and the sidecar connects to one of the
//! service's addresses as the service expects: TLS it originates (the system's roots or the
//! given CA, SNI, an optional client certificate; HTTP/2 or HTTP/1.1 by ALPN), or plaintext.
//! Routes, timeouts, retries, balancing and metrics are the same as for a mesh service; only
//! the last hop differs. Connections are pooled per address by hyper's client.

use crate::http::body::ReqBody;
use crate::http::errors::ProxyError;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proto::v1 as pb;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;

type Connector = hyper_rustls::HttpsConnector<FixedAddr>;

/// An external service's connection settings and its per-address clients.
pub struct External {
    pub host: Arc<str>,
    pub port: u16,
    /// `https://host[:port]` (or `http://`): what every request's target is put after.
    origin: Box<str>,
    /// None: plaintext.
    tls: Option<rustls::ClientConfig>,
    /// The name verified in its certificate (and sent in SNI), when it is not `host`.
    sni: Option<ServerName<'static>>,
    clients: dashmap::DashMap<SocketAddr, AnyClient>,
}

/// hyper's pooling client over TLS, or over plain TCP.
#[derive(Clone)]
enum AnyClient {
    Tls(Client<Connector, ReqBody>),
    Plain(Client<FixedAddr, ReqBody>),
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

/// The system's trust roots, read once (the same store curl and the app use).
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "a system root certificate could not be read");
            }
            let mut store = rustls::RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system roots loaded");
            Arc::new(store)
        })
        .clone()
}

impl External {
    /// Checks and builds the settings (done when the config is applied: a bad CA or key is a
    /// NACK, not a failed request).
    pub fn from_proto(x: &pb::External) -> Result<Self, String> {
        let port = u16::try_from(x.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("external port {}", x.port))?;
        if x.host.is_empty() {
            return Err("external service without a host".into());
        }
        let sni = match x.sni.as_str() {
            "" => None,
            s => Some(ServerName::try_from(s.to_string()).map_err(|e| format!("SNI {s:?}: {e}"))?),
        };
        let tls = x.tls.then(|| client_config(x)).transpose()?;
        let (scheme, default_port) = if x.tls { ("https", 443) } else { ("http", 80) };
        let origin = if port == default_port {
            format!("{scheme}://{}", x.host)
        } else {
            format!("{scheme}://{}:{port}", x.host)
        };
        Ok(Self {
            host: x.host.as_str().into(),
            port,
            origin: origin.into(),
            tls,
            sni,
            clients: dashmap::DashMap::new(),
        })
    }

    /// The client for `addr` (made on first use).
    fn client(&self, addr: SocketAddr, connect_timeout: Duration) -> AnyClient {
        self.clients
            .entry(addr)
            .or_insert_with(|| self.new_client(addr, connect_timeout))
            .clone()
    }

    fn new_client(&self, addr: SocketAddr, connect_timeout: Duration) -> AnyClient {
        let inner = FixedAddr {
            addr,
            connect_timeout,
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(90));
        match &self.tls {
            Some(cfg) => {
                let c = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(cfg.clone())
                    .https_only();
                let c = match &self.sni {
                    Some(name) => c.with_server_name_resolver(
                        hyper_rustls::FixedServerNameResolver::new(name.clone()),
                    ),
                    None => c,
                };
                AnyClient::Tls(b.build(c.enable_all_versions().wrap_connector(inner)))
            }
            None => AnyClient::Plain(b.build(inner)),
        }
    }

    /// Sends `req` (as prepared for a mesh peer: absolute URI, HTTP/2) to `addr`, as the
    /// external service expects it: its scheme and port, the caller's protocol chosen by ALPN.
    pub async fn send(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        mut req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, ProxyError> {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("{}{target}", self.origin)
            .parse()
            .map_err(|e| ProxyError::BadRequest(format!("{e}")))?;
        // hyper picks HTTP/2 when ALPN says so; the mesh's own header stays in the mesh.
        *req.version_mut() = http::Version::HTTP_11;
        req.headers_mut().remove(crate::http::ORIG_PROTO);
        let sent = match self.client(addr, connect_timeout) {
            AnyClient::Tls(c) => c.request(req).await,
            AnyClient::Plain(c) => c.request(req).await,
        };
        sent.map_err(|e| {
            if e.is_connect() {
                ProxyError::Connect {
                    addr,
                    reason: error_chain(&e),
                }
            } else {
                ProxyError::Upstream(format!("{} ({addr}): {}", self.host, error_chain(&e)))
            }
        })
    }
}

/// An error and its causes, one line (a TLS failure is several levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn client_config(x: &pb::External) -> Result<rustls::ClientConfig, String> {
    let roots = if x.ca_pem.is_empty() {
        system_roots()
    } else {
        let mut store = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(x.ca_pem.as_bytes()) {
            let c = c.map_err(|e| format!("external CA: {e}"))?;
            store.add(c).map_err(|e| format!("external CA: {e}"))?;
        }
        if store.is_empty() {
            return Err("external CA: no certificate".into());
        }
        Arc::new(store)
    };
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    if x.client_cert_pem.is_empty() {
        return Ok(b.with_no_client_auth());
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(x.client_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("external client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(x.client_key_pem.as_bytes())
        .map_err(|e| format!("external client key: {e}"))?;
    b.with_client_auth_cert(chain, key)
        .map_err(|e| format!("external client certificate: {e}"))
}

/// Connects to one address, whatever the URI says (the URI carries the service's host, for
/// SNI, Host and :authority).
#[derive(Clone, Debug)]
pub struct FixedAddr {
    addr: SocketAddr,
    connect_timeout: Duration,
}

impl tower::Service<http::Uri> for FixedAddr {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = futures_util::future::BoxFuture<'static, std::io::Result<TokioIo<TcpStream>>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, within) = (self.addr, self.connect_timeout);
        Box::pin(async move {
            let s = tokio::time::timeout(within, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect timed out after {within:?}"),
                    )
                })??;
            let _ = s.set_nodelay(true);
            Ok(TokioIo::new(s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_when_applied() {
        let ok = pb::External {
            host: "api.example.com".into(),
            port: 443,
            tls: true,
            ..Default::default()
        };
        assert!(External::from_proto(&ok).is_ok());
        let bad = |f: &dyn Fn(&mut pb::External), want: &str| {
            let mut x = ok.clone();
            f(&mut x);
            let e = External::from_proto(&x).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        };
        bad(&|x| x.port = 0, "port");
        bad(&|x| x.ca_pem = "junk".into(), "no certificate");
        bad(&|x| x.sni = "not a name!".into(), "SNI");
        bad(
            &|x| {
                x.client_cert_pem =
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()
            },
            "client",
        );
    }
}
