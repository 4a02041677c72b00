//! Routes whose backends are other services: Gateway API's `backendRefs`, one Service per
//! version, the way Flagger and Argo Rollouts shift traffic. A route is stored as written
//! (`WeightedBackend.service`); proxies get each such backend as one more version of the
//! routed service, named after the backend's key (`podinfo-canary.test`, or
//! `podinfo.test@v2` for one version of it), holding that service's endpoints (the control
//! plane adds them). The proxies' routing, balancing, retries and telemetry are then those of
//! any version, and a proxy needs no second service to route one request. meshctl and the
//! control plane check a route after this expansion, with the model the proxies convert with.

use mesh_proto::v1 as pb;

/// A backend that is another service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBackend {
    /// The version name proxies see.
    pub version: String,
    /// The backend service's key (`name.namespace`).
    pub service: String,
    /// Only its endpoints of this version (empty: all of them).
    pub subset: String,
}

/// The key of backend service `name` named in a route of `service` (relative names are in
/// the routed service's namespace).
pub fn key_of(service: &str, name: &str) -> String {
    let (_, ns) = crate::service::split(service);
    crate::service::absolute(name, ns)
}

/// The version name proxies see for a backend service, or for one version of it.
pub fn version_name(key: &str, subset: &str) -> String {
    if subset.is_empty() {
        key.to_string()
    } else {
        format!("{key}@{subset}")
    }
}

/// The route of `service` as proxies get it (service backends as versions), and the backend
/// services it names, each once.
pub fn expand(service: &str, route: &pb::Route) -> (pb::Route, Vec<ServiceBackend>) {
    let mut out = route.clone();
    let mut found: Vec<ServiceBackend> = Vec::new();
    let mut fix = |backend: &mut String, version: &mut String| {
        if backend.is_empty() {
            return;
        }
        let key = key_of(service, backend);
        let b = ServiceBackend {
            version: version_name(&key, version),
            service: key,
            subset: std::mem::take(version),
        };
        *version = b.version.clone();
        backend.clear();
        if !found.contains(&b) {
            found.push(b);
        }
    };
    for b in &mut out.backends {
        fix(&mut b.service, &mut b.version);
    }
    if let Some(m) = &mut out.mirror {
        fix(&mut m.service, &mut m.version);
    }
    for r in &mut out.rules {
        for b in &mut r.backends {
            fix(&mut b.service, &mut b.version);
        }
        if let Some(m) = &mut r.mirror {
            fix(&mut m.service, &mut m.version);
        }
    }
    (out, found)
}

/// Whether the route of `service` sends to (or mirrors to) the service `other`.
pub fn references(service: &str, route: &pb::Route, other: &str) -> bool {
    let names = |backends: &[pb::WeightedBackend], mirror: &Option<pb::Mirror>| {
        backends
            .iter()
            .map(|b| b.service.as_str())
            .chain(mirror.iter().map(|m| m.service.as_str()))
            .filter(|s| !s.is_empty())
            .any(|s| key_of(service, s) == other)
    };
    names(&route.backends, &route.mirror)
        || route.rules.iter().any(|r| names(&r.backends, &r.mirror))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_backends_become_versions_named_after_them() {
        let b = |service: &str, version: &str, weight| pb::WeightedBackend {
            service: service.into(),
            version: version.into(),
            weight,
        };
        let route = pb::Route {
            backends: vec![
                b("podinfo-primary", "", 90),
                b("podinfo-canary.test", "", 10),
            ],
            rules: vec![pb::RouteRule {
                name: "beta".into(),
                backends: vec![b("", "v1", 1), b("podinfo", "v2", 1)],
                mirror: Some(pb::Mirror {
                    service: "podinfo-canary".into(),
                    percent: 5.0,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (out, found) = expand("podinfo.test", &route);
        let versions: Vec<_> = out.backends.iter().map(|b| b.version.as_str()).collect();
        assert_eq!(versions, ["podinfo-primary.test", "podinfo-canary.test"]);
        assert!(out.backends.iter().all(|b| b.service.is_empty()));
        let rule = &out.rules[0];
        assert_eq!(
            rule.backends[0].version, "v1",
            "a version of the service itself"
        );
        assert_eq!(rule.backends[1].version, "podinfo.test@v2");
        assert_eq!(
            rule.mirror.as_ref().map(|m| m.version.as_str()),
            Some("podinfo-canary.test")
        );
        assert_eq!(found.len(), 3, "each once: {found:?}");
        assert_eq!(found[2].subset, "v2");
        assert!(references("podinfo.test", &route, "podinfo-canary.test"));
        assert!(!references("podinfo.test", &route, "other.test"));
    }
}
