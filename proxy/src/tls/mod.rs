//! rustls configs for the data plane: the proxy's own certificate (swapped on renewal without
//! rebuilding anything), the mesh trust bundle, and SPIFFE identity checks on both sides.

mod verifier;

pub use verifier::SpiffeServerVerifier;

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use std::sync::Arc;

/// ALPN ids: h2 between sidecars; http/1.1 accepted for peers that only speak it.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/2 between two mesh sidecars: the caller learns that the server is one, which
/// closes connections with a two-step GOAWAY (RFC 9113 §6.8) and so never leaves a stream
/// unprocessed; requests to it keep no copy to send again. Any other HTTP/2 server (Envoy,
/// nginx, an older mesh-proxy) negotiates `h2`.
pub const ALPN_MESH_H2: &[u8] = b"mesh.h2/1";
/// ALPN of an opaque TCP stream between sidecars (transparent interception of a protocol that
/// is not HTTP): a 2-byte big-endian app port, then the app's bytes either way.
pub const ALPN_OPAQUE: &[u8] = b"mesh.opaque/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("no certificate in the trust bundle")]
    EmptyBundle,
    #[error("tls config: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The proxy's current certificate, with the PEM forms the control-plane client needs.
pub struct Leaf {
    pub certified: Arc<CertifiedKey>,
    pub chain_pem: String,
    pub key_pem: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Fingerprint of the root that signed it, as the control plane said.
    pub signer: Arc<str>,
}

/// Trust roots in both shapes rustls and webpki want, and the TLS configs built on them: a
/// new bundle starts with no configs, so none built on the old roots can outlive it.
pub struct Bundle {
    pub pem: String,
    pub roots: Arc<RootCertStore>,
    pub anchors: Arc<Vec<TrustAnchor<'static>>>,
    server: ArcSwapOption<ServerConfig>,
    /// Client configs per expected peer identity.
    clients: DashMap<Arc<str>, Arc<ClientConfig>>,
}

impl Bundle {
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for c in &certs {
            roots.add(c.clone()).map_err(TlsError::Config)?;
            anchors.push(
                webpki::anchor_from_trusted_cert(c)
                    .map_err(|e| TlsError::Pem(e.to_string()))?
                    .to_owned(),
            );
        }
        Ok(Self {
            pem: pem.to_string(),
            roots: Arc::new(roots),
            anchors: Arc::new(anchors),
            server: ArcSwapOption::empty(),
            clients: DashMap::new(),
        })
    }
}

/// Certificate, trust bundle and the TLS configs derived from them.
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    leaf: ArcSwapOption<Leaf>,
    bundle: ArcSwap<Bundle>,
    resolver: Arc<LeafResolver>,
    /// Counts installed certificates: a connection opened under an older one is retired.
    generation: std::sync::atomic::AtomicU64,
}

/// Serves whatever leaf is current, to rustls on both sides.
#[derive(Debug)]
struct LeafResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesClientCert for LeafResolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

impl TlsContext {
    pub fn new(bundle_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaf: ArcSwapOption::empty(),
            bundle: ArcSwap::from_pointee(Bundle::from_pem(bundle_pem)?),
            resolver: Arc::new(LeafResolver {
                current: ArcSwapOption::empty(),
            }),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Which certificate is current (it changes with each install): a peer connection opened
    /// under an older one is replaced, so it ends, closed by this side with nothing in flight,
    /// before the peer closes it at that certificate's expiry.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn leaf(&self) -> Option<Arc<Leaf>> {
        self.leaf.load_full()
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.load_full()
    }

    /// Installs a renewed certificate (and the bundle that came with it). Existing connections
    /// keep their session; new handshakes use the new certificate at once.
    pub fn install(
        &self,
        chain_pem: &str,
        key_pem: &str,
        expires_at: i64,
        bundle_pem: &str,
        signer: &str,
    ) -> Result<(), TlsError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let signing = self.provider.key_provider.load_private_key(key)?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        if bundle_pem != self.bundle.load().pem {
            self.set_bundle(Bundle::from_pem(bundle_pem)?);
        }
        self.resolver.current.store(Some(certified.clone()));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.leaf.store(Some(Arc::new(Leaf {
            certified,
            chain_pem: chain_pem.into(),
            key_pem: key_pem.into(),
            expires_at,
            signer: signer.into(),
        })));
        Ok(())
    }

    /// Trusts exactly `bundle` from the next handshake on (a root rotation pushes one with the
    /// old and new roots, later the new alone). Connections already open are kept.
    pub fn set_bundle(&self, bundle: Bundle) {
        if bundle.pem == self.bundle.load().pem {
            return;
        }
        self.bundle.store(Arc::new(bundle));
    }

    /// Server config for the inbound listener: client certificate required, from the mesh roots.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let bundle = self.bundle.load_full();
        if let Some(c) = bundle.server.load_full() {
            return Ok(c);
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            bundle.roots.clone(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.resolver.clone());
        // Most preferred first: rustls picks the first of these the client offers.
        cfg.alpn_protocols = vec![
            ALPN_MESH_H2.to_vec(),
            ALPN_H2.to_vec(),
            b"http/1.1".to_vec(),
            ALPN_OPAQUE.to_vec(),
        ];
        // No session resumption: a resumed session carries the client certificate of the
        // handshake it resumes, which would outlive its expiry (and a revocation that stopped
        // its renewal). Peer connections are long-lived, so full handshakes are rare anyway.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        let cfg = Arc::new(cfg);
        bundle.server.store(Some(cfg.clone()));
        Ok(cfg)
    }

    /// As [`TlsContext::client_config`], offering only the opaque-stream ALPN.
    pub fn opaque_client_config(&self, expected: &Arc<str>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = (*self.client_config(expected)?).clone();
        cfg.alpn_protocols = vec![ALPN_OPAQUE.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// As [`TlsContext::client_config`], offering only HTTP/1.1: a dedicated connection that
    /// carries one upgraded request (WebSocket and other `Upgrade` tokens) to a peer sidecar.
    pub fn h1_client_config(&self, expected: &Arc<str>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = (*self.client_config(expected)?).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Client config that accepts only a peer presenting `expected` as its SPIFFE identity.
    pub fn client_config(&self, expected: &Arc<str>) -> Result<Arc<ClientConfig>, TlsError> {
        let bundle = self.bundle.load_full();
        if let Some(c) = bundle.clients.get(expected) {
            return Ok(c.clone());
        }
        let verifier = SpiffeServerVerifier::new(
            bundle.anchors.clone(),
            expected.clone(),
            self.provider.clone(),
        );
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.resolver.clone());
        cfg.alpn_protocols = vec![ALPN_MESH_H2.to_vec(), ALPN_H2.to_vec()];
        // Every connection presents the current certificate (see `server_config`).
        cfg.resumption = rustls::client::Resumption::disabled();
        let cfg = Arc::new(cfg);
        bundle.clients.insert(expected.clone(), cfg.clone());
        Ok(cfg)
    }
}

/// The public key of the first certificate of a PEM chain, as hex (public, for /config_dump:
/// it shows that each renewal comes with a key pair of its own).
pub fn public_key_hex(chain_pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::*;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(chain_pem.as_bytes()).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(
        cert.public_key()
            .subject_public_key
            .data
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The single SPIFFE URI SAN of a DER certificate.
pub fn spiffe_id_of(der: &[u8]) -> Option<String> {
    spiffe_id_and_expiry(der).map(|(id, _)| id)
}

/// The single SPIFFE URI SAN of a DER certificate and when the certificate expires (Unix
/// seconds), from one parse.
pub fn spiffe_id_and_expiry(der: &[u8]) -> Option<(String, i64)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let expires = cert.validity().not_after.timestamp();
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    });
    let first = ids.next()?;
    ids.next().is_none().then_some((first, expires))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    /// A context holding a certificate for `sa` from `ca`.
    fn context(ca: &Issuer<'_, KeyPair>, ca_pem: &str, sa: &str) -> TlsContext {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        let id = format!("spiffe://mesh.local/ns/default/sa/{sa}");
        p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let cert = p.signed_by(&key, ca).expect("signed");
        let t = TlsContext::new(ca_pem).expect("bundle");
        t.install(&cert.pem(), &key.serialize_pem(), i64::MAX, ca_pem, "")
            .expect("install");
        t
    }

    /// The ALPN a client with `alpn` and the inbound's server config agree on.
    async fn negotiated(server: &TlsContext, client: &TlsContext, alpn: &[&[u8]]) -> Vec<u8> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().expect("server"));
        let mut cfg = (*client
            .client_config(&Arc::from("spiffe://mesh.local/ns/default/sa/backend"))
            .expect("client"))
        .clone();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = rustls_pki_types::ServerName::try_from("backend").expect("name");
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        let (_s, c) = (s.expect("accepted"), c.expect("connected"));
        c.get_ref().1.alpn_protocol().expect("an ALPN").to_vec()
    }

    #[tokio::test]
    async fn sidecars_recognise_each_other_and_other_peers_get_h2() {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let server = context(&issuer, &ca_pem, "backend");
        let client = context(&issuer, &ca_pem, "web");
        let ours = client
            .client_config(&Arc::from("spiffe://mesh.local/ns/default/sa/backend"))
            .expect("client")
            .alpn_protocols
            .clone();
        let ours: Vec<&[u8]> = ours.iter().map(Vec::as_slice).collect();
        assert_eq!(negotiated(&server, &client, &ours).await, ALPN_MESH_H2);
        // Envoy, nginx or an older mesh-proxy as the caller offer h2 alone.
        assert_eq!(negotiated(&server, &client, &[ALPN_H2]).await, ALPN_H2);
    }
}
