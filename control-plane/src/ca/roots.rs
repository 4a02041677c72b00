//! The CA's roots on disk, and the three steps of a root rotation.
//!
//! `<dir>/state.json` names the signing root and the trust bundle by fingerprint; each root
//! lives in `<dir>/roots/<fingerprint>.pem` with its key in `.key` (mode 0600). Writing
//! state.json (atomically) is the commit point of every step, so a crash leaves either the
//! old or the new state; files it no longer names are deleted afterwards (keys first).
//! `<dir>/bundle.pem` is the bundle as one PEM file, for meshctl and for proxies' `--ca-file`.

use super::CaError;
use crate::state::store::file::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

/// Root lifetime when the control plane generates one.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `not_before`, for clocks slightly behind ours.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// One trusted root.
#[derive(Clone, Debug)]
pub struct Root {
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    pub pem: String,
    pub subject: String,
    pub not_after_unix: i64,
}

impl Root {
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|e| CaError::Files(format!("root certificate: {e}")))?;
        let der: rustls_pki_types::CertificateDer<'_> = der;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::Files(format!("root certificate: {e}")))?;
        Ok(Self {
            fingerprint: hex::encode(Sha256::digest(&der)),
            pem: pem.to_string(),
            subject: cert.subject().to_string(),
            not_after_unix: cert.validity().not_after.timestamp(),
        })
    }
}

/// Where a rotation stands, from the order of the bundle (old roots first, newest last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One root, signing.
    Steady,
    /// A new root is trusted but does not sign yet.
    Prepared,
    /// The new root signs; the old one is still trusted.
    Overlap,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Prepared => "prepared",
            Phase::Overlap => "overlap",
        }
    }
}

/// The signing root with its key, and the bundle. Immutable; a step builds a new one.
pub struct Roots {
    pub signer: Root,
    pub issuer: Issuer<'static, KeyPair>,
    pub bundle: Vec<Root>,
    /// The bundle's certificates concatenated.
    pub bundle_pem: String,
}

impl Roots {
    pub fn phase(&self) -> Phase {
        match self.bundle.last() {
            _ if self.bundle.len() == 1 => Phase::Steady,
            Some(last) if last.fingerprint == self.signer.fingerprint => Phase::Overlap,
            _ => Phase::Prepared,
        }
    }

    fn new(signer: Root, issuer: Issuer<'static, KeyPair>, bundle: Vec<Root>) -> Self {
        let bundle_pem = bundle.iter().map(|r| r.pem.as_str()).collect::<String>();
        Self {
            signer,
            issuer,
            bundle,
            bundle_pem,
        }
    }

    /// A root given by the operator (`--ca-cert`/`--ca-key`): the bundle is that one root.
    pub fn external(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Files(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Files(e.to_string()))?;
        let root = Root::from_pem(cert_pem)?;
        Ok(Self::new(root.clone(), issuer, vec![root]))
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct StateFile {
    signer: String,
    bundle: Vec<String>,
}

/// The roots directory of a control-plane-managed CA.
pub struct RootDir {
    dir: PathBuf,
}

impl RootDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    fn files(&self, fingerprint: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join("roots");
        (
            d.join(format!("{fingerprint}.pem")),
            d.join(format!("{fingerprint}.key")),
        )
    }

    fn read(p: &Path) -> Result<String, CaError> {
        std::fs::read_to_string(p).map_err(|e| CaError::Files(format!("{}: {e}", p.display())))
    }

    /// Loads state.json, or generates a first root if there is none.
    pub fn load_or_generate(&self, trust_domain: &str) -> Result<Roots, CaError> {
        let state_path = self.dir.join("state.json");
        if !state_path.exists() {
            std::fs::create_dir_all(self.dir.join("roots"))
                .map_err(|e| CaError::Files(format!("{}: {e}", self.dir.display())))?;
            let root = self.generate(trust_domain)?;
            return self.commit(&root.fingerprint, vec![root.fingerprint.clone()]);
        }
        let state: StateFile = serde_json::from_str(&Self::read(&state_path)?)
            .map_err(|e| CaError::Files(format!("{}: {e}", state_path.display())))?;
        let roots = self.build(&state)?;
        self.write_bundle(&roots)?;
        self.remove_unused(&state);
        Ok(roots)
    }

    /// Step 1: a new root joins the bundle (after the current ones); the current one still signs.
    pub fn prepare(&self, cur: &Roots, trust_domain: &str) -> Result<Roots, CaError> {
        if cur.phase() != Phase::Steady {
            return Err(CaError::Rotation(format!(
                "a rotation is already in progress (phase {})",
                cur.phase().as_str()
            )));
        }
        let new = self.generate(trust_domain)?;
        let mut bundle: Vec<String> = cur.bundle.iter().map(|r| r.fingerprint.clone()).collect();
        bundle.push(new.fingerprint);
        self.commit(&cur.signer.fingerprint, bundle)
    }

    /// Step 2: the newest root signs.
    pub fn activate(&self, cur: &Roots) -> Result<Roots, CaError> {
        if cur.phase() != Phase::Prepared {
            return Err(CaError::Rotation(format!(
                "activate follows prepare (phase is {})",
                cur.phase().as_str()
            )));
        }
        let bundle: Vec<String> = cur.bundle.iter().map(|r| r.fingerprint.clone()).collect();
        let newest = bundle.last().cloned().unwrap_or_default();
        self.commit(&newest, bundle)
    }

    /// Step 3: the bundle is the signing root alone; the old roots' files are deleted.
    pub fn finish(&self, cur: &Roots) -> Result<Roots, CaError> {
        if cur.phase() != Phase::Overlap {
            return Err(CaError::Rotation(format!(
                "finish follows activate (phase is {})",
                cur.phase().as_str()
            )));
        }
        let signer = cur.signer.fingerprint.clone();
        self.commit(&signer, vec![signer.clone()])
    }

    /// Writes state.json (the commit point), then the derived files.
    fn commit(&self, signer: &str, bundle: Vec<String>) -> Result<Roots, CaError> {
        let state = StateFile {
            signer: signer.into(),
            bundle,
        };
        let roots = self.build(&state)?;
        let json = serde_json::to_vec_pretty(&state).map_err(|e| CaError::Files(e.to_string()))?;
        let path = self.dir.join("state.json");
        write_atomic(&path, &json, 0o644)
            .map_err(|e| CaError::Files(format!("{}: {e}", path.display())))?;
        self.write_bundle(&roots)?;
        self.remove_unused(&state);
        Ok(roots)
    }

    fn build(&self, state: &StateFile) -> Result<Roots, CaError> {
        let bundle = state
            .bundle
            .iter()
            .map(|fp| Root::from_pem(&Self::read(&self.files(fp).0)?))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(signer) = bundle
            .iter()
            .find(|r| r.fingerprint == state.signer)
            .cloned()
        else {
            return Err(CaError::Files(format!(
                "state.json: signing root {} is not in the bundle",
                state.signer
            )));
        };
        let (_, key_path) = self.files(&signer.fingerprint);
        let key = KeyPair::from_pem(&Self::read(&key_path)?)
            .map_err(|e| CaError::Files(format!("{}: {e}", key_path.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&signer.pem, key)
            .map_err(|e| CaError::Files(format!("{}: {e}", key_path.display())))?;
        Ok(Roots::new(signer, issuer, bundle))
    }

    fn write_bundle(&self, roots: &Roots) -> Result<(), CaError> {
        let path = self.dir.join("bundle.pem");
        write_atomic(&path, roots.bundle_pem.as_bytes(), 0o644)
            .map_err(|e| CaError::Files(format!("{}: {e}", path.display())))
    }

    /// Deletes root files state.json does not name; a root's key also goes once it no longer
    /// signs and cannot sign again (it is not the newest in the bundle).
    fn remove_unused(&self, state: &StateFile) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("roots")) else {
            return;
        };
        let newest = state.bundle.last();
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        // Keys before certificates: never a key without its reason to exist.
        names.sort_by_key(|p| p.extension().is_none_or(|e| e != "key"));
        for p in names {
            let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let is_key = p.extension().is_some_and(|e| e == "key");
            let keep = if is_key {
                stem == state.signer || Some(&stem.to_string()) == newest
            } else {
                state.bundle.iter().any(|f| f == stem)
            };
            if !keep && let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove an old root file");
            }
        }
    }

    /// A new self-signed root (key mode 0600), written under its fingerprint.
    fn generate(&self, trust_domain: &str) -> Result<Root, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mesh");
        // Distinct subjects, so two roots of one rotation are told apart in every tool.
        dn.push(
            DnType::CommonName,
            format!("mesh root CA {trust_domain} {}", hex::encode(tag)),
        );
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
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let root = Root::from_pem(&cert.pem())?;
        let (pem_path, key_path) = self.files(&root.fingerprint);
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
            .map_err(|e| CaError::Files(format!("{}: {e}", key_path.display())))?;
        write_atomic(&pem_path, root.pem.as_bytes(), 0o644)
            .map_err(|e| CaError::Files(format!("{}: {e}", pem_path.display())))?;
        Ok(root)
    }
}
