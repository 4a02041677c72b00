//! `MeshExternal` objects (cluster-scoped, `mesh.io/v1alpha1`): services outside the mesh
//! declared with kubectl, as `meshctl external add` declares them. The leader copies each
//! object into the registry (validated as any write; its addresses resolved when it gives
//! none) and says in its status whether it is in force; deleting the object removes the
//! external it put there. An external added with meshctl and no object is left alone.

use super::objects::{Standing, write_status};
use crate::replicas::leader::Leadership;
use crate::state::records::ExternalRecord;
use crate::state::registry::Registry;
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use mesh_crds::MeshExternalSpec;
use std::collections::BTreeMap;
use std::sync::Arc;

fn resource() -> ApiResource {
    ApiResource {
        group: super::objects::GROUP.into(),
        version: super::objects::VERSION.into(),
        api_version: format!("{}/{}", super::objects::GROUP, super::objects::VERSION),
        kind: "MeshExternal".into(),
        plural: "meshexternals".into(),
    }
}

/// The external an object declares: its host and record (addresses resolved if it gives none).
async fn wanted(obj: &DynamicObject) -> Result<(String, ExternalRecord), String> {
    let spec: MeshExternalSpec =
        serde_json::from_value(obj.data.get("spec").cloned().unwrap_or_default())
            .map_err(|e| format!("spec: {e}"))?;
    let host = if spec.host.is_empty() {
        obj.name_any()
    } else {
        spec.host.clone()
    }
    .to_ascii_lowercase();
    if spec.port == 0 {
        return Err("spec.port: 0 is not a port".into());
    }
    let resolved = spec.addresses.is_empty();
    let addresses = if resolved {
        crate::api::admin::externals::resolve(&host, spec.port).await?
    } else {
        spec.addresses
    };
    Ok((
        host,
        ExternalRecord {
            port: spec.port,
            tls: spec.tls,
            ca_pem: spec.ca_pem,
            sni: spec.sni,
            client_cert_pem: String::new(),
            client_key_pem: String::new(),
            addresses,
            resolved,
        },
    ))
}

/// Keeps the registry's externals equal to the objects; runs until the process ends.
pub async fn sync(client: Client, registry: Arc<Registry>, leader: Leadership) {
    let ar = resource();
    let (objects, events) = super::objects::reflect(&client, &ar);
    let mut events = std::pin::pin!(events);
    let mut changes = registry.watch();
    // Host → the object's spec last put in force (or refused), as JSON.
    let mut memory: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
        }
        if !super::settle(&mut events).await {
            return;
        }
        if leader.is_leader() {
            sync_once(&client, &ar, &registry, &objects, &mut memory).await;
        }
    }
}

async fn sync_once(
    client: &Client,
    ar: &ApiResource,
    registry: &Registry,
    objects: &Store<DynamicObject>,
    memory: &mut BTreeMap<String, serde_json::Value>,
) {
    let mut seen = Vec::new();
    for obj in objects.state() {
        let spec = obj.data.get("spec").cloned().unwrap_or_default();
        let name = obj.name_any().to_ascii_lowercase();
        let host = spec["host"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map_or(name, str::to_ascii_lowercase);
        seen.push(host.clone());
        let in_force = registry
            .state()
            .services
            .get(&host)
            .is_some_and(|s| s.external.is_some());
        if memory.get(&host) == Some(&spec) && in_force {
            continue;
        }
        let result = match wanted(&obj).await {
            Ok((host, rec)) => registry
                .set_external(&host, rec)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => tracing::info!(%host, "external service set from its object"),
            Err(e) => tracing::warn!(%host, error = %e, "MeshExternal refused; nothing changed"),
        }
        memory.insert(host, spec);
        let standing = match result {
            Ok(()) => Standing::Accepted,
            Err(why) => Standing::Refused(why),
        };
        write_status(client, ar, &obj, &standing, None, None).await;
    }
    // Objects deleted: the externals they put there go.
    let gone: Vec<String> = memory
        .keys()
        .filter(|h| !seen.contains(h))
        .cloned()
        .collect();
    for host in gone {
        memory.remove(&host);
        match registry.remove_external(&host).await {
            Ok(_) => tracing::info!(%host, "MeshExternal deleted: external service removed"),
            Err(e) => tracing::debug!(%host, error = %e, "MeshExternal deleted"),
        }
    }
}
