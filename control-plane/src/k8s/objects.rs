//! Routes and policies as Kubernetes objects (`mesh.io/v1alpha1`, CRDs in
//! cli/manifests/05-crds.yaml): a `MeshRoute`, `MeshPolicy` (resilience) or
//! `MeshAuthorization` named after its service, in the service's namespace, whose spec is what
//! `meshctl route|policy|authz get -o json` shows, plus `service`. `kubectl apply` and meshctl
//! edit the same thing: the leader copies an object that changed into the registry (validated
//! as any write; a refused one is logged, changes nothing, and the object is set back to what
//! is in force), and a registry change (meshctl, the canary controller) into its object.
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
    /// The object's last refused spec, which the registry's then replaces.
    refused: BTreeMap<String, S>,
}

/// Keeps the objects of kind `K` and the registry equal; runs until the process ends. Only the
/// leader writes, so replicas never fight over an object.
pub async fn sync<K: Kind>(client: Client, registry: Arc<Registry>, leader: Leadership) {
    let ar = api_resource::<K>();
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let objects = writer.as_reader();
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default(),
        )
        .default_backoff(),
    )
    .map(|_| ());
    let mut events = std::pin::pin!(events);
    let mut changes = registry.watch();
    let mut memory = Memory {
        synced: BTreeMap::new(),
        refused: BTreeMap::new(),
    };
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
        }
        if !crate::k8s::settle(&mut events).await {
            return;
        }
        if leader.is_leader() {
            sync_once::<K>(&client, &ar, &registry, &objects, &mut memory).await;
        }
    }
}

async fn sync_once<K: Kind>(
    client: &Client,
    ar: &ApiResource,
    registry: &Registry,
    objects: &Store<DynamicObject>,
    memory: &mut Memory<K::Spec>,
) {
    let state = registry.state();
    let mut seen = HashSet::new();
    for obj in objects.state() {
        let service = service_of(&obj);
        seen.insert(service.clone());
        let Some(svc) = state.services.get(&service) else {
            tracing::debug!(%service, kind = K::KIND, "object for a service the mesh does not know yet");
            continue;
        };
        let current = K::current(&state, &service);
        let wanted: K::Spec = match spec_of(&obj) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%service, kind = K::KIND, error = %e, "object refused: its spec does not parse");
                continue;
            }
        };
        if wanted == current {
            memory.synced.insert(service, current);
            continue;
        }
        // The registry changed (meshctl, the canary controller) while the object did not, or
        // the object holds a refused spec: the object follows. Otherwise the object is newer
        // and the registry follows it.
        let object_stale = memory.synced.get(&service) == Some(&wanted)
            || memory.refused.get(&service) == Some(&wanted);
        if !object_stale {
            match K::set(registry, &service, wanted.clone()).await {
                Ok(()) => {
                    tracing::info!(%service, kind = K::KIND, "set from its object");
                    memory.synced.insert(service, wanted);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%service, kind = K::KIND, error = %e, "object refused; nothing changed");
                    memory.refused.insert(service.clone(), wanted);
                }
            }
        }
        // Set the object to what is in force (after a refusal: as a refused write would be).
        write_or_warn::<K>(client, ar, &svc.namespace, &service, current, memory).await;
    }
    let default = K::Spec::default();
    for service in K::services(&state) {
        if seen.contains(&service) {
            continue;
        }
        let Some(svc) = state.services.get(&service) else {
            continue;
        };
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
