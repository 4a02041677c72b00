//! The mesh's own Kubernetes resources (`mesh.io/v1alpha1`) as Rust types, so their CRDs —
//! OpenAPI schemas with the field documentation `kubectl explain` shows, printer columns and
//! a `status` subresource — are generated from the same types the control plane reads, and
//! no schema is written by hand. Each spec is the service's name plus the API message the
//! control plane stores (`meshctl … get -o json` shows the same).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use mesh_proto::v1 as pb;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the control plane reports about an object it read.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: True once the spec is in force; False with the reason when the control
    /// plane refused it (the spec in force is then the previous one).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The store revision that put this spec in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<u64>,
    /// Proxies calling or serving the service that have applied that revision, of those
    /// connected (e.g. `3/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies_applied: Option<String>,
}

/// The route of one mesh service: default split by version (or other services), rules,
/// mirror. `kubectl apply` and `meshctl route set` edit the same route.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "mesh.io",
    version = "v1alpha1",
    kind = "MeshRoute",
    namespaced,
    status = "MeshStatus",
    shortname = "mr",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.appliedRevision"}"#,
    printcolumn = r#"{"name":"Proxies","type":"string","jsonPath":".status.proxiesApplied"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshRouteSpec {
    /// The mesh service this route is for, in the object's namespace (default: the object's
    /// name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    #[serde(flatten)]
    pub route: pb::Route,
}

/// The resilience policy of one mesh service: timeouts, retries, circuit breaking, rate
/// limits, load balancing, fault injection. `kubectl apply` and `meshctl policy set` edit the
/// same policy.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "mesh.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    namespaced,
    status = "MeshStatus",
    shortname = "mp",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.appliedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshPolicySpec {
    /// The mesh service this policy is for, in the object's namespace (default: the object's
    /// name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    #[serde(flatten)]
    pub policy: pb::Policy,
}

/// Who may call one mesh service: rules by caller identity, method and path. `kubectl apply`
/// and `meshctl authz set` edit the same rules.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "mesh.io",
    version = "v1alpha1",
    kind = "MeshAuthorization",
    namespaced,
    status = "MeshStatus",
    shortname = "mz",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".status.appliedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshAuthorizationSpec {
    /// The mesh service these rules are for, in the object's namespace (default: the
    /// object's name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    #[serde(flatten)]
    pub authz: pb::Authz,
}

/// A service outside the mesh, mesh-wide (cluster-scoped, like its DNS name): apps call it by
/// its host through their sidecars, which originate TLS to it. `meshctl external add` declares
/// the same; an object's external replaces one of the same host. Client certificates are
/// declared with meshctl only (a key does not belong in an object's spec).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "mesh.io",
    version = "v1alpha1",
    kind = "MeshExternal",
    status = "MeshStatus",
    shortname = "mx",
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"TLS","type":"boolean","jsonPath":".spec.tls"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshExternalSpec {
    /// Its DNS name, as apps call it, e.g. api.payments.example (default: the object's name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The port it listens on.
    pub port: u16,
    /// The calling sidecars originate TLS to it (else plaintext HTTP).
    #[serde(default)]
    pub tls: bool,
    /// Roots that verify its certificate, PEM (default: the system's roots).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_pem: String,
    /// The name sent in SNI and verified in its certificate (default: the host).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sni: String,
    /// Its addresses, ip:port (default: the host as the control plane resolves it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Every CRD of the mesh, for `meshctl install`.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        MeshRoute::crd(),
        MeshPolicy::crd(),
        MeshAuthorization::crd(),
        MeshExternal::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_schemas_status_and_columns() {
        for crd in all() {
            let v = serde_json::to_value(&crd).unwrap();
            let version = &v["spec"]["versions"][0];
            assert_eq!(version["name"], "v1alpha1");
            assert!(
                version["subresources"]["status"].is_object(),
                "{}",
                crd.metadata.name.unwrap_or_default()
            );
            let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
            // What names the object's subject: a service, or an external's host.
            let subject = if v["spec"]["names"]["kind"] == "MeshExternal" {
                "host"
            } else {
                "service"
            };
            assert!(
                spec["properties"][subject]["description"].is_string(),
                "{spec}"
            );
            let cols: Vec<&str> = version["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            assert!(cols.contains(&"Accepted"), "{cols:?}");
        }
        let route = serde_json::to_value(MeshRoute::crd()).unwrap();
        let spec = &route["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        // Documented to the leaves, from the proto comments: what `kubectl explain` shows.
        let matches = &spec["rules"]["items"]["properties"]["matches"]["items"]["properties"];
        assert!(
            matches["path"].is_object() || matches["exact"].is_object(),
            "{matches}"
        );
        assert!(spec["backends"]["items"]["properties"]["service"]["description"].is_string());
    }

    /// The API server publishes a CRD's schema (for `kubectl explain`, and prunes and
    /// validates with it) only if it is structural: every node has a type (or says it keeps
    /// unknown fields, or is an int-or-string), no `$ref`, and junctors (`oneOf`, `anyOf`,
    /// `allOf`, `not`) only restate what the node's own properties declare, with no type,
    /// description, default or nullable of their own. Checked node by node here, since no
    /// kube-apiserver runs in these tests.
    fn structural(v: &serde_json::Value, at: &str, in_junctor: bool, errors: &mut Vec<String>) {
        let Some(o) = v.as_object() else { return };
        if o.contains_key("$ref") || o.contains_key("definitions") || o.contains_key("$defs") {
            errors.push(format!("{at}: $ref or definitions"));
        }
        if in_junctor {
            for k in [
                "type",
                "description",
                "default",
                "nullable",
                "additionalProperties",
            ] {
                if o.contains_key(k) {
                    errors.push(format!("{at}: {k} inside a junctor"));
                }
            }
        } else if !o.contains_key("type")
            && o.get("x-kubernetes-preserve-unknown-fields") != Some(&serde_json::json!(true))
            && o.get("x-kubernetes-int-or-string") != Some(&serde_json::json!(true))
        {
            errors.push(format!("{at}: no type"));
        }
        for (k, child) in o
            .get("properties")
            .and_then(|p| p.as_object())
            .into_iter()
            .flatten()
        {
            structural(child, &format!("{at}.{k}"), in_junctor, errors);
        }
        for k in ["items", "additionalProperties"] {
            if let Some(child) = o.get(k).filter(|c| c.is_object()) {
                structural(child, &format!("{at}.{k}"), in_junctor, errors);
            }
        }
        for k in ["oneOf", "anyOf", "allOf"] {
            for (i, child) in o
                .get(k)
                .and_then(|j| j.as_array())
                .into_iter()
                .flatten()
                .enumerate()
            {
                structural(child, &format!("{at}.{k}[{i}]"), true, errors);
            }
        }
    }

    #[test]
    fn schemas_are_structural() {
        for crd in all() {
            let v = serde_json::to_value(&crd).unwrap();
            let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let mut errors = Vec::new();
            structural(schema, "", false, &mut errors);
            assert!(errors.is_empty(), "{}: {errors:#?}", v["metadata"]["name"]);
        }
    }
}
