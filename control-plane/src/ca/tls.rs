//! The control plane's own TLS: its serving certificate and the roots it checks proxies'
//! client certificates against. Both change during a root rotation, and tonic's TLS config is
//! fixed once a server starts, so the ports accept TLS here with a config that can be swapped.

use crate::ca::CertificateAuthority;
use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Lifetime of the serving certificate; re-issued at every start and root change.
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The names and addresses the serving certificate covers.
pub struct ServerNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// Current configs of the proxies' port (client certificate optional: a bootstrap token may
/// stand in), of the admin port (token only) and of the injection webhook (HTTP/1.1 or h2).
pub struct ServerTls {
    pub grpc: Arc<ArcSwap<ServerConfig>>,
    pub admin: Arc<ArcSwap<ServerConfig>>,
    pub webhook: Arc<ArcSwap<ServerConfig>>,
    names: ServerNames,
}

struct Configs {
    grpc: ServerConfig,
    admin: ServerConfig,
    webhook: ServerConfig,
}

impl ServerTls {
    pub fn new(ca: &CertificateAuthority, names: ServerNames) -> anyhow::Result<Self> {
        let c = configs(ca, &names)?;
        Ok(Self {
            grpc: Arc::new(ArcSwap::from_pointee(c.grpc)),
            admin: Arc::new(ArcSwap::from_pointee(c.admin)),
            webhook: Arc::new(ArcSwap::from_pointee(c.webhook)),
            names,
        })
    }

    /// Re-issues the serving certificate from the current root and trusts the current bundle;
    /// connections already open keep theirs.
    pub fn reload(&self, ca: &CertificateAuthority) -> anyhow::Result<()> {
        let c = configs(ca, &self.names)?;
        self.grpc.store(Arc::new(c.grpc));
        self.admin.store(Arc::new(c.admin));
        self.webhook.store(Arc::new(c.webhook));
        Ok(())
    }
}

fn configs(ca: &CertificateAuthority, names: &ServerNames) -> anyhow::Result<Configs> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let issued = ca.issue_server_cert(&names.dns, &names.ips, SERVER_CERT_TTL)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.roots().bundle_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let builder = |p: &Arc<CryptoProvider>| {
        ServerConfig::builder_with_provider(p.clone()).with_safe_default_protocol_versions()
    };
    let mut grpc = builder(&provider)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    let mut admin = builder(&provider)?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())?;
    let mut webhook = builder(&provider)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    for c in [&mut grpc, &mut admin] {
        c.alpn_protocols = vec![b"h2".to_vec()];
    }
    webhook.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Configs {
        grpc,
        admin,
        webhook,
    })
}

/// TLS connections accepted on `listener` with whatever config is current at each handshake.
/// Handshakes run concurrently, so a slow or silent client delays no one else.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Without it, a reply written in more than one segment waits for the client's
            // delayed ACK: ~40 ms per call, twice in a sidecar's start (CSR, first config).
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
