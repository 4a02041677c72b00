//! Probe rewriting. With the pod's inbound traffic redirected to the sidecar, the kubelet's
//! plaintext probe of the app port meets the STRICT inbound listener and is refused, so the
//! pod never becomes Ready (or is restarted). The injector points each httpGet, tcpSocket and
//! grpc probe of an app container at `GET /app-health/<container>/<kind>` on the proxy's admin
//! port (never redirected), and hands the original, with its port resolved to a number, to the
//! proxy (`MESH_APP_PROBES`), which runs it against the app on localhost and answers with the
//! app's result. The originals are kept whole in the `mesh.io/original-probes` annotation so
//! `meshctl uninject` can put them back. `mesh.io/rewrite-probes: "false"` opts a pod out;
//! exec probes and probes of another host are left alone.

use super::{ADMIN_PORT, InjectError, bad};
use serde_json::{Map, Value, json};

/// Annotation holding the original probes, by container then probe field.
pub const ORIGINAL_PROBES: &str = "mesh.io/original-probes";
/// Annotation that turns rewriting off for a pod ("false").
pub const REWRITE_PROBES: &str = "mesh.io/rewrite-probes";

const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// What rewriting produced: the proxy's `MESH_APP_PROBES` and the originals' annotation.
#[derive(Debug, Default)]
pub struct Rewritten {
    pub proxy_env: Map<String, Value>,
    pub originals: Map<String, Value>,
}

/// A probe's port as a number: an int, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value, at: &str) -> Result<u16, InjectError> {
    let n = match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => match name.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64()),
        },
        _ => None,
    };
    n.and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            bad(
                at,
                format!("port {port} is neither a number nor a named port"),
            )
        })
}

/// The part of a probe the proxy runs, ports resolved; None for a probe left alone.
fn proxy_side(container: &Value, probe: &Value, at: &str) -> Result<Option<Value>, InjectError> {
    let elsewhere = |action: &Value| action["host"].as_str().is_some_and(|h| !h.is_empty());
    let timeout = probe["timeoutSeconds"].clone();
    let mut out = if let Some(h) = probe.get("httpGet").filter(|h| h.is_object()) {
        if elsewhere(h) {
            return Ok(None);
        }
        let mut h = h.clone();
        h["port"] = json!(resolve_port(container, &h["port"], at)?);
        json!({ "httpGet": h })
    } else if let Some(t) = probe.get("tcpSocket").filter(|t| t.is_object()) {
        if elsewhere(t) {
            return Ok(None);
        }
        json!({ "tcpSocket": { "port": resolve_port(container, &t["port"], at)? } })
    } else if let Some(g) = probe.get("grpc").filter(|g| g.is_object()) {
        let mut g = g.clone();
        g["port"] = json!(resolve_port(container, &g["port"], at)?);
        json!({ "grpc": g })
    } else {
        return Ok(None);
    };
    if !timeout.is_null() {
        out["timeoutSeconds"] = timeout;
    }
    Ok(Some(out))
}

/// Rewrites the probes of `containers` in place; returns what the proxy and the annotation get.
pub fn rewrite(containers: &mut [Value]) -> Result<Rewritten, InjectError> {
    let mut r = Rewritten::default();
    for c in containers.iter_mut() {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        let mut kept = Map::new();
        for (field, kind) in KINDS {
            let Some(probe) = c.get(field).filter(|p| p.is_object()).cloned() else {
                continue;
            };
            let at = format!("spec.containers[{name}].{field}");
            let Some(spec) = proxy_side(c, &probe, &at)? else {
                continue;
            };
            let path = format!("/app-health/{name}/{kind}");
            r.proxy_env.insert(path.clone(), spec);
            let mut new = probe.clone();
            if let Some(m) = new.as_object_mut() {
                m.remove("httpGet");
                m.remove("tcpSocket");
                m.remove("grpc");
                m.insert(
                    "httpGet".into(),
                    json!({"path": path, "port": ADMIN_PORT, "scheme": "HTTP"}),
                );
            }
            c[field] = new;
            kept.insert(field.to_string(), probe);
        }
        if !kept.is_empty() {
            r.originals.insert(name, Value::Object(kept));
        }
    }
    Ok(r)
}

/// Puts the original probes back (the reverse of [`rewrite`]).
pub fn restore(containers: &mut [Value], originals: &Map<String, Value>) {
    for c in containers.iter_mut() {
        let Some(kept) = c["name"]
            .as_str()
            .and_then(|n| originals.get(n))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for (field, probe) in kept {
            c[field.as_str()] = probe.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_tcp_and_grpc_probes_move_to_the_admin_port_and_come_back() {
        let mut cs = vec![
            json!({
                "name": "app",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                   "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                                   "periodSeconds": 2, "timeoutSeconds": 3},
                "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 5},
                "startupProbe": {"grpc": {"port": 9090, "service": "echo"}}
            }),
            json!({
                "name": "side",
                "livenessProbe": {"exec": {"command": ["true"]}},
                "readinessProbe": {"httpGet": {"path": "/", "port": 80, "host": "example.com"}}
            }),
        ];
        let before = cs.clone();
        let r = rewrite(&mut cs).unwrap();
        let app = &cs[0];
        assert_eq!(
            app["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/app/readyz", "port": ADMIN_PORT, "scheme": "HTTP"},
                   "periodSeconds": 2, "timeoutSeconds": 3})
        );
        assert_eq!(app["livenessProbe"]["failureThreshold"], 5);
        assert_eq!(
            app["livenessProbe"]["httpGet"]["path"],
            "/app-health/app/livez"
        );
        assert_eq!(
            app["startupProbe"]["httpGet"]["path"],
            "/app-health/app/startupz"
        );
        assert_eq!(
            r.proxy_env["/app-health/app/readyz"],
            json!({"httpGet": {"path": "/healthz", "port": 8080,
                   "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 3})
        );
        assert_eq!(
            r.proxy_env["/app-health/app/livez"],
            json!({"tcpSocket": {"port": 8080}})
        );
        assert_eq!(
            r.proxy_env["/app-health/app/startupz"],
            json!({"grpc": {"port": 9090, "service": "echo"}})
        );
        // exec and another host: untouched.
        assert_eq!(cs[1], before[1]);
        assert_eq!(r.proxy_env.len(), 3);
        // The proxy accepts what the injector writes.
        let env = Value::Object(r.proxy_env.clone()).to_string();
        assert!(env.contains("/app-health/app/readyz"));
        restore(&mut cs, &r.originals);
        assert_eq!(cs, before);
    }

    #[test]
    fn an_unknown_named_port_is_refused() {
        let mut cs = vec![json!({
            "name": "app",
            "readinessProbe": {"httpGet": {"path": "/", "port": "nope"}}
        })];
        let e = rewrite(&mut cs).unwrap_err();
        assert!(e.to_string().contains("named port"), "{e}");
    }
}
