//! Discovery from Kubernetes: Pods and EndpointSlices, watched with kube-rs, become the mesh's
//! endpoints. An EndpointSlice's service (label `kubernetes.io/service-name`) is the mesh
//! service; each endpoint whose Pod is injected (`mesh.io/injected`) is an endpoint at
//! `<pod IP>:15006` with its readiness, its app port (the slice's first port), its version
//! label (the Pod's `version` or `app.kubernetes.io/version`), and the identity of its Pod's
//! ServiceAccount. Services give the mesh services their ClusterIPs and ports (each port's
//! targetPort, resolved by name through the slices), so a transparently intercepted call to a
//! ClusterIP is a call of that service. After every change the endpoints and virtual IPs the
//! registry holds from Kubernetes are reconciled with what the watches say.

pub mod externals;
pub mod gateway;
pub mod listeners;
pub mod objects;
pub mod webhook;

use crate::ca::spiffe::SpiffeId;
use crate::state::records::{EndpointRecord, VipRecord};
use crate::state::registry::Registry;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// The inbound port of an injected proxy.
const INBOUND_PORT: u16 = mesh_inject::INBOUND_PORT as u16;
/// Changes arriving within this window are applied together.
const SETTLE: Duration = Duration::from_millis(20);

/// Where the Kubernetes API is.
#[derive(Debug, Clone)]
pub enum Source {
    /// In-cluster service account, or the kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    Infer,
    /// An API server URL without credentials (tests, `kubectl proxy`).
    Url(String),
}

pub async fn client(source: &Source) -> anyhow::Result<Client> {
    let cfg = match source {
        Source::Infer => kube::Config::infer().await?,
        Source::Url(u) => kube::Config::new(u.parse()?),
    };
    Ok(Client::try_from(cfg)?)
}

/// Audience the injected proxies' projected tokens are issued for.
pub const TOKEN_AUDIENCE: &str = "mesh";

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewError {
    #[error("TokenReview failed: {0}")]
    Api(String),
    #[error("ServiceAccount token refused by the API server: {0}")]
    Refused(String),
    #[error("the token is not a ServiceAccount's (user {0:?})")]
    NotServiceAccount(String),
    #[error("the token is not for audience {TOKEN_AUDIENCE:?}")]
    Audience,
}

/// True when the API server says the identity's ServiceAccount does not exist (404): its
/// certificates are no longer renewed. Any other answer (or none) is not proof of deletion.
pub async fn service_account_gone(client: &Client, id: &SpiffeId) -> bool {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let api = Api::<ServiceAccount>::namespaced(client.clone(), &id.namespace);
    matches!(
        api.get(&id.service_account).await,
        Err(kube::Error::Api(e)) if e.code == 404
    )
}

/// Asks the API server whose projected ServiceAccount token this is (TokenReview); the
/// ServiceAccount is the workload's identity.
pub async fn review_token(
    client: &Client,
    token: &str,
    trust_domain: &str,
) -> Result<SpiffeId, TokenReviewError> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let r = Api::<TokenReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| TokenReviewError::Api(e.to_string()))?;
    let status = r.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(TokenReviewError::Refused(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == TOKEN_AUDIENCE)
    {
        return Err(TokenReviewError::Audience);
    }
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    let parts: Vec<&str> = user.split(':').collect();
    match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] => SpiffeId::new(trust_domain, ns, sa)
            .map_err(|_| TokenReviewError::NotServiceAccount(user.clone())),
        _ => Err(TokenReviewError::NotServiceAccount(user)),
    }
}

/// One desired endpoint: (service, identity, record).
type Desired = (String, SpiffeId, EndpointRecord);

/// What the watched objects say the endpoints are.
fn desired(pods: &Store<Pod>, slices: &Store<EndpointSlice>, trust_domain: &str) -> Vec<Desired> {
    let mut out = Vec::new();
    for slice in slices.state() {
        let Some(service) = slice.labels().get("kubernetes.io/service-name").cloned() else {
            continue;
        };
        let ns = slice.namespace().unwrap_or_else(|| "default".into());
        let app_port = slice
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0);
        for e in &slice.endpoints {
            let Some(ip) = e
                .addresses
                .first()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            else {
                continue;
            };
            let Some(pod_name) = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone())
            else {
                continue;
            };
            let Some(pod) = pods.get(&ObjectRef::new(&pod_name).within(&ns)) else {
                continue;
            };
            if !pod.annotations().contains_key(mesh_inject::INJECTED) {
                continue;
            }
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            let Ok(identity) = SpiffeId::new(trust_domain, &ns, &sa) else {
                continue;
            };
            let mut labels = BTreeMap::new();
            let version = pod
                .labels()
                .get("version")
                .or_else(|| pod.labels().get("app.kubernetes.io/version"))
                .cloned();
            if let Some(v) = version {
                labels.insert("version".to_string(), v);
            }
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            out.push((
                format!("{service}.{ns}"),
                identity,
                EndpointRecord {
                    // The id the pod's own proxy registers with (its node id,
                    // `$(POD_NAME).$(NAMESPACE)`), so the two are one endpoint.
                    id: format!("{pod_name}.{ns}"),
                    address: std::net::SocketAddr::new(ip, INBOUND_PORT).to_string(),
                    labels,
                    ready,
                    leased: false,
                    app_port,
                    kubernetes: true,
                    identity: String::new(),
                },
            ));
        }
    }
    out
}

/// The virtual IPs and ports of each Service, by its mesh key (`name.namespace`).
fn desired_vips(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
) -> BTreeMap<String, VipRecord> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut out = BTreeMap::new();
    for svc in services.state() {
        let Some(spec) = &svc.spec else { continue };
        let mut ips: Vec<String> = spec
            .cluster_ips
            .clone()
            .unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
        ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        if ips.is_empty() {
            continue;
        }
        let name = svc.name_any();
        let ns = svc.namespace().unwrap_or_else(|| "default".into());
        // A named targetPort is the port of that name on the service's endpoints.
        let named = |port_name: &str| {
            slices
                .state()
                .iter()
                .filter(|sl| {
                    sl.namespace().as_deref() == Some(ns.as_str())
                        && sl.labels().get("kubernetes.io/service-name") == Some(&name)
                })
                .flat_map(|sl| sl.ports.clone().unwrap_or_default())
                .find(|p| p.name.as_deref() == Some(port_name))
                .and_then(|p| p.port)
        };
        let mut protocols = BTreeMap::new();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP"))
            .filter_map(|p| {
                let target = match &p.target_port {
                    None => Some(p.port),
                    Some(IntOrString::Int(n)) => Some(*n),
                    Some(IntOrString::String(n)) => named(n),
                }?;
                let target = u16::try_from(target).ok()?;
                // What the app speaks on the target port, as Istio and Linkerd read it.
                if let Some(a) = mesh_model::AppProtocol::of_kubernetes_port(
                    p.app_protocol.as_deref(),
                    p.name.as_deref(),
                ) {
                    protocols.insert(target, a.as_str().to_string());
                }
                Some((u16::try_from(p.port).ok()?, target))
            })
            .collect();
        out.insert(
            format!("{name}.{ns}"),
            VipRecord {
                ips,
                ports,
                protocols,
            },
        );
    }
    out
}

/// Makes the registry's virtual IPs those of the Services that are mesh services.
async fn reconcile_vips(registry: &Registry, want: BTreeMap<String, VipRecord>) {
    let state = registry.state();
    for (service, rec) in &want {
        if state.services.contains_key(service)
            && state.vips.get(service) != Some(rec)
            && let Err(e) = registry.set_vips(service, Some(rec.clone())).await
        {
            tracing::warn!(%service, error = %e, "cannot apply a Service's ClusterIPs");
        }
    }
    for service in state.vips.keys().filter(|s| !want.contains_key(*s)) {
        if let Err(e) = registry.set_vips(service, None).await {
            tracing::warn!(%service, error = %e, "cannot remove a Service's ClusterIPs");
        }
    }
}

/// Makes the registry's Kubernetes endpoints what the watches say.
async fn reconcile(registry: &Registry, want: Vec<Desired>) {
    let state = registry.state();
    let keep: HashSet<(String, String)> = want
        .iter()
        .map(|(s, _, e)| (s.clone(), e.id.clone()))
        .collect();
    for (service, identity, mut record) in want {
        let existing = state
            .endpoints
            .get(&service)
            .and_then(|m| m.get(&record.id));
        // The pod's proxy registered this endpoint itself: its record (address, readiness from
        // its own health checks, labels) stands; the slice only marks it as the pod's.
        if let Some(e) = existing.filter(|e| e.leased) {
            if e.kubernetes {
                continue;
            }
            record = EndpointRecord {
                kubernetes: true,
                ..e.clone()
            };
        } else if existing == Some(&record) {
            continue;
        }
        let id = record.id.clone();
        if let Err(e) = registry.upsert_endpoint(&service, &identity, record).await {
            tracing::warn!(%service, endpoint = %id, error = %e, "cannot apply a Kubernetes endpoint");
        }
    }
    for (service, eps) in &state.endpoints {
        for (id, e) in eps {
            if e.kubernetes
                && !keep.contains(&(service.clone(), id.clone()))
                && let Err(err) = registry.remove_endpoint(service, id, None).await
            {
                tracing::warn!(%service, endpoint = %id, error = %err, "cannot remove a Kubernetes endpoint");
            }
        }
    }
}

/// Keeps the `caBundle` of every webhook in MutatingWebhookConfiguration `name` equal to the
/// trust bundle, so the API server keeps trusting the injection webhook's certificate across a
/// root rotation. The configuration itself is the operator's (deploy manifests); a missing one
/// is reported and tried again at the next change.
pub async fn sync_webhook_ca(client: Client, registry: Arc<Registry>, name: String) {
    use base64::Engine;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api = Api::<MutatingWebhookConfiguration>::all(client);
    let mut changes = registry.watch();
    let mut written: Option<String> = None;
    loop {
        if let Some(bundle) = registry
            .state()
            .trust
            .as_ref()
            .map(|t| t.bundle_pem.clone())
            && written.as_ref() != Some(&bundle)
        {
            let ca = base64::engine::general_purpose::STANDARD.encode(&bundle);
            let result = match api.get(&name).await {
                Ok(cfg) => {
                    let ops: Vec<serde_json::Value> = (0..cfg.webhooks.as_ref().map_or(0, Vec::len))
                        .map(|i| serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": ca}))
                        .collect();
                    match serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops))
                    {
                        Ok(p) => api
                            .patch(
                                &name,
                                &kube::api::PatchParams::default(),
                                &kube::api::Patch::<()>::Json(p),
                            )
                            .await
                            .map(|_| ()),
                        Err(e) => Err(kube::Error::SerdeError(e)),
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    tracing::info!(webhook_configuration = %name, "webhook caBundle set to the trust bundle");
                    written = Some(bundle);
                }
                Err(e) => {
                    tracing::warn!(webhook_configuration = %name, error = %e, "cannot set the webhook caBundle")
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps ConfigMap `config_map` (key `bundle.pem`, which injected pods mount) in every
/// namespace equal to the trust bundle (server-side apply), so injected pods find it before
/// they start and follow a root rotation.
pub async fn publish_bundle(client: Client, registry: Arc<Registry>, config_map: String) {
    let (namespaces, writer) = reflector::store::<Namespace>();
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    )
    .map(|_| ());
    let mut events = std::pin::pin!(events);
    let mut changes = registry.watch();
    // Namespace → the bundle last written there.
    let mut written: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let params = kube::api::PatchParams::apply("mesh-control-plane").force();
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
        }
        let Some(bundle) = registry
            .state()
            .trust
            .as_ref()
            .map(|t| t.bundle_pem.clone())
        else {
            continue;
        };
        for ns in namespaces.state() {
            let name = ns.name_any();
            if written.get(&name) == Some(&bundle) {
                continue;
            }
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(config_map.clone()),
                    namespace: Some(name.clone()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("bundle.pem".to_string(), bundle.clone())])),
                ..Default::default()
            };
            let api = Api::<ConfigMap>::namespaced(client.clone(), &name);
            let mut obj = match serde_json::to_value(&cm) {
                Ok(v) => v,
                Err(_) => continue,
            };
            obj["apiVersion"] = "v1".into();
            obj["kind"] = "ConfigMap".into();
            match api
                .patch(&config_map, &params, &kube::api::Patch::Apply(obj))
                .await
            {
                Ok(_) => {
                    written.insert(name, bundle.clone());
                }
                Err(e) => {
                    tracing::warn!(namespace = %name, error = %e, "cannot write the trust bundle ConfigMap")
                }
            }
        }
    }
}

/// Lets a burst of watch events land (drained for [`SETTLE`]), so their result is applied
/// once; false when the watches ended.
/// When a status condition of `type_` last changed: what `conditions` (a status's list, as
/// stored) says if its status there is `status` already, else now. Kubernetes moves
/// `lastTransitionTime` only when the status changes.
pub(crate) fn transition_time(
    conditions: &serde_json::Value,
    type_: &str,
    status: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    conditions
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_ && c["status"] == status)
        .and_then(|c| serde_json::from_value(c["lastTransitionTime"].clone()).ok())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()))
}

pub(crate) async fn settle<S: futures_util::Stream + Unpin>(events: &mut S) -> bool {
    let until = tokio::time::sleep(SETTLE);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return true,
            e = events.next() => if e.is_none() { return false },
        }
    }
}

/// Watches Pods, EndpointSlices and Services in every namespace and keeps the registry's
/// endpoints and virtual IPs in step; runs until the process ends (the watches retry with
/// backoff on API errors).
pub async fn run(client: Client, registry: Arc<Registry>) {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (services, service_writer) = reflector::store::<Service>();
    let cfg = watcher::Config::default();
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), cfg.clone()).default_backoff(),
    )
    .map(|_| ());
    let slice_events = reflector::reflector(
        slice_writer,
        watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone()).default_backoff(),
    )
    .map(|_| ());
    let service_events = reflector::reflector(
        service_writer,
        watcher(Api::<Service>::all(client), cfg).default_backoff(),
    )
    .map(|_| ());
    let mut events = std::pin::pin!(futures_util::stream::select(
        futures_util::stream::select(pod_events, slice_events),
        service_events
    ));
    let trust_domain = registry.trust_domain.clone();
    let mut changes = registry.watch();
    // Services known to the registry when the virtual IPs were last reconciled: a service that
    // appears later (its first endpoint registers) gets its ClusterIPs then.
    let mut known = 0;
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                if registry.state().services.len() == known {
                    continue;
                }
            }
        }
        // Let a burst of events land, then apply the result once.
        if !crate::k8s::settle(&mut events).await {
            return;
        }
        reconcile(&registry, desired(&pods, &slices, &trust_domain)).await;
        known = registry.state().services.len();
        reconcile_vips(&registry, desired_vips(&services, &slices)).await;
    }
}
