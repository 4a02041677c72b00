//! Gateway API `Gateway` objects of class `mesh`: the ingress gateways of the mesh. A Gateway
//! named `edge` is served by the gateway proxies of service `edge` in its namespace (their
//! flags hold the listeners' addresses and certificates). What the control plane reads of it
//! is its listeners' hostnames, which bound the hostnames of the routes attached to it; what
//! it writes is its status: Accepted, Programmed once a gateway proxy of it has started, and
//! each listener's attached routes.

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use mesh_model::route::HostMatch;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The `gatewayClassName` of the mesh's gateways.
pub const CLASS: &str = "mesh";

pub fn resource() -> ApiResource {
    ApiResource {
        group: super::gateway::GROUP.into(),
        version: super::gateway::VERSION.into(),
        api_version: format!("{}/{}", super::gateway::GROUP, super::gateway::VERSION),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

/// The hostnames a Gateway's listeners take, by the gateway's service key: None when some
/// listener takes any host.
pub fn hostnames(gateways: &[Value]) -> BTreeMap<String, Option<Vec<String>>> {
    gateways
        .iter()
        .filter(|g| g["spec"]["gatewayClassName"] == CLASS)
        .filter_map(|g| {
            let name = g["metadata"]["name"].as_str()?;
            let ns = g["metadata"]["namespace"].as_str().unwrap_or("default");
            let listeners = g["spec"]["listeners"].as_array()?;
            let hosts: Option<Vec<String>> = listeners
                .iter()
                .map(|l| l["hostname"].as_str().map(str::to_ascii_lowercase))
                .collect();
            Some((mesh_model::service::absolute(name, ns), hosts))
        })
        .collect()
}

/// The hostnames a route attached to a gateway serves: its own, each kept if a listener takes
/// it (a listener's wildcard covering it, or the listener's name under the route's wildcard,
/// which is then the listener's); with none of its own, the listeners'. Err: none is left.
pub fn effective(route: &[String], listeners: Option<&Vec<String>>) -> Result<Vec<String>, String> {
    let Some(listeners) = listeners else {
        return Ok(route.to_vec());
    };
    if route.is_empty() {
        return Ok(listeners.clone());
    }
    let covers = |pattern: &str, name: &str| {
        pattern == name || HostMatch::parse(pattern).is_ok_and(|m| m.matches(name))
    };
    let mut out: Vec<String> = Vec::new();
    for r in route {
        for l in listeners {
            let kept = if covers(l, r) {
                r
            } else if covers(r, l) {
                l
            } else {
                continue;
            };
            if !out.contains(kept) {
                out.push(kept.clone());
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no hostname of the route ({}) is one the Gateway's listeners take ({})",
            route.join(", "),
            listeners.join(", ")
        ));
    }
    Ok(out)
}

/// Writes a Gateway's status when it differs: Accepted; Programmed once a proxy of it has
/// started (`programmed`); each listener with `attached` routes.
pub async fn write_status(client: &Client, obj: &Value, programmed: bool, attached: usize) {
    let generation = obj["metadata"]["generation"].clone();
    let cond = |t: &str, ok: bool, reason: &str, message: &str| {
        let before = &obj["status"]["conditions"];
        let status = if ok { "True" } else { "False" };
        let since = super::transition_time(before, t, status);
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "observedGeneration": generation, "lastTransitionTime": since})
    };
    let (reason, message) = if programmed {
        ("Programmed", "a gateway proxy of this Gateway is running")
    } else {
        (
            "Pending",
            "no gateway proxy of this Gateway has started yet",
        )
    };
    let listeners: Vec<Value> = obj["spec"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            json!({"name": l["name"], "attachedRoutes": attached,
                   "supportedKinds": [{"group": super::gateway::GROUP, "kind": "HTTPRoute"},
                                      {"group": super::gateway::GROUP, "kind": "GRPCRoute"}],
                   "conditions": [cond("Accepted", true, "Accepted", ""),
                                  cond("Programmed", programmed, reason, message),
                                  cond("ResolvedRefs", true, "ResolvedRefs", "")]})
        })
        .collect();
    let wanted = json!({
        "conditions": [cond("Accepted", true, "Accepted", "served by the mesh's gateway proxies"),
                       cond("Programmed", programmed, reason, message)],
        "listeners": listeners,
    });
    if strip_times(&wanted) == strip_times(&obj["status"]) {
        return;
    }
    let Ok(d) = serde_json::from_value::<DynamicObject>(obj.clone()) else {
        return;
    };
    let (ns, name) = (d.namespace().unwrap_or_default(), d.name_any());
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource());
    let patch = json!({"status": wanted});
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(gateway = %name, namespace = %ns, error = %e, "cannot write a Gateway's status");
    }
}

/// A status without its transition times (which alone do not make it differ).
fn strip_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), strip_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_times).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_hostnames_are_bounded_by_the_listeners() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let l = s(&["shop.example.com", "*.example.org"]);
        assert_eq!(effective(&[], Some(&l)).unwrap(), l);
        assert_eq!(
            effective(
                &s(&["shop.example.com", "a.example.org", "x.net"]),
                Some(&l)
            )
            .unwrap(),
            s(&["shop.example.com", "a.example.org"])
        );
        assert_eq!(
            effective(&s(&["*.example.com"]), Some(&l)).unwrap(),
            s(&["shop.example.com"]),
            "a route's wildcard narrows to the listener's name"
        );
        let e = effective(&s(&["x.net"]), Some(&l)).unwrap_err();
        assert!(e.contains("listeners take"), "{e}");
        assert_eq!(effective(&s(&["x.net"]), None).unwrap(), s(&["x.net"]));
        let gws = [
            json!({
                "metadata": {"name": "edge", "namespace": "ingress"},
                "spec": {"gatewayClassName": "mesh", "listeners": [
                    {"name": "https", "hostname": "Shop.example.com", "port": 443},
                    {"name": "http", "port": 80}]}
            }),
            json!({
                "metadata": {"name": "other", "namespace": "ingress"},
                "spec": {"gatewayClassName": "istio", "listeners": [{"name": "a", "port": 80}]}
            }),
        ];
        let h = hostnames(&gws);
        assert_eq!(h.len(), 1, "only the mesh's class");
        assert_eq!(
            h["edge.ingress"], None,
            "a listener without a hostname takes any"
        );
    }
}
