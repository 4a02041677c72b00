//! Routes and policies as Kubernetes objects (`mesh.io/v1alpha1`, CRDs generated from the
//! types in `mesh-crds`): a `MeshRoute`, `MeshPolicy` (resilience) or `MeshAuthorization`
//! named after its service, in the service's namespace, whose spec is what `meshctl
//! route|policy|authz get -o json` shows, plus `service`. `kubectl apply` and meshctl edit the
//! same thing: the leader copies an object that changed into the registry (validated as any
//! write), and a registry change (meshctl, the canary controller) into its object. A refused
//! object is left as the user wrote it: its status says why (`Accepted` False), and the
//! previous spec stays in force until the object is fixed or the registry changes. The status
//! also gives the revision that put the spec in force and how many proxies applied it.
//! Deleting the object resets the service to the default.
//!
//! Mesh resources beside Gateway API's routes (`k8s::gateway`): a MeshRoute splits between
//! versions of one service (endpoint subsets by label), which HTTPRoute can only express as
//! one Service per version.

use crate::replicas::leader::Leadership;
use crate::state::registry::{Registry, RegistryError, State};
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mesh_proto::v1 as pb;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;

pub const GROUP: &str = "mesh.io";
pub const VERSION: &str = "v1alpha1";
const FIELD_MANAGER: &str = "mesh-control-plane";

/// One kind of per-service object and the registry record it mirrors.
pub trait Kind: Send + Sync + 'static {
    const KIND: &'static str;
    const PLURAL: &'static str;
    type Spec: PartialEq + Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What is in force for `service` (the default when nothing is set).
    fn current(state: &State, service: &str) -> Self::Spec;
    /// The services that have something set.
    fn services(state: &State) -> Vec<String>;
    /// The store revision that put the current spec of `service` in force (None: default).
    fn revision(state: &State, service: &str) -> Option<u64>;
    /// Writes `spec` for `service` (the default removes it), validated as any write.
    fn set(
        registry: &Registry,
        service: &str,
        spec: Self::Spec,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// `MeshRoute`: the service's route (`meshctl route`).
pub struct Routes;
/// `MeshPolicy`: the service's resilience policy (`meshctl policy`).
pub struct Policies;
/// `MeshAuthorization`: who may call the service (`meshctl authz`).
pub struct Authorizations;

impl Kind for Routes {
    const KIND: &'static str = "MeshRoute";
    const PLURAL: &'static str = "meshroutes";
    type Spec = pb::Route;
    fn current(state: &State, service: &str) -> pb::Route {
        state.route_of(service).route
    }
    fn services(state: &State) -> Vec<String> {
        state.routes.keys().cloned().collect()
    }
    fn revision(state: &State, service: &str) -> Option<u64> {
        state.routes.get(service).map(|r| r.current.revision)
    }
    async fn set(registry: &Registry, service: &str, spec: pb::Route) -> Result<(), RegistryError> {
        registry.set_route(service, spec, true, 0).await.map(|_| ())
    }
}

impl Kind for Policies {
    const KIND: &'static str = "MeshPolicy";
    const PLURAL: &'static str = "meshpolicies";
    type Spec = pb::Policy;
    fn current(state: &State, service: &str) -> pb::Policy {
        state
            .policies
            .get(service)
            .map(|p| p.policy.clone())
            .unwrap_or_default()
    }
    fn services(state: &State) -> Vec<String> {
        state.policies.keys().cloned().collect()
    }
    fn revision(state: &State, service: &str) -> Option<u64> {
        state.policies.get(service).map(|p| p.revision)
    }
    async fn set(
        registry: &Registry,
        service: &str,
        spec: pb::Policy,
    ) -> Result<(), RegistryError> {
        registry.set_policy(service, spec, true).await.map(|_| ())
    }
}

impl Kind for Authorizations {
    const KIND: &'static str = "MeshAuthorization";
    const PLURAL: &'static str = "meshauthorizations";
    type Spec = pb::Authz;
    fn current(state: &State, service: &str) -> pb::Authz {
        state
            .authz
            .get(service)
            .map(|a| a.authz.clone())
            .unwrap_or_default()
    }
    fn services(state: &State) -> Vec<String> {
        state.authz.keys().cloned().collect()
    }
    fn revision(state: &State, service: &str) -> Option<u64> {
        state.authz.get(service).map(|a| a.revision)
    }
    async fn set(registry: &Registry, service: &str, spec: pb::Authz) -> Result<(), RegistryError> {
        registry.set_authz(service, spec).await.map(|_| ())
    }
}

pub fn api_resource<K: Kind>() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: K::KIND.into(),
        plural: K::PLURAL.into(),
    }
}

/// What an object's spec holds (its `service` field aside).
fn spec_of<S: DeserializeOwned>(obj: &DynamicObject) -> Result<S, String> {
    let mut spec = obj.data.get("spec").cloned().unwrap_or_default();
    if let Some(m) = spec.as_object_mut() {
        m.remove("service");
    }
    serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))
}

/// The service an object is for (its key, `name.namespace`): `spec.service`, else its name,
/// in the object's namespace.
fn service_of(obj: &DynamicObject) -> String {
    let name = obj.data["spec"]["service"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| obj.name_any());
    let ns = obj
        .namespace()
        .unwrap_or_else(|| mesh_model::service::DEFAULT_NAMESPACE.to_string());
    mesh_model::service::absolute(&name, &ns)
}

/// What one sync loop remembers, per service.
struct Memory<S> {
    /// The spec as last made equal on both sides: a side that differs is the side that changed.
    synced: BTreeMap<String, S>,
    /// The object's last refused spec, the reason, and the registry's spec then: the object
    /// stays as written until it changes or the registry does.
    refused: BTreeMap<String, (S, String, S)>,
}

/// How an object stands, for its status.
pub(crate) enum Standing {
    Accepted,
    Refused(String),
}

/// A cache of every object of `ar` in the cluster, and the stream that keeps it current (one
/// item per change; watches retry with backoff).
pub(crate) fn reflect(
    client: &Client,
    ar: &ApiResource,
) -> (
    Store<DynamicObject>,
    impl futures_util::Stream<Item = ()> + Send + use<>,
) {
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let reader = writer.as_reader();
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), ar),
            watcher::Config::default(),
        )
        .default_backoff(),
    )
    .map(|_| ());
    (reader, events)
}

/// Keeps the objects of kind `K` and the registry equal; runs until the process ends. Only the
/// leader writes, so replicas never fight over an object.
pub async fn sync<K: Kind>(
    client: Client,
    registry: Arc<Registry>,
    leader: Leadership,
    proxies: Arc<crate::discovery::ProxyTable>,
) {
    let ar = api_resource::<K>();
    let (objects, events) = reflect(&client, &ar);
    let mut events = std::pin::pin!(events);
    let mut changes = registry.watch();
    let mut memory = Memory {
        synced: BTreeMap::new(),
        refused: BTreeMap::new(),
    };
    // The status's count of proxies that applied a spec moves as they ACK: refreshed.
    let mut tick = tokio::time::interval(STATUS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        if !crate::k8s::settle(&mut events).await {
            return;
        }
        if leader.is_leader() {
            sync_once::<K>(&client, &ar, &registry, &objects, &mut memory, &proxies).await;
        }
    }
}

/// How often objects' status is brought up to date with the proxies' ACKs.
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

async fn sync_once<K: Kind>(
    client: &Client,
    ar: &ApiResource,
    registry: &Registry,
    objects: &Store<DynamicObject>,
    memory: &mut Memory<K::Spec>,
    proxies: &crate::discovery::ProxyTable,
) {
    let state = registry.state();
    // One pass over the connected proxies for every object's status.
    let acked = Acked::of(proxies);
    let mut seen = HashSet::new();
    for obj in objects.state() {
        let service = service_of(&obj);
        seen.insert(service.clone());
        let Some(svc) = state.services.get(&service) else {
            tracing::debug!(%service, kind = K::KIND, "object for a service the mesh does not know yet");
            write_status(
                client,
                ar,
                &obj,
                &Standing::Refused(format!("{service} is not a service of the mesh (yet)")),
                None,
                None,
            )
            .await;
            continue;
        };
        let current = K::current(&state, &service);
        let wanted: K::Spec = match spec_of(&obj) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%service, kind = K::KIND, error = %e, "object refused: its spec does not parse");
                write_status(client, ar, &obj, &Standing::Refused(e), None, None).await;
                continue;
            }
        };
        let standing = if wanted == current {
            memory.synced.insert(service.clone(), current);
            memory.refused.remove(&service);
            Standing::Accepted
        } else if let Some((_, why, _)) = memory
            .refused
            .get(&service)
            .filter(|(spec, _, then)| *spec == wanted && *then == current)
        {
            // Refused before, and neither side changed since: it stays as the user wrote it.
            Standing::Refused(why.clone())
        } else if memory.synced.get(&service) == Some(&wanted)
            || memory
                .refused
                .get(&service)
                .is_some_and(|(spec, _, _)| *spec == wanted)
        {
            // The registry changed (meshctl, the canary controller) while the object did not:
            // the object follows.
            memory.refused.remove(&service);
            write_or_warn::<K>(client, ar, &svc.namespace, &service, current, memory).await;
            continue;
        } else {
            // The object is newer: the registry follows it, if it passes.
            match K::set(registry, &service, wanted.clone()).await {
                Ok(()) => {
                    tracing::info!(%service, kind = K::KIND, "set from its object");
                    memory.synced.insert(service.clone(), wanted);
                    memory.refused.remove(&service);
                    Standing::Accepted
                }
                Err(e) => {
                    tracing::warn!(%service, kind = K::KIND, error = %e, "object refused; nothing changed");
                    memory
                        .refused
                        .insert(service.clone(), (wanted, e.to_string(), current));
                    Standing::Refused(e.to_string())
                }
            }
        };
        let state = registry.state();
        let revision = K::revision(&state, &service);
        let applied = revision.map(|r| acked.applied(&service, r));
        write_status(client, ar, &obj, &standing, revision, applied).await;
    }
    let default = K::Spec::default();
    for service in K::services(&state) {
        if seen.contains(&service) {
            continue;
        }
        let Some(svc) = state.services.get(&service) else {
            continue;
        };
        // An external service is in no namespace: its route and policy have no object (they
        // live in the registry's store, the API server's too).
        if svc.external.is_some() {
            continue;
        }
        let current = K::current(&state, &service);
        if current == default {
            continue;
        }
        if memory.synced.get(&service) != Some(&current) {
            write_or_warn::<K>(client, ar, &svc.namespace, &service, current, memory).await;
            continue;
        }
        // It was synced and the object is gone: deleted with kubectl.
        match K::set(registry, &service, default.clone()).await {
            Ok(()) => {
                tracing::info!(%service, kind = K::KIND, "object deleted: back to the default");
                memory.synced.insert(service, default.clone());
            }
            Err(e) => {
                tracing::warn!(%service, kind = K::KIND, error = %e, "cannot reset to the default")
            }
        }
    }
}

/// The config versions the connected proxies of this replica ACKed: by the service each is
/// subscribed to, and those of proxies subscribed to every service. A status's
/// `proxiesApplied` is how many of a service's reached its revision.
#[derive(Default)]
struct Acked {
    by_service: BTreeMap<String, Vec<u64>>,
    everything: Vec<u64>,
}

impl Acked {
    fn of(proxies: &crate::discovery::ProxyTable) -> Self {
        let mut out = Acked::default();
        for p in proxies.proxies.iter() {
            let names: Vec<&str> = p
                .subscriptions
                .iter()
                .filter_map(|s| s.strip_prefix(crate::discovery::SERVICE_PREFIX))
                .collect();
            if names.contains(&"*") {
                out.everything.push(p.acked_version);
                continue;
            }
            // A proxy names services relative to its namespace (that of its identity).
            let ns = p
                .identity
                .split("/ns/")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .unwrap_or(mesh_model::service::DEFAULT_NAMESPACE);
            let mut keys: Vec<String> = names
                .iter()
                .map(|n| mesh_model::service::absolute(n, ns))
                .collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                out.by_service.entry(k).or_default().push(p.acked_version);
            }
        }
        out
    }

    /// `applied/subscribed` for `service` at `revision`.
    fn applied(&self, service: &str, revision: u64) -> String {
        let versions = self
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .chain(&self.everything);
        let (mut done, mut all) = (0, 0);
        for v in versions {
            all += 1;
            done += usize::from(*v >= revision);
        }
        format!("{done}/{all}")
    }
}

/// Writes an object's status when it differs from what it says (the transition time aside);
/// an object without a namespace is cluster-scoped (`MeshExternal`).
pub(crate) async fn write_status(
    client: &Client,
    ar: &ApiResource,
    obj: &DynamicObject,
    standing: &Standing,
    revision: Option<u64>,
    applied: Option<String>,
) {
    let generation = obj.metadata.generation;
    let (status, reason, message) = match standing {
        Standing::Accepted => ("True", "Accepted", "in force".to_string()),
        Standing::Refused(why) => ("False", "Invalid", why.clone()),
    };
    let before = obj.data.get("status").cloned().unwrap_or_default();
    let since = super::transition_time(&before["conditions"], "Accepted", status);
    let wanted = mesh_crds::MeshStatus {
        observed_generation: generation,
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }],
        applied_revision: revision,
        proxies_applied: applied,
    };
    let Ok(wanted) = serde_json::to_value(&wanted) else {
        return;
    };
    if wanted == before {
        return;
    }
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({ "status": wanted });
    let api = match &obj.metadata.namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar),
        None => Api::<DynamicObject>::all_with(client.clone(), ar),
    };
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(object = %name, namespace = %ns, error = %e, "cannot write the object's status");
    }
}

/// Writes the object of `service` holding `spec`, remembering it as synced.
async fn write_or_warn<K: Kind>(
    client: &Client,
    ar: &ApiResource,
    namespace: &str,
    service: &str,
    spec: K::Spec,
    memory: &mut Memory<K::Spec>,
) {
    match write_object(client, ar, namespace, service, &spec).await {
        Ok(()) => {
            memory.synced.insert(service.to_string(), spec);
        }
        Err(e) => tracing::warn!(%service, kind = K::KIND, error = %e, "cannot write the object"),
    }
}

/// Server-side apply of the object of `service` holding `spec`.
async fn write_object<S: Serialize>(
    client: &Client,
    ar: &ApiResource,
    namespace: &str,
    service: &str,
    spec: &S,
) -> Result<(), kube::Error> {
    // The object lives in the service's namespace, named as the service is there.
    let (name, _) = mesh_model::service::split(service);
    let mut spec = serde_json::to_value(spec).map_err(kube::Error::SerdeError)?;
    spec["service"] = name.into();
    let obj = serde_json::json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, ar)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map(|_| ())
}
