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
    /// With Kubernetes: a projected ServiceAccount token is a credential too (TokenReview).
    pub kube: Option<kube::Client>,
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
        let result = match self.kube_identity(&msg.token).await {
            Ok(Some(id)) => self.sign(&msg, id),
            Ok(None) => self.certify_inner(&msg, peer),
            Err(e) => Err(e),
        };
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
    /// The identity a Kubernetes ServiceAccount token proves (None: not such a token, or no
    /// Kubernetes): the API server's TokenReview, for the mesh's audience.
    async fn kube_identity(&self, token: &str) -> Result<Option<crate::spiffe::SpiffeId>, Status> {
        let Some(client) = &self.kube else {
            return Ok(None);
        };
        if token.is_empty() || token.starts_with(tokens::PREFIX) {
            return Ok(None);
        }
        crate::kubernetes::review_token(client, token, &self.ca.trust_domain)
            .await
            .map(Some)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    fn sign(
        &self,
        msg: &CertifyRequest,
        allowed: crate::spiffe::SpiffeId,
    ) -> Result<CertifyResponse, Status> {
        let signed = self.ca.sign_csr(&msg.csr_pem, &allowed)?;
        tracing::info!(identity = %allowed, "signed workload certificate");
        Ok(CertifyResponse {
            cert_chain_pem: signed.chain_pem,
            trust_bundle_pem: signed.bundle_pem,
            expires_at_unix: signed.not_after.unix_timestamp(),
            signer: signed.signer,
        })
    }

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
        self.sign(msg, allowed)
    }
}
