//! Replicas asking each other. Each proxy is connected to one replica, which alone holds its
//! telemetry, its tap events and its connection state; a replica answering `top`, `tap`,
//! `proxies`, the dashboard or a canary gate asks the others (`mesh.v1.Replicas`, on their
//! proxies' port) and merges. Replicas find each other in the presence records of the shared
//! store and trust each other by the control plane's own certificate, which the CA issues to
//! no workload, so no secret has to be shared beyond the CA they already share.

use crate::ca::CertificateAuthority;
use crate::ca::spiffe::SpiffeId;
use crate::observe::telemetry::now_ms;
use crate::replicas::view::Local;
use crate::state::registry::Registry;
use mesh_proto::v1 as pb;
use mesh_proto::v1::replicas_client::ReplicasClient;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

/// How long a replica waits for another's answer; one that takes longer is reported as
/// unreachable rather than holding the caller up.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime of the certificate a replica presents to the others; its channel is rebuilt at
/// half of it.
const CLIENT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The other replicas on the shared store, and how to ask them.
pub struct Peers {
    registry: Arc<Registry>,
    ca: Arc<CertificateAuthority>,
    replica: String,
    /// A presence record older than this is a replica gone (the endpoint lease: presence is
    /// refreshed three times per lease).
    fresh: Duration,
    channels: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    channel: Channel,
    /// The root that signed the certificate it presents.
    signer: String,
    made: Instant,
}

/// What the other replicas answered.
pub struct Asked<T> {
    pub answers: Vec<T>,
    /// Live replicas that did not answer (down, unreachable, or too slow), sorted.
    pub unreachable: Vec<String>,
}

impl Peers {
    pub fn new(
        registry: Arc<Registry>,
        ca: Arc<CertificateAuthority>,
        replica: String,
        fresh: Duration,
    ) -> Self {
        Self {
            registry,
            ca,
            replica,
            fresh,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The other replicas whose presence is fresh: (name, address).
    pub fn live(&self) -> Vec<(String, String)> {
        let fresh_after = now_ms() - i64::try_from(self.fresh.as_millis()).unwrap_or(i64::MAX);
        self.registry
            .state()
            .presence
            .iter()
            .filter(|(r, p)| **r != self.replica && p.at_unix_ms >= fresh_after)
            .map(|(r, p)| (r.clone(), p.address.clone()))
            .collect()
    }

    /// A client for the replica at `address`, on a channel kept per address: tonic reconnects
    /// it as needed, and it is rebuilt when the CA's signing root changes or its certificate
    /// is half through its life.
    fn client(&self, address: &str) -> Result<ReplicasClient<Channel>, String> {
        let signer = self.ca.roots().signer.fingerprint.clone();
        let mut channels = self.channels.lock().map_err(|e| e.to_string())?;
        if let Some(c) = channels.get(address)
            && c.signer == signer
            && c.made.elapsed() < CLIENT_CERT_TTL / 2
        {
            return Ok(ReplicasClient::new(c.channel.clone()));
        }
        let cert = self
            .ca
            .issue_server_cert(&[], &[], CLIENT_CERT_TTL)
            .map_err(|e| e.to_string())?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.roots().bundle_pem))
            .identity(Identity::from_pem(cert.cert_chain_pem, cert.key_pem))
            .domain_name(mesh_proto::CONTROL_PLANE_SERVER_NAME);
        let channel = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| format!("address {address:?}: {e}"))?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(ASK_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(
            address.to_string(),
            Cached {
                channel: channel.clone(),
                signer,
                made: Instant::now(),
            },
        );
        Ok(ReplicasClient::new(channel))
    }

    /// Asks every live replica at once with `call`; each has [`ASK_TIMEOUT`] to answer.
    pub async fn ask<T, F, Fut>(&self, call: F) -> Asked<T>
    where
        F: Fn(ReplicasClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let calls = self.live().into_iter().map(|(replica, address)| {
            let client = if address.is_empty() {
                Err("it publishes no address (an older version?)".to_string())
            } else {
                self.client(&address)
            };
            let call = client.map(&call);
            async move {
                let answer = match call {
                    Err(e) => Err(e),
                    Ok(fut) => match tokio::time::timeout(ASK_TIMEOUT, fut).await {
                        Ok(Ok(r)) => Ok(r.into_inner()),
                        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
                        Err(_) => Err(format!("no answer in {ASK_TIMEOUT:?}")),
                    },
                };
                (replica, address, answer)
            }
        });
        let mut out = Asked {
            answers: Vec::new(),
            unreachable: Vec::new(),
        };
        for (replica, address, answer) in futures_util::future::join_all(calls).await {
            match answer {
                Ok(a) => out.answers.push(a),
                Err(error) => {
                    tracing::warn!(%replica, %address, %error, "another replica did not answer; its proxies are left out");
                    out.unreachable.push(replica);
                }
            }
        }
        out.unreachable.sort();
        out
    }
}

/// `mesh.v1.Replicas`: this replica's own proxies, for the other replicas only.
pub struct ReplicaService {
    pub local: Arc<Local>,
    /// The identity a caller must present: the control plane's.
    pub allowed: SpiffeId,
}

impl ReplicaService {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let who = crate::discovery::peer_identity(req)?;
        if who == self.allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{who} is not a control-plane replica"
            )))
        }
    }
}

#[tonic::async_trait]
impl pb::replicas_server::Replicas for ReplicaService {
    async fn windows(
        &self,
        req: Request<pb::WindowsRequest>,
    ) -> Result<Response<pb::WindowsResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let version = (!r.version.is_empty()).then_some(r.version.as_str());
        let only = (!r.service.is_empty()).then_some((r.service.as_str(), version));
        let windows = self.local.telemetry.edges(r.since_unix_ms, only).to_proto();
        Ok(Response::new(pb::WindowsResponse { windows }))
    }

    async fn proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ListProxiesResponse {
            proxies: self.local.proxies(),
            unreachable_replicas: Vec::new(),
        }))
    }

    async fn quota_demands(
        &self,
        req: Request<pb::QuotaDemandsRequest>,
    ) -> Result<Response<pb::QuotaDemandsResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::QuotaDemandsResponse {
            demands: self.local.quotas.local_demand(),
        }))
    }

    type TapStream = crate::replicas::view::TapStream;

    async fn tap(&self, req: Request<pb::TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.local.tap(req.into_inner(), Vec::new())))
    }
}
