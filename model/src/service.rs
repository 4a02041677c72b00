//! Service names. A service is (namespace, name); its key is `name.namespace`, as Kubernetes
//! DNS spells it. A name is resolved the way a pod's DNS search path resolves it: a bare
//! `name` in the caller's own namespace, then `name.ns`, `name.ns.svc` and
//! `name.ns.svc.<cluster domain>`. The control plane keeps absolute keys; a proxy keeps the
//! names relative to its own namespace (bare for its own namespace's services), so the names
//! an app uses map to keys without allocating on the request path.

/// The namespace of a name given without one (meshctl's default, and the admin API's).
pub const DEFAULT_NAMESPACE: &str = "default";

/// `host` without `.svc` and `.svc.<cluster domain>`: `name` or `name.ns`.
fn strip_svc(host: &str) -> &str {
    if let Some(h) = host.strip_suffix(".svc") {
        return h;
    }
    match host.find(".svc.") {
        Some(i) => &host[..i],
        None => host,
    }
}

/// The absolute key (`name.ns`) of `name` as a caller in namespace `ns` means it.
pub fn absolute(name: &str, ns: &str) -> String {
    let n = strip_svc(name);
    if n.contains('.') {
        n.to_string()
    } else {
        format!("{n}.{ns}")
    }
}

/// The name a proxy in namespace `ns` knows the service `key` by: bare in its own namespace.
pub fn relative<'a>(key: &'a str, ns: &str) -> &'a str {
    match key.strip_suffix(ns) {
        Some(name) if name.ends_with('.') && !name[..name.len() - 1].contains('.') => {
            &name[..name.len() - 1]
        }
        _ => key,
    }
}

/// (name, namespace) of an absolute key; a key without a namespace is in the default one.
pub fn split(key: &str) -> (&str, &str) {
    key.split_once('.').unwrap_or((key, DEFAULT_NAMESPACE))
}

/// The service a proxy in namespace `ns` resolves a request's host to, relative to `ns`:
/// `name`, `name.ns`, `name.ns.svc` and `name.ns.svc.cluster.local` of its own namespace are
/// all `name`; another namespace's service is `name.other`.
pub fn host_key<'a>(host: &'a str, ns: &str) -> &'a str {
    relative(strip_svc(host), ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_as_kubernetes_dns_does() {
        for (name, abs) in [
            ("api", "api.team-a"),
            ("api.team-b", "api.team-b"),
            ("api.team-b.svc", "api.team-b"),
            ("api.team-b.svc.cluster.local", "api.team-b"),
            ("api.team-a.svc.example.org", "api.team-a"),
        ] {
            assert_eq!(absolute(name, "team-a"), abs, "{name}");
        }
        for (host, key) in [
            ("api", "api"),
            ("api.team-a", "api"),
            ("api.team-a.svc.cluster.local", "api"),
            ("api.team-b", "api.team-b"),
            ("api.team-b.svc", "api.team-b"),
            ("api.team-b.svc.cluster.local", "api.team-b"),
            ("10.0.0.1", "10.0.0.1"),
        ] {
            assert_eq!(host_key(host, "team-a"), key, "{host}");
        }
        assert_eq!(relative("api.team-a", "team-a"), "api");
        assert_eq!(relative("api.xteam-a", "team-a"), "api.xteam-a");
        assert_eq!(relative("api.team-b", "team-a"), "api.team-b");
        assert_eq!(split("api.team-b"), ("api", "team-b"));
        assert_eq!(split("api"), ("api", "default"));
    }
}
