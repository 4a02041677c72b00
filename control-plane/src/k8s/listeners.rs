//! Gateway API `Gateway` objects of class `mesh`: the ingress gateways of the mesh. A Gateway
//! named `edge` is served by the gateway proxies of service `edge` in its namespace. The
//! control plane applies their Deployment, Service and ServiceAccount (`mesh_inject::gateway`:
//! the listeners' ports and certificate Secrets become the proxies' listeners and mounted
//! files); the listeners' hostnames bound the hostnames of the routes attached to it; and it
//! writes the Gateway's status: Accepted, Programmed once a gateway proxy of it has started,
//! each listener's attached routes and what of it cannot be served.

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

/// Applies a Gateway's objects (server-side, as their owner) that changed since last applied.
pub async fn apply_objects(
    client: &Client,
    objects: &[Value],
    applied: &mut BTreeMap<String, Value>,
) {
    for o in objects {
        let (Some(kind), Some(ns), Some(name)) = (
            o["kind"].as_str(),
            o["metadata"]["namespace"].as_str(),
            o["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        let key = format!("{kind}/{ns}/{name}");
        if applied.get(&key) == Some(o) {
            continue;
        }
        let (group, plural) = match kind {
            "Deployment" => ("apps", "deployments"),
            "Service" => ("", "services"),
            _ => ("", "serviceaccounts"),
        };
        let gvk = kube::api::GroupVersionKind::gvk(group, "v1", kind);
        let api = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            ns,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        match api
            .patch(
                name,
                &PatchParams::apply("mesh-control-plane").force(),
                &Patch::Apply(o),
            )
            .await
        {
            Ok(_) => {
                applied.insert(key, o.clone());
            }
            Err(e) => {
                tracing::warn!(%kind, namespace = %ns, %name, error = %e, "cannot apply a Gateway's object")
            }
        }
    }
}

/// Writes a Gateway's status when it differs: Accepted; Programmed once a proxy of it has
/// started (`programmed`); each listener with `attached` routes, and not accepted, not
/// programmed or with unresolved references as `issues` say.
pub async fn write_status(
    client: &Client,
    obj: &Value,
    programmed: bool,
    attached: usize,
    issues: &[mesh_inject::gateway::ListenerIssue],
) {
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
            let name = l["name"].as_str().unwrap_or_default();
            let issue = |condition: &str| {
                issues
                    .iter()
                    .find(|i| i.listener == name && i.condition == condition)
            };
            let condition = |t: &str, ok_reason: &str, default: (bool, &str, &str)| match issue(t)
            {
                Some(i) => cond(t, false, i.reason, &i.message),
                None => cond(t, default.0, if default.0 { ok_reason } else { default.1 }, default.2),
            };
            let accepted = issue("Accepted").is_none();
            let served = accepted && issue("Programmed").is_none();
            json!({"name": l["name"], "attachedRoutes": if served { attached } else { 0 },
                   "supportedKinds": [{"group": super::gateway::GROUP, "kind": "HTTPRoute"},
                                      {"group": super::gateway::GROUP, "kind": "GRPCRoute"}],
                   "conditions": [condition("Accepted", "Accepted", (true, "", "")),
                                  if accepted {
                                      condition("Programmed", "Programmed", (programmed, reason, message))
                                  } else {
                                      cond("Programmed", false, "Invalid", "the listener is not accepted")
                                  },
                                  condition("ResolvedRefs", "ResolvedRefs", (true, "", ""))]})
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
