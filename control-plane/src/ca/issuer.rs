//! CSR signing with the current root, and the root rotation steps (see `roots`).

use super::CaError;
use super::roots::{CLOCK_SKEW, Phase, RootDir, Roots};
use crate::ca::spiffe::{SpiffeId, uri_sans_of_cert};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// Default workload certificate lifetime.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest CSR accepted, PEM bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Signs workload certificates with the mesh root; rotates the root in three steps.
pub struct CertificateAuthority {
    roots: RwLock<Arc<Roots>>,
    /// None: the operator's root (`--ca-cert`), which the control plane does not rotate.
    dir: Option<RootDir>,
    /// Serialises rotation steps.
    rotating: Mutex<()>,
    pub trust_domain: String,
    pub leaf_ttl: Duration,
}

/// A certificate and its private key, PEM.
pub struct IssuedKeyPair {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

/// A signed workload certificate with what the proxy needs alongside it.
pub struct Signed {
    pub chain_pem: String,
    pub not_after: OffsetDateTime,
    /// Fingerprint of the root that signed it.
    pub signer: String,
    pub bundle_pem: String,
}

impl CertificateAuthority {
    fn with(roots: Roots, dir: Option<RootDir>, trust_domain: &str, leaf_ttl: Duration) -> Self {
        Self {
            roots: RwLock::new(Arc::new(roots)),
            dir,
            rotating: Mutex::new(()),
            trust_domain: trust_domain.into(),
            leaf_ttl,
        }
    }

    /// Loads the roots kept in `dir` (see `roots`), or generates a first one (key mode 0600).
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaError> {
        let root_dir = RootDir::new(dir);
        let roots = root_dir.load_or_generate(trust_domain)?;
        Ok(Self::with(roots, Some(root_dir), trust_domain, leaf_ttl))
    }

    /// An operator-provided root (or intermediate) and its key; `bundle_out` gets the bundle
    /// as PEM (the file meshctl reads by default).
    pub fn from_files(
        cert: &Path,
        key: &Path,
        bundle_out: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| CaError::Files(format!("{}: {e}", p.display())))
        };
        let roots = Roots::external(&read(cert)?, &read(key)?)
            .map_err(|e| CaError::Files(format!("{} / {}: {e}", cert.display(), key.display())))?;
        if let Some(d) = bundle_out.parent() {
            std::fs::create_dir_all(d).map_err(|e| CaError::Files(e.to_string()))?;
        }
        crate::state::store::file::write_atomic(bundle_out, roots.bundle_pem.as_bytes(), 0o644)
            .map_err(|e| CaError::Files(format!("{}: {e}", bundle_out.display())))?;
        Ok(Self::with(roots, None, trust_domain, leaf_ttl))
    }

    /// The current roots (cheap: an `Arc` clone).
    pub fn roots(&self) -> Arc<Roots> {
        match self.roots.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether the operator provides the root (no rotation here).
    pub fn is_external(&self) -> bool {
        self.dir.is_none()
    }

    /// One rotation step: "prepare", "activate" or "finish".
    pub fn rotate(&self, step: &str) -> Result<Phase, CaError> {
        let Some(dir) = &self.dir else {
            return Err(CaError::Rotation(
                "the root is the operator's (--ca-cert/--ca-key): rotate it by restarting with a new one".into(),
            ));
        };
        let _g = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.roots();
        let next = match step {
            "prepare" => dir.prepare(&cur, &self.trust_domain)?,
            "activate" => dir.activate(&cur)?,
            "finish" => dir.finish(&cur)?,
            other => {
                return Err(CaError::Rotation(format!(
                    "unknown step {other:?} (prepare, activate or finish)"
                )));
            }
        };
        let phase = next.phase();
        tracing::info!(step, phase = phase.as_str(), signer = %next.signer.fingerprint, roots = next.bundle.len(), "root rotation step");
        match self.roots.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        Ok(phase)
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
        if self.control_plane_identity().is_ok_and(|cp| cp == id) {
            // Replicas trust each other by this identity (`replicas::peers`).
            return Err(CaError::BadSans(format!(
                "{id} is reserved for the control plane"
            )));
        }
        Ok((csr, id))
    }

    /// Signs a CSR whose identity must equal `allowed`.
    pub fn sign_csr(&self, csr_pem: &str, allowed: &SpiffeId) -> Result<Signed, CaError> {
        let grant = super::grant::Grant::new(super::grant::Source::Unrecorded);
        self.sign_csr_with(csr_pem, allowed, &grant)
    }

    /// As [`CertificateAuthority::sign_csr`], recording `grant` in the certificate (see
    /// `ca::grant`), so its renewals can be refused once the grant is revoked.
    pub fn sign_csr_with(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        grant: &super::grant::Grant,
    ) -> Result<Signed, CaError> {
        let (csr, id) = self.requested_identity(csr_pem)?;
        if &id != allowed {
            return Err(CaError::IdentityMismatch {
                requested: id.to_string(),
                allowed: allowed.to_string(),
            });
        }
        let mut params = self.leaf_params(vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::BadSans(e.to_string()))?,
        )])?;
        params.distinguished_name = grant.subject();
        let not_after = params.not_after;
        let roots = self.roots();
        let cert = params
            .signed_by(&csr.public_key, &roots.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(Signed {
            chain_pem: cert.pem(),
            not_after,
            signer: roots.signer.fingerprint.clone(),
            bundle_pem: roots.bundle_pem.clone(),
        })
    }

    /// The control plane's own identity: in its serving certificate and the one replicas
    /// present to each other. No workload is issued it.
    pub fn control_plane_identity(&self) -> Result<SpiffeId, CaError> {
        SpiffeId::new(&self.trust_domain, "mesh-system", "mesh-control-plane")
            .map_err(|e| CaError::BadSans(e.to_string()))
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
        let id = self.control_plane_identity()?;
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
            .signed_by(&key, &self.roots().issuer)
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
        let signed = ca.sign_csr(&csr_for(&me.to_string()), &me).unwrap();
        let (pem, exp) = (signed.chain_pem, signed.not_after);
        assert_eq!(signed.signer, ca.roots().signer.fingerprint);
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
        // Not even for a caller allowed it: replicas trust each other by it.
        let cp = ca.control_plane_identity().unwrap();
        assert!(matches!(
            ca.sign_csr(&csr_for(&cp.to_string()), &cp),
            Err(CaError::BadSans(m)) if m.contains("reserved")
        ));
    }

    fn key_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("roots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".key"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn reloads_same_root_and_protects_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        let b = CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        assert_eq!(a.roots().bundle_pem, b.roots().bundle_pem);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap(),
            a.roots().bundle_pem
        );
        let keys = key_files(dir.path());
        assert_eq!(keys.len(), 1);
        let key = dir.path().join("roots").join(&keys[0]);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&key).unwrap();
        assert!(
            CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).is_err(),
            "a missing key is an error, not a silent new root"
        );
    }

    #[test]
    fn root_rotation_steps_in_order_and_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let me = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        let ca =
            CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        let reload = || CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL);
        let old = ca.roots().signer.fingerprint.clone();
        for step in ["activate", "finish", "bogus"] {
            assert!(
                matches!(ca.rotate(step), Err(CaError::Rotation(_))),
                "{step}"
            );
        }

        assert_eq!(ca.rotate("prepare").unwrap(), Phase::Prepared);
        let r = ca.roots();
        assert_eq!(r.bundle.len(), 2);
        assert_eq!(
            r.signer.fingerprint, old,
            "prepare does not change the signer"
        );
        let new = r.bundle[1].fingerprint.clone();
        assert_ne!(new, old);
        assert_ne!(r.bundle[0].subject, r.bundle[1].subject);
        assert_eq!(key_files(dir.path()).len(), 2);
        assert!(matches!(ca.rotate("prepare"), Err(CaError::Rotation(_))));
        assert_eq!(reload().unwrap().roots().phase(), Phase::Prepared);

        assert_eq!(ca.rotate("activate").unwrap(), Phase::Overlap);
        let signed = ca.sign_csr(&csr_for(&me.to_string()), &me).unwrap();
        assert_eq!(signed.signer, new);
        assert_eq!(signed.bundle_pem, ca.roots().bundle_pem);
        assert!(signed.bundle_pem.matches("BEGIN CERTIFICATE").count() == 2);
        assert_eq!(
            key_files(dir.path()),
            vec![format!("{new}.key")],
            "the old key goes once it can no longer sign"
        );
        assert_eq!(reload().unwrap().roots().signer.fingerprint, new);

        assert_eq!(ca.rotate("finish").unwrap(), Phase::Steady);
        let r = ca.roots();
        assert_eq!(r.bundle.len(), 1);
        assert_eq!(r.bundle[0].fingerprint, new);
        assert!(!dir.path().join(format!("roots/{old}.pem")).exists());
        let back = reload().unwrap();
        assert_eq!(back.roots().bundle_pem, r.bundle_pem);
        assert_eq!(back.roots().phase(), Phase::Steady);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap(),
            r.bundle_pem
        );
    }

    #[test]
    fn operator_root_is_not_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let made =
            CertificateAuthority::load_or_generate(dir.path(), "td", DEFAULT_LEAF_TTL).unwrap();
        let fp = made.roots().signer.fingerprint.clone();
        let out = dir.path().join("out/bundle.pem");
        let ext = CertificateAuthority::from_files(
            &dir.path().join(format!("roots/{fp}.pem")),
            &dir.path().join(format!("roots/{fp}.key")),
            &out,
            "td",
            DEFAULT_LEAF_TTL,
        )
        .unwrap();
        assert!(ext.is_external());
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            made.roots().bundle_pem
        );
        assert!(matches!(ext.rotate("prepare"), Err(CaError::Rotation(_))));
    }
}
