//! Workload identity: the key is generated here and never leaves the process; a CSR goes to the
//! control plane with the bootstrap token (or, for renewal, this proxy's still-valid client
//! certificate). Renewal at ~70% of the lifetime with jitter; on failure the valid certificate
//! keeps serving and renewal retries with backoff.

pub mod control_plane;

use crate::bootstrap::Bootstrap;
use crate::tls::TlsContext;
use control_plane::ControlPlane;
use mesh_proto::v1 as pb;
use rcgen::{CertificateParams, KeyPair, SanType};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Renew when this fraction of the lifetime has passed.
const REFRESH_FRACTION: f64 = 0.7;
/// ± jitter on the refresh point, as a fraction of the lifetime.
const REFRESH_JITTER: f64 = 0.05;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key/CSR generation: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("control plane refused the CSR: {0}")]
    Refused(String),
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    #[error("certificate from the control plane is unusable: {0}")]
    BadCertificate(String),
}

/// Owns the key and keeps a valid certificate installed in the `TlsContext`.
pub struct IdentityManager {
    pub bootstrap: Arc<Bootstrap>,
    pub tls: Arc<TlsContext>,
    pub control_plane: Arc<ControlPlane>,
    /// The root that signed the installed certificate: None until the first one is in.
    pub cert: watch::Sender<Option<Arc<str>>>,
    /// Renew now (the control plane signs with another root than our certificate's).
    pub renew: Arc<tokio::sync::Notify>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl IdentityManager {
    pub async fn run(self) {
        let mut backoff = RETRY_MIN;
        loop {
            match self.certify().await {
                Ok(lifetime) => {
                    backoff = RETRY_MIN;
                    let signer = self.tls.leaf().map(|l| l.signer.clone());
                    self.cert.send_replace(signer);
                    let jitter =
                        1.0 + (fastrand::f64() * 2.0 - 1.0) * REFRESH_JITTER / REFRESH_FRACTION;
                    let wait = lifetime.mul_f64(REFRESH_FRACTION * jitter);
                    tracing::info!(identity = %self.bootstrap.identity, renew_in_secs = wait.as_secs(), "certificate installed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.renew.notified() => {
                            tracing::info!("renewing now: the control plane signs with a new root");
                        }
                    }
                }
                Err(e) => {
                    let valid = self.tls.leaf().is_some_and(|l| l.expires_at > unix_now());
                    tracing::warn!(error = %e, keeping_valid_certificate = valid, retry_in_ms = backoff.as_millis() as u64, "certificate request failed");
                    tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One CSR round trip with a key pair of its own (a renewal never reuses a key, so a
    /// leaked key ends with its certificate); returns the new certificate's remaining lifetime.
    async fn certify(&self) -> Result<Duration, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key = &key;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(self.bootstrap.identity.clone().try_into()?)];
        let csr_pem = params.serialize_request(key)?.pem()?;
        let leaf = self.tls.leaf().filter(|l| l.expires_at > unix_now() + 5);
        // A valid certificate renews itself; the token is for the first certificate (it may
        // have expired since).
        let mut attempts: Vec<Option<String>> = Vec::new();
        if leaf.is_some() {
            attempts.push(None);
        }
        if let Some(t) = self.bootstrap.current_token() {
            attempts.push(Some(t));
        }
        if attempts.is_empty() {
            return Err(IdentityError::Refused(
                "no bootstrap token (--token) and no valid certificate".into(),
            ));
        }
        let mut last = IdentityError::Refused("no attempt".into());
        for token in attempts {
            let mut client = match self.control_plane.identity_client(leaf.as_deref()).await {
                Ok(c) => c,
                Err(e) => return Err(IdentityError::Unreachable(e.to_string())),
            };
            let req = pb::CertifyRequest {
                csr_pem: csr_pem.clone(),
                token: token.unwrap_or_default(),
            };
            match client.certify(req).await {
                Ok(resp) => {
                    let r = resp.into_inner();
                    self.tls
                        .install(
                            &r.cert_chain_pem,
                            &key.serialize_pem(),
                            r.expires_at_unix,
                            &r.trust_bundle_pem,
                            &r.signer,
                        )
                        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
                    let left = (r.expires_at_unix - unix_now()).max(1) as u64;
                    return Ok(Duration::from_secs(left));
                }
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    return Err(IdentityError::Unreachable(s.message().to_string()));
                }
                Err(s) => last = IdentityError::Refused(format!("{:?}: {}", s.code(), s.message())),
            }
        }
        Err(last)
    }
}
