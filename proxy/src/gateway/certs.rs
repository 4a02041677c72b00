//! The gateway's server certificates (the operator's, for outside clients): picked per
//! handshake by SNI among the DNS names each certificate holds, and read again when their
//! files change. A new pair that does not load (half written, key not matching) is not taken:
//! the old one keeps serving and the next look tries again. Handshakes already done keep
//! their certificate, so a reload drops no connection.

use arc_swap::ArcSwap;
use mesh_model::route::HostMatch;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often the files are looked at.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// One `--gateway-cert CERT:KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (cert, key) = s
            .split_once(':')
            .filter(|(c, k)| !c.is_empty() && !k.is_empty())
            .ok_or_else(|| format!("--gateway-cert {s:?}: expected CERT.pem:KEY.pem"))?;
        Ok(Self {
            cert: cert.into(),
            key: key.into(),
        })
    }
}

/// A loaded certificate and the names it serves.
#[derive(Debug)]
struct Loaded {
    names: Vec<HostMatch>,
    key: Arc<CertifiedKey>,
}

/// The certificates in force; rustls asks it at each handshake.
#[derive(Debug)]
pub struct Certs {
    files: Vec<CertFiles>,
    loaded: ArcSwap<Vec<Loaded>>,
    /// The files' bytes when last loaded (to notice a change without parsing).
    seen: std::sync::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

fn file_err(p: &std::path::Path, reason: impl ToString) -> CertError {
    CertError::File {
        path: p.display().to_string(),
        reason: reason.to_string(),
    }
}

fn load(f: &CertFiles, cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&f.cert, e))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(&f.cert, "no PEM certificate"));
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| file_err(&f.key, e))?;
    let provider = rustls::crypto::ring::default_provider();
    let names = dns_names(leaf).map_err(|e| file_err(&f.cert, e))?;
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| file_err(&f.key, format!("does not go with the certificate: {e}")))?;
    Ok(Loaded {
        names,
        key: Arc::new(key),
    })
}

/// The DNS names of a certificate's subjectAltName (exact or `*.`), for SNI.
fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<HostMatch>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n
                && let Ok(m) = HostMatch::parse(d)
            {
                out.push(m);
            }
        }
    }
    if out.is_empty() {
        return Err("the certificate names no DNS host in subjectAltName".into());
    }
    Ok(out)
}

impl Certs {
    /// Loads every pair once; any that does not load is an error (the proxy does not start).
    pub fn load(files: Vec<CertFiles>) -> Result<Arc<Self>, CertError> {
        let mut loaded = Vec::new();
        let mut seen = Vec::new();
        for f in &files {
            let c = std::fs::read(&f.cert).map_err(|e| file_err(&f.cert, e))?;
            let k = std::fs::read(&f.key).map_err(|e| file_err(&f.key, e))?;
            loaded.push(load(f, &c, &k)?);
            seen.push((c, k));
        }
        Ok(Arc::new(Self {
            files,
            loaded: ArcSwap::from_pointee(loaded),
            seen: std::sync::Mutex::new(seen),
        }))
    }

    /// Reads the files; takes the new set if one changed and all of them load. Returns
    /// whether it took one.
    pub fn reload(&self) -> bool {
        let mut read = Vec::with_capacity(self.files.len());
        for f in &self.files {
            match (std::fs::read(&f.cert), std::fs::read(&f.key)) {
                (Ok(c), Ok(k)) => read.push((c, k)),
                _ => return false,
            }
        }
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if *seen == read {
            return false;
        }
        let mut loaded = Vec::with_capacity(read.len());
        for (f, (c, k)) in self.files.iter().zip(&read) {
            match load(f, c, k) {
                Ok(l) => loaded.push(l),
                Err(e) => {
                    tracing::warn!(error = %e, "gateway certificate not reloaded; the old one keeps serving");
                    return false;
                }
            }
        }
        self.loaded.store(Arc::new(loaded));
        *seen = read;
        tracing::info!(
            certificates = self.files.len(),
            "gateway certificates reloaded"
        );
        true
    }

    /// Looks at the files every [`RELOAD_INTERVAL`], for as long as the proxy runs.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload();
        }
    }

    /// The certificate for `sni`: an exact name first, then the longest wildcard; the first
    /// certificate for a client that sends no SNI or one no certificate names.
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        let best = sni.and_then(|sni| {
            loaded
                .iter()
                .filter_map(|l| {
                    let rank = l
                        .names
                        .iter()
                        .filter(|n| n.matches(sni))
                        .map(HostMatch::rank)
                        .max()?;
                    Some((rank, l))
                })
                .max_by_key(|(rank, _)| *rank)
                .map(|(_, l)| l.key.clone())
        });
        best.or_else(|| loaded.first().map(|l| l.key.clone()))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// The TLS settings for outside clients: TLS 1.2 and 1.3, HTTP/2 or HTTP/1.1 by ALPN.
pub fn server_config(certs: Arc<Certs>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &std::path::Path, name: &str, hosts: &[&str]) -> CertFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let f = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&f.cert, cert.pem()).unwrap();
        std::fs::write(&f.key, key.serialize_pem()).unwrap();
        f
    }

    fn serial(k: &CertifiedKey) -> Vec<u8> {
        k.cert[0].as_ref().to_vec()
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first_and_reload_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["shop.example.com"]);
        let b = pair(dir.path(), "b", &["*.example.com", "api.example.org"]);
        let certs = Certs::load(vec![a.clone(), b.clone()]).unwrap();
        let of = |sni: Option<&str>| serial(&certs.pick(sni).unwrap());
        let (ka, kb) = (of(Some("shop.example.com")), of(Some("x.example.com")));
        assert_ne!(ka, kb);
        assert_eq!(of(Some("API.example.org")), kb);
        assert_eq!(of(None), ka, "no SNI: the first");
        assert_eq!(of(Some("other.net")), ka, "unknown name: the first");
        assert!(!certs.reload(), "nothing changed");

        // A key that does not match is refused; the old pair keeps serving.
        let other = pair(dir.path(), "c", &["shop.example.com"]);
        std::fs::copy(&other.key, &a.key).unwrap();
        assert!(!certs.reload());
        assert_eq!(of(Some("shop.example.com")), ka);
        std::fs::copy(&other.cert, &a.cert).unwrap();
        assert!(certs.reload());
        let new = of(Some("shop.example.com"));
        assert_ne!(new, ka);
        assert_eq!(
            new,
            serial(&Certs::load(vec![other]).unwrap().pick(None).unwrap())
        );

        assert!(CertFiles::parse("only-one").is_err());
        let none = pair(dir.path(), "ip", &["10.0.0.1"]);
        let e = Certs::load(vec![none]).unwrap_err().to_string();
        assert!(e.contains("names no DNS host"), "{e}");
    }
}
