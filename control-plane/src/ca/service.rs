//! The Identity gRPC service: authenticates the caller (bootstrap token, or a mesh client
//! certificate for renewal) and signs its CSR only for the identity it proved.

use super::issuer::{CaError, CertificateAuthority, identity_of_chain};
use crate::registry::Registry;
use crate::tokens;
use mesh_proto::v1::{CertifyRequest, CertifyResponse, identity_server::Identity};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::{Request, Response, Status};

/// Counters for `meshctl` and metrics.
#[derive(Default, Debug)]
pub struct CaStats {
    pub signed: AtomicU64,
    pub refused: AtomicU64,
}

pub struct IdentityService {
    pub ca: Arc<CertificateAuthority>,
    pub registry: Arc<Registry>,
    pub stats: Arc<CaStats>,
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        match e {
            CaError::MalformedCsr(_) | CaError::BadSans(_) => {
                Status::invalid_argument(e.to_string())
            }
            CaError::IdentityMismatch { .. } => Status::permission_denied(e.to_string()),
            CaError::Rotation(_) => Status::failed_precondition(e.to_string()),
            CaError::Files(_) | CaError::Signing(_) => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.peer_certs().and_then(|c| identity_of_chain(&c));
        let msg = req.into_inner();
        let result = self.certify_inner(&msg, peer);
        let counter = if result.is_ok() {
            &self.stats.signed
        } else {
            &self.stats.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::warn!(error = %e.message(), "CSR refused");
        }
        result.map(Response::new)
    }
}

impl IdentityService {
    fn certify_inner(
        &self,
        msg: &CertifyRequest,
        peer: Option<crate::spiffe::SpiffeId>,
    ) -> Result<CertifyResponse, Status> {
        let allowed = if !msg.token.is_empty() {
            tokens::check(&self.registry, &msg.token)
                .map_err(|e| Status::unauthenticated(e.to_string()))?
        } else if let Some(p) = peer {
            p
        } else {
            return Err(Status::unauthenticated(
                "no credential: send a bootstrap token or present a mesh client certificate",
            ));
        };
        let signed = self.ca.sign_csr(&msg.csr_pem, &allowed)?;
        tracing::info!(identity = %allowed, "signed workload certificate");
        Ok(CertifyResponse {
            cert_chain_pem: signed.chain_pem,
            trust_bundle_pem: signed.bundle_pem,
            expires_at_unix: signed.not_after.unix_timestamp(),
            signer: signed.signer,
        })
    }
}
