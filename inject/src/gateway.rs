//! The objects behind a Gateway API `Gateway` of class `mesh`, as Istio's automated deployment
//! makes them for its own class:
//!
//! - a ServiceAccount named as the Gateway, whose identity authorization rules name;
//! - a Deployment `<gateway>-mesh` of gateway proxies (`mesh-proxy` with gateway listeners):
//!   service `<gateway>`, listening on the Gateway's HTTPS and HTTP ports, serving the
//!   certificates of the Secrets its HTTPS listeners name, mounted, so that the kubelet's
//!   updates of a Secret reach the proxy's reload of its files;
//! - a LoadBalancer Service `<gateway>` with the listeners' ports.
//!
//! The control plane applies them (server-side) and writes what a listener could not take into
//! the Gateway's status: [`GatewayPlan::issues`].

use super::*;

/// Where the certificate Secrets are mounted, one directory each.
const CERT_DIR: &str = "/etc/mesh/gateway-certs";
/// The label that selects a Gateway's pods (Gateway API's own).
pub const GATEWAY_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The gateway proxy's container.
pub const GATEWAY_CONTAINER: &str = "mesh-gateway";
/// Worker threads of a gateway proxy: it serves a whole site (a sidecar's default is one).
const GATEWAY_WORKERS: &str = "2";

/// Why a listener is not served, or not wholly: the condition and reason Gateway API names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerIssue {
    pub listener: String,
    /// `Accepted` or `Programmed` (the listener is not served), or `ResolvedRefs` (a reference
    /// is not used).
    pub condition: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// What a Gateway becomes.
#[derive(Debug, Default)]
pub struct GatewayPlan {
    /// ServiceAccount, Deployment and Service, in the order they are applied; none when no
    /// listener can be served.
    pub objects: Vec<Value>,
    pub issues: Vec<ListenerIssue>,
}

/// The name of a Gateway's Deployment.
pub fn deployment_name(gateway: &str) -> String {
    format!("{gateway}-mesh")
}

/// The port each protocol is served on, and the certificate Secrets.
#[derive(Default)]
struct Listeners {
    https: Option<i64>,
    http: Option<i64>,
    secrets: Vec<String>,
}

/// Reads the listeners: the mesh's gateway proxy serves one HTTPS port (several hostnames and
/// certificates on it, by SNI) and one HTTP port, terminating TLS with Secrets of the
/// Gateway's own namespace.
fn listeners(gw: &Value, ns: &str) -> (Listeners, Vec<ListenerIssue>) {
    let mut out = Listeners::default();
    let mut issues = Vec::new();
    for l in gw["spec"]["listeners"].as_array().into_iter().flatten() {
        let name = l["name"].as_str().unwrap_or_default();
        let mut issue = |condition: &'static str, reason: &'static str, message: String| {
            issues.push(ListenerIssue {
                listener: name.to_string(),
                condition,
                reason,
                message,
            })
        };
        let Some(port) = l["port"].as_i64().filter(|p| (1..=65535).contains(p)) else {
            issue("Accepted", "UnsupportedValue", "no port 1 to 65535".into());
            continue;
        };
        let protocol = l["protocol"].as_str().unwrap_or("");
        let served = match protocol {
            "HTTPS" => out.https,
            "HTTP" => out.http,
            other => {
                issue(
                    "Accepted",
                    "UnsupportedProtocol",
                    format!("the mesh's gateway serves HTTP and HTTPS, not {other:?}"),
                );
                continue;
            }
        };
        if let Some(p) = served.filter(|p| *p != port) {
            issue(
                "Accepted",
                "PortUnavailable",
                format!("the mesh's gateway serves {protocol} on one port, {p}"),
            );
            continue;
        }
        if protocol == "HTTP" {
            out.http = Some(port);
            continue;
        }
        if l["tls"]["mode"].as_str().is_some_and(|m| m != "Terminate") {
            issue(
                "Accepted",
                "UnsupportedValue",
                "TLS passthrough is not served: HTTPS listeners terminate TLS".into(),
            );
            continue;
        }
        let mut certs = 0;
        for r in l["tls"]["certificateRefs"].as_array().into_iter().flatten() {
            let secret = r["name"].as_str().unwrap_or_default();
            let (group, kind) = (
                r["group"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or("Secret"),
            );
            if !group.is_empty() || kind != "Secret" || secret.is_empty() {
                issue(
                    "ResolvedRefs",
                    "InvalidCertificateRef",
                    format!("{kind} {secret:?}: certificates come from core Secrets"),
                );
                continue;
            }
            if let Some(other) = r["namespace"].as_str().filter(|n| *n != ns) {
                issue(
                    "ResolvedRefs",
                    "RefNotPermitted",
                    format!(
                        "Secret {other}/{secret}: the gateway mounts Secrets of its own namespace \
                         only (ReferenceGrants are not read)"
                    ),
                );
                continue;
            }
            if !out.secrets.iter().any(|s| s == secret) {
                out.secrets.push(secret.to_string());
            }
            certs += 1;
        }
        if certs == 0 {
            issue(
                "Programmed",
                "Invalid",
                "an HTTPS listener needs a certificate Secret it can use".into(),
            );
            continue;
        }
        out.https = Some(port);
    }
    (out, issues)
}

/// The objects of Gateway `gw` (its JSON), with the proxy settings of `cfg`.
pub fn plan(gw: &Value, cfg: &InjectConfig) -> GatewayPlan {
    let name = gw["metadata"]["name"].as_str().unwrap_or_default();
    let ns = gw["metadata"]["namespace"].as_str().unwrap_or("default");
    let (l, issues) = listeners(gw, ns);
    if name.is_empty() || (l.https.is_none() && l.http.is_none()) {
        return GatewayPlan {
            objects: Vec::new(),
            issues,
        };
    }
    let selector = json!({ GATEWAY_LABEL: name });
    let mut meta = json!({
        "name": name,
        "namespace": ns,
        "labels": { GATEWAY_LABEL: name, "app.kubernetes.io/managed-by": "mesh-control-plane" },
    });
    // Deleting the Gateway deletes them.
    if let Some(uid) = gw["metadata"]["uid"].as_str() {
        meta["ownerReferences"] = json!([{
            "apiVersion": gw["apiVersion"], "kind": "Gateway", "name": name, "uid": uid,
            "controller": true,
        }]);
    }
    let named = |n: String| {
        let mut m = meta.clone();
        m["name"] = json!(n);
        m
    };

    let mut vars = proxy_env(cfg);
    vars.extend([
        env("MESH_SERVICE", name),
        env("MESH_WORKERS", GATEWAY_WORKERS),
    ]);
    let mut ports = vec![ContainerPort {
        name: Some(ADMIN_PORT_NAME.into()),
        container_port: ADMIN_PORT,
        ..Default::default()
    }];
    let mut service_ports = Vec::new();
    for (proto, port) in [("https", l.https), ("http", l.http)] {
        let Some(port) = port else { continue };
        let p = i32::try_from(port).unwrap_or_default();
        ports.push(ContainerPort {
            name: Some(proto.into()),
            container_port: p,
            ..Default::default()
        });
        service_ports.push(json!({
            "name": proto, "port": p, "targetPort": p, "protocol": "TCP", "appProtocol": proto,
        }));
        let flag = if proto == "https" {
            "MESH_GATEWAY_HTTPS_ADDR"
        } else {
            "MESH_GATEWAY_HTTP_ADDR"
        };
        vars.push(env(flag, format!("0.0.0.0:{p}")));
    }
    if let (Some(https), Some(_)) = (l.https, l.http) {
        // Plain HTTP is sent to the HTTPS listener, at the Service's port.
        vars.push(env("MESH_GATEWAY_REDIRECT_PORT", https.to_string()));
    }
    let mut mounts = proxy_mounts();
    let mut volumes = vec![
        serde_json::to_value(ca_volume(cfg)).unwrap_or_default(),
        serde_json::to_value(token_volume(cfg)).unwrap_or_default(),
    ];
    let mut certs = Vec::new();
    for (i, secret) in l.secrets.iter().enumerate() {
        let dir = format!("{CERT_DIR}/{secret}");
        certs.push(format!("{dir}/tls.crt:{dir}/tls.key"));
        mounts.push(VolumeMount {
            name: format!("cert-{i}"),
            mount_path: dir,
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(json!({"name": format!("cert-{i}"), "secret": {"secretName": secret}}));
    }
    if !certs.is_empty() {
        vars.push(env("MESH_GATEWAY_CERT", certs.join(",")));
    }
    let container = Container {
        name: GATEWAY_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        env: Some(vars),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        security_context: Some(proxy_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let annotations: Map<String, Value> = scrape_annotations()
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": named(deployment_name(name)),
        // No replicas: `kubectl scale` or an autoscaler owns them.
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                // The webhook leaves the gateway's pods alone: the gateway is their proxy.
                "metadata": {"labels": {GATEWAY_LABEL: name, INJECT: "disabled"},
                             "annotations": annotations},
                "spec": {
                    "serviceAccountName": name,
                    // Listener ports below 1024 for a proxy that runs without privilege.
                    "securityContext": {"sysctls": [
                        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": named(name.to_string()),
        "spec": {"type": "LoadBalancer", "selector": selector, "ports": service_ports},
    });
    let account =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": named(name.to_string())});
    GatewayPlan {
        objects: vec![account, deployment, service],
        issues,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(listeners: Value) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "shop", "uid": "u-1"},
            "spec": {"gatewayClassName": "mesh", "listeners": listeners},
        })
    }

    fn env_of(deployment: &Value) -> BTreeMap<String, String> {
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect()
    }

    #[test]
    fn https_and_http_listeners_become_the_proxy_s_listeners_and_the_service_s_ports() {
        let p = plan(
            &gateway(json!([
                {"name": "shop", "hostname": "shop.example.com", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-tls"}]}},
                {"name": "api", "hostname": "*.example.org", "port": 443, "protocol": "HTTPS",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "org-tls"},
                                                                  {"name": "shop-tls"}]}},
                {"name": "plain", "port": 80, "protocol": "HTTP"},
            ])),
            &InjectConfig::default(),
        );
        assert_eq!(p.issues, []);
        let kinds: Vec<&str> = p
            .objects
            .iter()
            .filter_map(|o| o["kind"].as_str())
            .collect();
        assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
        let d = &p.objects[1];
        assert_eq!(d["metadata"]["name"], "edge-mesh");
        assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "u-1");
        let pod = &d["spec"]["template"];
        assert_eq!(pod["spec"]["serviceAccountName"], "edge");
        assert_eq!(pod["metadata"]["labels"][INJECT], "disabled");
        let e = env_of(d);
        assert_eq!(e["MESH_SERVICE"], "edge");
        assert_eq!(e["MESH_GATEWAY_HTTPS_ADDR"], "0.0.0.0:443");
        assert_eq!(e["MESH_GATEWAY_HTTP_ADDR"], "0.0.0.0:80");
        assert_eq!(e["MESH_GATEWAY_REDIRECT_PORT"], "443");
        assert_eq!(
            e["MESH_GATEWAY_CERT"],
            "/etc/mesh/gateway-certs/shop-tls/tls.crt:/etc/mesh/gateway-certs/shop-tls/tls.key,\
             /etc/mesh/gateway-certs/org-tls/tls.crt:/etc/mesh/gateway-certs/org-tls/tls.key"
        );
        let secrets: Vec<&str> = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        assert_eq!(secrets, ["shop-tls", "org-tls"]);
        let s = &p.objects[2];
        assert_eq!(s["spec"]["type"], "LoadBalancer");
        assert_eq!(s["spec"]["selector"][GATEWAY_LABEL], "edge");
        let ports: Vec<i64> = s["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_i64())
            .collect();
        assert_eq!(ports, [443, 80]);
    }

    #[test]
    fn listeners_the_gateway_cannot_serve_are_named_with_gateway_api_s_reasons() {
        let p = plan(
            &gateway(json!([
                {"name": "tcp", "port": 5432, "protocol": "TCP"},
                {"name": "pass", "port": 443, "protocol": "HTTPS", "tls": {"mode": "Passthrough"}},
                {"name": "other-ns", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "x", "namespace": "vault"}]}},
                {"name": "ok", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-tls"}, {"group": "cert-manager.io", "kind": "Certificate", "name": "c"}]}},
                {"name": "second-port", "port": 8443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-tls"}]}},
            ])),
            &InjectConfig::default(),
        );
        let got: Vec<(&str, &str, &str)> = p
            .issues
            .iter()
            .map(|i| (i.listener.as_str(), i.condition, i.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("tcp", "Accepted", "UnsupportedProtocol"),
                ("pass", "Accepted", "UnsupportedValue"),
                ("other-ns", "ResolvedRefs", "RefNotPermitted"),
                ("other-ns", "Programmed", "Invalid"),
                ("ok", "ResolvedRefs", "InvalidCertificateRef"),
                ("second-port", "Accepted", "PortUnavailable"),
            ]
        );
        // The listener that can be served is.
        let e = env_of(&p.objects[1]);
        assert_eq!(e["MESH_GATEWAY_HTTPS_ADDR"], "0.0.0.0:443");
        assert!(!e.contains_key("MESH_GATEWAY_HTTP_ADDR"));
        // Nothing to serve: no objects.
        let none = plan(
            &gateway(json!([{"name": "tcp", "port": 5432, "protocol": "TCP"}])),
            &InjectConfig::default(),
        );
        assert!(none.objects.is_empty());
    }
}
