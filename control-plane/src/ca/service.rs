//! The Identity gRPC service: authenticates the caller (bootstrap token, or a mesh client
//! certificate for renewal) and signs its CSR only for the identity it proved.

use super::CaError;
use super::grant::{Grant, Source};
use super::issuer::{CertificateAuthority, identity_of_chain};
use crate::ca::tokens;
use crate::state::registry::Registry;
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
        let peer = req.peer_certs().and_then(|c| {
            let id = identity_of_chain(&c)?;
            let grant = c
                .first()
                .and_then(|leaf| Grant::of_cert(leaf))
                .unwrap_or(Grant {
                    source: Source::Unrecorded,
                    since_ms: 0,
                });
            Some((id, grant))
        });
        let msg = req.into_inner();
        let result = match self.kube_identity(&msg.token).await {
            Ok(Some(id)) => self.sign(&msg, id, &Grant::new(Source::Kubernetes)),
            Ok(None) => match self.renewal_refused(&msg, peer.as_ref()).await {
                Some(why) => Err(Status::permission_denied(why)),
                None => self.certify_inner(&msg, peer),
            },
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
    async fn kube_identity(
        &self,
        token: &str,
    ) -> Result<Option<crate::ca::spiffe::SpiffeId>, Status> {
        let Some(client) = &self.kube else {
            return Ok(None);
        };
        if token.is_empty() || token.starts_with(tokens::PREFIX) {
            return Ok(None);
        }
        crate::k8s::review_token(client, token, &self.ca.trust_domain)
            .await
            .map(Some)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    /// Why a renewal (a request with no token, authenticated by the certificate it renews)
    /// is refused: its grant was revoked, or its Kubernetes ServiceAccount is gone.
    async fn renewal_refused(
        &self,
        msg: &CertifyRequest,
        peer: Option<&(crate::ca::spiffe::SpiffeId, Grant)>,
    ) -> Option<String> {
        let (id, grant) = peer.filter(|_| msg.token.is_empty())?;
        if let Some(why) = grant.revoked(&self.registry.state(), id) {
            return Some(format!("renewal refused: {why}"));
        }
        if grant.source == Source::Kubernetes
            && let Some(client) = &self.kube
            && crate::k8s::service_account_gone(client, id).await
        {
            return Some(format!(
                "renewal refused: ServiceAccount {}/{} no longer exists",
                id.namespace, id.service_account
            ));
        }
        None
    }

    fn sign(
        &self,
        msg: &CertifyRequest,
        allowed: crate::ca::spiffe::SpiffeId,
        grant: &Grant,
    ) -> Result<CertifyResponse, Status> {
        let signed = self.ca.sign_csr_with(&msg.csr_pem, &allowed, grant)?;
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
        peer: Option<(crate::ca::spiffe::SpiffeId, Grant)>,
    ) -> Result<CertifyResponse, Status> {
        let (allowed, grant) = if !msg.token.is_empty() {
            let id = tokens::check(&self.registry, &msg.token)
                .map_err(|e| Status::unauthenticated(e.to_string()))?;
            let token_id = tokens::id_of(&tokens::hash(&msg.token)).to_string();
            (id, Grant::new(Source::Token(token_id)))
        } else if let Some((id, grant)) = peer {
            // A renewal carries its certificate's grant on.
            (id, grant)
        } else {
            return Err(Status::unauthenticated(
                "no credential: send a bootstrap token or present a mesh client certificate",
            ));
        };
        self.sign(msg, allowed, &grant)
    }
}
