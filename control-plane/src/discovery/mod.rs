//! The discovery stream: per-proxy subscriptions, per-resource deltas, ACK/NACK bookkeeping,
//! and endpoint self-registration.
//!
//! Each stream is one task that wakes on the registry's revision `watch`; it always sends the
//! latest state of what changed, so a slow proxy skips intermediate versions instead of
//! queueing stale ones.

pub mod quota;
mod session;

use crate::ca::issuer::identity_of_chain;
use crate::ca::spiffe::SpiffeId;
use crate::state::records::EndpointRecord;
use crate::state::registry::Registry;
use dashmap::DashMap;
use mesh_proto::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub use mesh_proto::resources::{ALL_SERVICES, EGRESS_RESOURCE, SERVICE_PREFIX, TRUST_RESOURCE};

/// What the control plane knows of one connected proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyStatus {
    pub node_id: String,
    pub identity: String,
    pub service: String,
    pub version_label: String,
    /// The proxy's own version, as it said.
    pub proxy_version: String,
    pub connected_at_unix: i64,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    pub subscriptions: Vec<String>,
    /// Root of the proxy's current certificate, as it last reported.
    pub cert_signer: String,
}

/// Connected proxies by stream id.
#[derive(Default)]
pub struct ProxyTable {
    next_id: AtomicU64,
    pub proxies: DashMap<u64, ProxyStatus>,
}

impl ProxyTable {
    fn insert(&self, status: ProxyStatus) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.proxies.insert(id, status);
        id
    }
}

pub struct DiscoveryService {
    pub registry: Arc<Registry>,
    pub proxies: Arc<ProxyTable>,
    pub quotas: Arc<quota::Quotas>,
}

pub fn peer_identity<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    req.peer_certs()
        .and_then(|c| identity_of_chain(&c))
        .ok_or_else(|| Status::unauthenticated("a mesh client certificate is required"))
}

/// Builds the proto of a service from the registry state.
pub fn service_config(
    state: &crate::state::registry::State,
    name: &str,
) -> Option<pb::ServiceConfig> {
    let svc = state.services.get(name)?;
    if let Some(x) = &svc.external {
        return Some(external_config(state, name, x));
    }
    // Other services as backends reach proxies as versions of this one (`expand` makes the
    // one copy of the stored route).
    let none = pb::Route::default();
    let stored = state.routes.get(name).map_or(&none, |r| &r.current.route);
    let (route, backends) = crate::state::backends::expand(name, stored);
    let mut endpoints: Vec<pb::Endpoint> = state
        .endpoints
        .get(name)
        .into_iter()
        .flat_map(|m| m.values())
        .map(endpoint_to_proto)
        .collect();
    endpoints.extend(crate::state::backends::endpoints(state, &backends));
    Some(pb::ServiceConfig {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        identity: svc.identity.clone(),
        endpoints,
        route: Some(route),
        policy: state.policies.get(name).map(|p| p.policy.clone()),
        authz: effective_authz(state, name),
        mtls_mode: crate::state::registry::Registry::mtls_mode(state, name).to_string(),
        vips: state
            .vips
            .get(name)
            .map(|v| v.ips.clone())
            .unwrap_or_default(),
        ports: state
            .vips
            .get(name)
            .into_iter()
            .flat_map(|v| &v.ports)
            .map(|&(port, target)| pb::ServicePort {
                port: u32::from(port),
                target_port: u32::from(target),
            })
            .collect(),
        app_protocols: crate::state::registry::Registry::app_protocols(state, name),
        external: None,
        backend_services: backends
            .iter()
            .map(|b| pb::BackendService {
                version: b.version.clone(),
                service: match mesh_model::service::split(&b.service) {
                    (n, ns) if ns == svc.namespace => n.to_string(),
                    _ => b.service.clone(),
                },
                identity: state
                    .services
                    .get(&b.service)
                    .map(|s| s.identity.clone())
                    .unwrap_or_default(),
                subset: b.subset.clone(),
            })
            .collect(),
    })
}

/// The proto of an external service: its addresses as endpoints (no identity, one version),
/// its route and policy as any service's.
fn external_config(
    state: &crate::state::registry::State,
    host: &str,
    x: &crate::state::records::ExternalRecord,
) -> pb::ServiceConfig {
    pb::ServiceConfig {
        name: host.to_string(),
        endpoints: x
            .addresses
            .iter()
            .map(|a| pb::Endpoint {
                id: a.clone(),
                address: a.clone(),
                ready: true,
                ..Default::default()
            })
            .collect(),
        route: state.routes.get(host).map(|r| r.current.route.clone()),
        policy: state.policies.get(host).map(|p| p.policy.clone()),
        external: Some(pb::External {
            host: host.to_string(),
            port: u32::from(x.port),
            tls: x.tls,
            ca_pem: x.ca_pem.clone(),
            sni: x.sni.clone(),
            client_cert_pem: x.client_cert_pem.clone(),
            client_key_pem: x.client_key_pem.clone(),
            addresses: x.addresses.clone(),
        }),
        ..Default::default()
    }
}

/// A service's authorization as proxies apply it: its rules plus its namespace's default
/// (None: no such service).
pub fn effective_authz(state: &crate::state::registry::State, name: &str) -> Option<pb::Authz> {
    let namespace = &state.services.get(name)?.namespace;
    let mut a = state
        .authz
        .get(name)
        .map(|r| r.authz.clone())
        .unwrap_or_default();
    a.default_action = state
        .authz_defaults
        .get(namespace)
        .cloned()
        .unwrap_or_else(|| "allow-all".into());
    a.trust_domain = state.trust_domain.clone();
    Some(a)
}

pub fn endpoint_to_proto(e: &EndpointRecord) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id.clone(),
        address: e.address.clone(),
        labels: e
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ready: e.ready,
        app_port: e.app_port.into(),
        identity: e.identity.clone(),
    }
}

pub fn endpoint_from_proto(e: pb::Endpoint) -> EndpointRecord {
    EndpointRecord {
        id: e.id,
        address: e.address,
        labels: e.labels.into_iter().collect(),
        ready: e.ready,
        leased: false,
        app_port: u16::try_from(e.app_port).unwrap_or(0),
        kubernetes: false,
        identity: String::new(),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;
type QuotaGrantStream = Pin<Box<dyn Stream<Item = Result<pb::QuotaGrants, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let identity = peer_identity(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let node = first
            .node
            .clone()
            .ok_or_else(|| Status::invalid_argument("the first request must carry node"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let id = self.proxies.insert(ProxyStatus {
            node_id: node.id.clone(),
            identity: identity.to_string(),
            service: node.service.clone(),
            version_label: node.version_label.clone(),
            proxy_version: node.proxy_version.clone(),
            connected_at_unix: crate::state::records::now_unix(),
            ..ProxyStatus::default()
        });
        tracing::info!(node = %node.id, %identity, "proxy connected");
        let session = session::Session::new(
            self.registry.clone(),
            self.proxies.clone(),
            id,
            identity.to_string(),
            tx,
        );
        tokio::spawn(session.run(first, inbound));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type QuotaStream = QuotaGrantStream;

    /// Each report is answered with the reporting proxy's shares; when the stream ends, its
    /// shares go back to the others.
    async fn quota(
        &self,
        req: Request<Streaming<pb::QuotaReport>>,
    ) -> Result<Response<Self::QuotaStream>, Status> {
        let identity = peer_identity(&req)?;
        let mut reports = req.into_inner();
        let quotas = self.quotas.clone();
        let stream = quotas.stream();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(r)) = reports.message().await {
                let grants = quotas.report(stream, &identity.namespace, &r);
                if tx.send(Ok(grants)).await.is_err() {
                    break;
                }
            }
            quotas.gone(stream);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let identity = peer_identity(&req)?;
        let msg = req.into_inner();
        if msg.gateway && msg.endpoint.is_none() {
            let service = mesh_model::service::absolute(&msg.service, &identity.namespace);
            self.registry.declare_service(&service, &identity).await?;
            return Ok(Response::new(pb::RegisterResponse {}));
        }
        let ep = msg
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint is required"))?;
        let mut ep = endpoint_from_proto(ep);
        ep.leased = true;
        // A proxy names its service as its app does: a bare name is in its own namespace.
        let service = mesh_model::service::absolute(&msg.service, &identity.namespace);
        self.registry
            .upsert_endpoint(&service, &identity, ep)
            .await?;
        Ok(Response::new(pb::RegisterResponse {}))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let identity = peer_identity(&req)?;
        let msg = req.into_inner();
        let service = mesh_model::service::absolute(&msg.service, &identity.namespace);
        self.registry
            .remove_endpoint(&service, &msg.endpoint_id, Some(&identity))
            .await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}
