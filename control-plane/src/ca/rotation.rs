//! A root rotation step as the admin API runs it: the CA changes its roots, the control plane's
//! own TLS follows, and the new bundle is pushed to every proxy before the call returns, so
//! the next step's checks see it.

use super::CertificateAuthority;
use super::roots::Phase;
use crate::discovery::ProxyTable;
use crate::state::registry::{Registry, RegistryError};
use mesh_proto::v1 as pb;
use std::sync::Arc;

pub struct Rotation {
    pub ca: Arc<CertificateAuthority>,
    pub tls: Arc<crate::ca::tls::ServerTls>,
    pub registry: Arc<Registry>,
}

impl Rotation {
    /// Pushes the CA's bundle and signer (nothing is written when unchanged).
    pub async fn publish(&self) -> Result<u64, RegistryError> {
        let roots = self.ca.roots();
        self.registry
            .set_trust(crate::state::records::TrustRecord {
                bundle_pem: roots.bundle_pem.clone(),
                signer: roots.signer.fingerprint.clone(),
            })
            .await
    }

    /// Runs `step` unless a connected proxy is not ready for it (see [`Rotation::blockers`]);
    /// `force` skips that check.
    pub async fn step(
        &self,
        step: &str,
        force: bool,
        proxies: &ProxyTable,
    ) -> Result<Phase, tonic::Status> {
        if !force {
            let blocking = self.blockers(step, proxies);
            if !blocking.is_empty() {
                return Err(tonic::Status::failed_precondition(format!(
                    "{step} refused: {} (wait, or --force)",
                    blocking.join("; ")
                )));
            }
        }
        let phase = self.ca.rotate(step)?;
        self.tls
            .reload(&self.ca)
            .map_err(|e| tonic::Status::internal(format!("serving certificate: {e}")))?;
        self.publish().await?;
        Ok(phase)
    }

    /// Connected proxies that would fail after `step`: before "activate", every proxy must
    /// trust the new root (it has applied the bundle); before "finish", every proxy's
    /// certificate must come from the new root.
    fn blockers(&self, step: &str, proxies: &ProxyTable) -> Vec<String> {
        let info = self.info(proxies);
        let signer = &self.ca.roots().signer.fingerprint;
        info.proxies
            .iter()
            .filter_map(|p| match step {
                "activate" if !p.bundle_applied => {
                    Some(format!("{} has not applied the new bundle", p.node_id))
                }
                "finish" if &p.cert_signer != signer => Some(format!(
                    "{} still holds a certificate from another root",
                    p.node_id
                )),
                _ => None,
            })
            .collect()
    }

    /// Roots, phase, and each connected proxy's standing.
    pub fn info(&self, proxies: &ProxyTable) -> pb::CaInfo {
        let roots = self.ca.roots();
        let state = self.registry.state();
        let mut list: Vec<pb::ProxyCa> = proxies
            .proxies
            .iter()
            .map(|p| pb::ProxyCa {
                node_id: p.node_id.clone(),
                identity: p.identity.clone(),
                cert_signer: p.cert_signer.clone(),
                bundle_applied: p
                    .subscriptions
                    .iter()
                    .any(|s| s == crate::discovery::TRUST_RESOURCE)
                    && p.acked_version >= state.trust_version,
            })
            .collect();
        list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        pb::CaInfo {
            roots: roots
                .bundle
                .iter()
                .map(|r| pb::CaRoot {
                    fingerprint: r.fingerprint.clone(),
                    subject: r.subject.clone(),
                    not_after_unix: r.not_after_unix,
                    signing: r.fingerprint == roots.signer.fingerprint,
                })
                .collect(),
            phase: roots.phase().as_str().into(),
            proxies: list,
            external: self.ca.is_external(),
        }
    }
}
