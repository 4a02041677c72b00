//! Connections to the control plane: TLS verified against the mesh bundle, the proxy's own
//! certificate as client identity once it has one, failover across the configured addresses.

use crate::bootstrap::Bootstrap;
use crate::tls::{Leaf, TlsContext};
use mesh_proto::v1 as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct ControlPlane {
    bootstrap: Arc<Bootstrap>,
    tls: Arc<TlsContext>,
    /// Index of the address that answered last; tried first next time.
    preferred: AtomicUsize,
}

impl ControlPlane {
    pub fn new(bootstrap: Arc<Bootstrap>, tls: Arc<TlsContext>) -> Self {
        Self {
            bootstrap,
            tls,
            preferred: AtomicUsize::new(0),
        }
    }

    /// Connects to the first control plane that answers, starting with the last good one.
    pub async fn channel(&self, leaf: Option<&Leaf>) -> Result<Channel, ControlPlaneError> {
        let addrs = &self.bootstrap.control_planes;
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..addrs.len() {
            let idx = (start + i) % addrs.len();
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&self.tls.bundle().pem))
                .domain_name(self.bootstrap.control_plane_name.clone());
            if let Some(l) = leaf {
                tls = tls.identity(Identity::from_pem(&l.chain_pem, &l.key_pem));
            }
            let ep = Endpoint::from_shared(addrs[idx].clone())
                .and_then(|e| e.tls_config(tls))
                .map_err(|e| ControlPlaneError(format!("{}: {e}", addrs[idx])))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10));
            match ep.connect().await {
                Ok(c) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e) => {
                    tracing::debug!(addr = %addrs[idx], error = %e, "control plane unreachable");
                    last_err = Some(format!("{}: {e} ({e:?})", addrs[idx]));
                }
            }
        }
        Err(ControlPlaneError(last_err.unwrap_or_else(|| {
            "no control plane address configured".into()
        })))
    }

    pub async fn identity_client(
        &self,
        leaf: Option<&Leaf>,
    ) -> Result<pb::identity_client::IdentityClient<Channel>, ControlPlaneError> {
        Ok(pb::identity_client::IdentityClient::new(
            self.channel(leaf).await?,
        ))
    }

    /// A channel authenticated by the current certificate.
    pub async fn authenticated_channel(&self) -> Result<Channel, ControlPlaneError> {
        let leaf = self
            .tls
            .leaf()
            .ok_or_else(|| ControlPlaneError("no certificate yet".into()))?;
        self.channel(Some(&leaf)).await
    }

    /// A discovery client authenticated by the current certificate.
    pub async fn discovery_client(
        &self,
    ) -> Result<pb::discovery_client::DiscoveryClient<Channel>, ControlPlaneError> {
        self.authenticated_channel()
            .await
            .map(pb::discovery_client::DiscoveryClient::new)
    }
}

/// No control plane could be reached (each address's error, last one kept).
#[derive(Debug, thiserror::Error)]
#[error("control plane unreachable: {0}")]
pub struct ControlPlaneError(pub String);
