//! Routes as Kubernetes objects: a `MeshRoute` (`mesh.io/v1alpha1`, CRD in
//! deploy/kubernetes/05-crds.yaml) named after its service, in the service's namespace, whose
//! spec is the route as `meshctl route get -o json` shows it. `kubectl apply` and `meshctl
//! route set` edit the same route: the leader copies an object that changed into the registry
//! (validated like any route; a refused one is logged, changes nothing, and the object is set
//! back to the route in force), and a route that changed in the registry (meshctl, the canary
//! controller) into its object. Deleting the object resets the service to its default route.
//!
//! Why a mesh resource rather than Gateway API's HTTPRoute: the mesh routes to versions of one
//! service (endpoint subsets by label), which HTTPRoute can only express as one Service per
//! version.

use crate::leader::Leadership;
use crate::registry::Registry;
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mesh_proto::v1::Route;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub const GROUP: &str = "mesh.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "MeshRoute";
pub const PLURAL: &str = "meshroutes";
const FIELD_MANAGER: &str = "mesh-control-plane";
/// Changes arriving within this window are synced together.
const SETTLE: Duration = Duration::from_millis(20);

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// The route an object's spec holds (its `service` field aside).
fn route_of(obj: &DynamicObject) -> Result<Route, String> {
    let mut spec = obj.data.get("spec").cloned().unwrap_or_default();
    if let Some(m) = spec.as_object_mut() {
        m.remove("service");
    }
    serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))
}

/// The service an object routes: `spec.service`, else its name.
fn service_of(obj: &DynamicObject) -> String {
    obj.data["spec"]["service"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| obj.name_any())
}

/// Keeps MeshRoute objects and the registry's routes equal; runs until the process ends. Only
/// the leader writes, so replicas never fight over an object.
pub async fn sync(client: Client, registry: Arc<Registry>, leader: Leadership) {
    let ar = api_resource();
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
    // Per service: the route as last made equal on both sides. A side that differs from it
    // is the side that changed.
    let mut synced: BTreeMap<String, Route> = BTreeMap::new();
    // Per service: the object's last refused spec, which the registry's route then replaces.
    let mut refused: BTreeMap<String, Route> = BTreeMap::new();
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
        }
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                e = events.next() => if e.is_none() { return },
            }
        }
        if leader.is_leader() {
            sync_once(&client, &ar, &registry, &objects, &mut synced, &mut refused).await;
        }
    }
}

async fn sync_once(
    client: &Client,
    ar: &ApiResource,
    registry: &Registry,
    objects: &Store<DynamicObject>,
    synced: &mut BTreeMap<String, Route>,
    refused: &mut BTreeMap<String, Route>,
) {
    let state = registry.state();
    let mut seen = std::collections::HashSet::new();
    for obj in objects.state() {
        let service = service_of(&obj);
        seen.insert(service.clone());
        let Some(svc) = state.services.get(&service) else {
            tracing::debug!(%service, "MeshRoute for a service the mesh does not know yet");
            continue;
        };
        let current = state.route_of(&service).route;
        let wanted = match route_of(&obj) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%service, object = %obj.name_any(), error = %e, "MeshRoute refused");
                continue;
            }
        };
        if wanted == current {
            synced.insert(service, current);
            continue;
        }
        let last = synced.get(&service);
        // The registry changed (meshctl, the canary controller) while the object did not, or
        // the object holds a refused spec: the object follows. Otherwise the object is newer,
        // and the registry follows it.
        if last == Some(&wanted) || refused.get(&service) == Some(&wanted) {
            match write_object(client, ar, &svc.namespace, &service, &current).await {
                Ok(()) => {
                    synced.insert(service, current);
                }
                Err(e) => tracing::warn!(%service, error = %e, "cannot write the MeshRoute"),
            }
            continue;
        }
        match registry.set_route(&service, wanted.clone(), true, 0).await {
            Ok(v) => {
                tracing::info!(%service, revision = v.revision, "route set from its MeshRoute");
                synced.insert(service, wanted);
            }
            Err(e) => {
                tracing::warn!(%service, error = %e, "MeshRoute refused; the route is unchanged");
                refused.insert(service.clone(), wanted);
                // Set the object back to the route in force, as a refused write would be.
                match write_object(client, ar, &svc.namespace, &service, &current).await {
                    Ok(()) => {
                        synced.insert(service, current);
                    }
                    Err(e) => tracing::warn!(%service, error = %e, "cannot write the MeshRoute"),
                }
            }
        }
    }
    for (service, rec) in &state.routes {
        if seen.contains(service) {
            continue;
        }
        let Some(svc) = state.services.get(service) else {
            continue;
        };
        let current = &rec.current.route;
        if synced.get(service) == Some(current) && *current != Route::default() {
            // It was synced and the object is gone: deleted with kubectl.
            match registry.set_route(service, Route::default(), true, 0).await {
                Ok(_) => {
                    tracing::info!(%service, "MeshRoute deleted: the service routes by default");
                    synced.insert(service.clone(), Route::default());
                }
                Err(e) => tracing::warn!(%service, error = %e, "cannot reset the route"),
            }
            continue;
        }
        if *current == Route::default() {
            continue;
        }
        match write_object(client, ar, &svc.namespace, service, current).await {
            Ok(()) => {
                synced.insert(service.clone(), current.clone());
            }
            Err(e) => tracing::warn!(%service, error = %e, "cannot write the MeshRoute"),
        }
    }
}

/// Server-side apply of the MeshRoute of `service` holding `route`.
async fn write_object(
    client: &Client,
    ar: &ApiResource,
    namespace: &str,
    service: &str,
    route: &Route,
) -> Result<(), kube::Error> {
    let mut spec = serde_json::to_value(route).map_err(kube::Error::SerdeError)?;
    spec["service"] = service.into();
    let obj = serde_json::json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {"name": service, "namespace": namespace},
        "spec": spec,
    });
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, ar)
        .patch(
            service,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map(|_| ())
}
