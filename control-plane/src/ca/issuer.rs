//! Root loading/generation and CSR signing.

use crate::spiffe::{SpiffeId, uri_sans_of_cert};
use crate::store::file::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::Path;
use std::time::Duration;
use time::OffsetDateTime;

/// Default workload certificate lifetime.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Root lifetime when the control plane generates one.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `not_before`, for clocks slightly behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Largest CSR accepted, PEM bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR asks for {requested}, but the credential is for {allowed}")]
    IdentityMismatch { requested: String, allowed: String },
    #[error("CSR must name exactly one SPIFFE identity as a URI SAN, found {0}")]
    BadSans(String),
    #[error("CA files: {0}")]
    Files(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Signs workload certificates with the mesh root.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    pub trust_domain: String,
    pub leaf_ttl: Duration,
}

/// A certificate and its private key, PEM.
pub struct IssuedKeyPair {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// Loads `<dir>/root.pem` and `<dir>/root.key`, or generates them (key mode 0600) if neither
    /// exists. One without the other is an error rather than a silent new root.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaError> {
        let (cert, key) = (dir.join("root.pem"), dir.join("root.key"));
        match (cert.exists(), key.exists()) {
            (true, true) => Self::from_files(&cert, &key, trust_domain, leaf_ttl),
            (false, false) => {
                std::fs::create_dir_all(dir).map_err(|e| CaError::Files(e.to_string()))?;
                let key_pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| CaError::Signing(e.to_string()))?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::OrganizationName, "mesh");
                dn.push(DnType::CommonName, format!("mesh root CA {trust_domain}"));
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                let now = OffsetDateTime::now_utc();
                params.not_before = now - CLOCK_SKEW;
                params.not_after = now + ROOT_TTL;
                let root = params
                    .self_signed(&key_pair)
                    .map_err(|e| CaError::Signing(e.to_string()))?;
                write_atomic(&key, key_pair.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| CaError::Files(format!("{}: {e}", key.display())))?;
                write_atomic(&cert, root.pem().as_bytes(), 0o644)
                    .map_err(|e| CaError::Files(format!("{}: {e}", cert.display())))?;
                Ok(Self {
                    root_pem: root.pem(),
                    issuer: Issuer::new(params, key_pair),
                    trust_domain: trust_domain.into(),
                    leaf_ttl,
                })
            }
            _ => Err(CaError::Files(format!(
                "found only one of {} and {}; both or neither must exist",
                cert.display(),
                key.display()
            ))),
        }
    }

    /// Loads an operator-provided root (or intermediate) and its key.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| CaError::Files(format!("{}: {e}", p.display())))
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Files(format!("{}: {e}", key.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(|e| CaError::Files(format!("{}: {e}", cert.display())))?;
        Ok(Self {
            issuer,
            root_pem: cert_pem,
            trust_domain: trust_domain.into(),
            leaf_ttl,
        })
    }

    /// The trust bundle proxies verify peers against, PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// Parses and checks a CSR: valid signature, exactly one SPIFFE URI SAN in our trust domain.
    pub fn requested_identity(
        &self,
        csr_pem: &str,
    ) -> Result<(CertificateSigningRequestParams, SpiffeId), CaError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(CaError::MalformedCsr(format!(
                "larger than {MAX_CSR_BYTES} bytes"
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => Ok(u.as_str()),
                other => Err(CaError::BadSans(format!("a non-URI SAN {other:?}"))),
            })
            .collect::<Result<_, _>>()?;
        let [uri] = uris.as_slice() else {
            return Err(CaError::BadSans(format!("{} URI SANs", uris.len())));
        };
        let id = SpiffeId::parse(uri).map_err(|e| CaError::BadSans(e.to_string()))?;
        if id.trust_domain != self.trust_domain {
            return Err(CaError::BadSans(format!(
                "{id} is outside trust domain {:?}",
                self.trust_domain
            )));
        }
        Ok((csr, id))
    }

    /// Signs a CSR whose identity must equal `allowed`. Returns the chain PEM and its expiry.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
    ) -> Result<(String, OffsetDateTime), CaError> {
        let (csr, id) = self.requested_identity(csr_pem)?;
        if &id != allowed {
            return Err(CaError::IdentityMismatch {
                requested: id.to_string(),
                allowed: allowed.to_string(),
            });
        }
        let params = self.leaf_params(vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadSans(e.to_string()))?,
        )])?;
        let not_after = params.not_after;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok((cert.pem(), not_after))
    }

    /// A key and certificate for a server of the control plane itself (its gRPC ports), with the
    /// control plane's SPIFFE identity plus DNS names / IPs clients dial.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<IssuedKeyPair, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let id = SpiffeId::new(&self.trust_domain, "mesh-system", "mesh-control-plane")
            .map_err(|e| CaError::BadSans(e.to_string()))?;
        let mut sans =
            vec![SanType::URI(id.to_string().try_into().map_err(
                |e: rcgen::Error| CaError::BadSans(e.to_string()),
            )?)];
        for d in dns_names {
            sans.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::BadSans(e.to_string()))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut params = self.leaf_params(sans)?;
        params.not_after = OffsetDateTime::now_utc() + ttl;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(IssuedKeyPair {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn leaf_params(&self, sans: Vec<SanType>) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + self.leaf_ttl;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| CaError::Signing(e.to_string()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// The SPIFFE identity in a verified peer certificate chain (leaf first).
pub fn identity_of_chain(chain: &[rustls_pki_types::CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = chain.first()?;
    let sans = uri_sans_of_cert(leaf);
    match sans.as_slice() {
        [one] => SpiffeId::parse(one).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_matching_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_generate(dir.path(), "mesh.local", DEFAULT_LEAF_TTL)
            .unwrap();
        let me = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/web").unwrap();
        let (pem, exp) = ca.sign_csr(&csr_for(&me.to_string()), &me).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let left = exp - OffsetDateTime::now_utc();
        assert!(left > time::Duration::hours(23) && left <= time::Duration::hours(24));
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(identity_of_chain(&[der]), Some(me.clone()));

        let other = csr_for("spiffe://mesh.local/ns/default/sa/db");
        assert!(matches!(
            ca.sign_csr(&other, &me),
            Err(CaError::IdentityMismatch { .. })
        ));
        let foreign = csr_for("spiffe://evil.local/ns/default/sa/web");
        assert!(matches!(
            ca.sign_csr(&foreign, &me),
            Err(CaError::BadSans(_))
        ));
        assert!(matches!(
            ca.sign_csr("garbage", &me),
            Err(CaError::MalformedCsr(_))
        ));
    }

    #[test]
    fn reloads_same_root_and_protects_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        let b = CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        assert_eq!(a.trust_bundle_pem(), b.trust_bundle_pem());
        let mode = std::fs::metadata(dir.path().join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(dir.path().join("root.key")).unwrap();
        assert!(
            CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).is_err()
        );
    }
}
