//! The Kubernetes install `meshctl install` prints (from its templates in cli/manifests/), and
//! the etcd alternative under deploy/kubernetes/etcd/, are valid for the version they name
//! (1.33): every document deserializes into its k8s-openapi type and serializes back to the
//! same thing, so no field is misspelled or misplaced; they agree with each other and with
//! the binaries (flags the control plane has, ports the Service names, the webhook's Service,
//! the names RBAC grants, the etcd members the store URL lists); and values and the operator's
//! CA change the install as they say.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::Value;
use std::path::Path;

/// Deserializes `doc` as `T` and back; any field `T` does not have is lost on the way, and
/// the first difference says where.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    first_difference(doc, &back, "").map_or(Ok(()), Err)
}

fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let here = format!("{at}.{k}");
                match y.get(k) {
                    Some(w) => {
                        if let Some(d) = first_difference(v, w, &here) {
                            return Some(d);
                        }
                    }
                    None => return Some(format!("{here}: not a field of this kind")),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{at}[{i}]"))),
        _ if a == b => None,
        // `minimum: 0` is the float 0.0 to the schema type.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ => Some(format!("{at}: {a} became {b}")),
    }
}

/// `meshctl install` (or `uninstall`) with `args`: (exit success, stdout, stderr).
fn meshctl(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(mesh_tests::bin_dir().join("meshctl"))
        .args(args)
        .output()
        .expect("meshctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The documents of `meshctl <args>`' YAML output.
fn rendered(args: &[&str]) -> Vec<Value> {
    let (ok, out, err) = meshctl(args);
    assert!(ok, "meshctl {args:?}: {err}");
    serde_saphyr::from_multiple::<Value>(&out)
        .unwrap_or_else(|e| panic!("meshctl {args:?}: {e}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Every document of the default install and of the etcd alternative, with where it came
/// from.
fn documents() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = rendered(&["install"])
        .into_iter()
        .map(|d| ("meshctl install".to_string(), d))
        .collect();
    let etcd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/etcd/etcd.yaml");
    let text = std::fs::read_to_string(&etcd).expect("etcd.yaml");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", etcd.display()));
    out.extend(
        docs.into_iter()
            .filter(|d| !d.is_null())
            .map(|d| ("etcd/etcd.yaml".to_string(), d)),
    );
    out
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_manifest_is_a_valid_object_of_its_kind() {
    let docs = documents();
    for (file, d) in &docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let r = match (d["apiVersion"].as_str().unwrap_or_default(), kind) {
            ("v1", "Namespace") => round_trip::<Namespace>(d),
            ("v1", "Secret") => round_trip::<k8s_openapi::api::core::v1::Secret>(d),
            ("v1", "Service") => round_trip::<Service>(d),
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(d),
            ("apps/v1", "Deployment") => round_trip::<Deployment>(d),
            ("apps/v1", "StatefulSet") => round_trip::<StatefulSet>(d),
            ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(d),
            ("autoscaling/v2", "HorizontalPodAutoscaler") => {
                round_trip::<HorizontalPodAutoscaler>(d)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(d),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                round_trip::<ClusterRoleBinding>(d)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(d),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(d),
            ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                round_trip::<MutatingWebhookConfiguration>(d)
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => round_trip::<
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            >(d),
            (v, k) => Err(format!("{v} {k}: not a kind this test knows")),
        };
        if let Err(e) = r {
            panic!("{file}: {kind} {}: {e}", d["metadata"]["name"]);
        }
    }
}

#[test]
fn manifests_agree_with_each_other_and_the_binaries() {
    let docs = documents();
    let deploy: Deployment =
        serde_json::from_value(find(&docs, "Deployment", "mesh-control-plane").clone()).unwrap();
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];

    // Every flag given is one the control plane has.
    let help = std::process::Command::new(mesh_tests::bin_dir().join("mesh-control-plane"))
        .arg("--help")
        .output()
        .expect("mesh-control-plane --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let args = c.args.clone().unwrap_or_default();
    for a in &args {
        let flag = a.split('=').next().unwrap_or(a);
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag}: not a flag of mesh-control-plane"
        );
    }
    // The state is kept through the API server.
    assert!(args.contains(&"--store=kubernetes".to_string()), "{args:?}");
    // The etcd alternative: the store URL its comment gives parses and names every member.
    let etcd_file = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/etcd/etcd.yaml"),
    )
    .expect("etcd.yaml");
    let store = etcd_file
        .lines()
        .find_map(|l| l.trim_start_matches('#').trim().strip_prefix("--store="))
        .expect("the --store the etcd alternative needs");
    let url = mesh_control_plane::state::store::etcd::EtcdUrl::parse(store).expect("store URL");
    let etcd: StatefulSet =
        serde_json::from_value(find(&docs, "StatefulSet", "mesh-etcd").clone()).unwrap();
    let members = etcd.spec.unwrap().replicas.unwrap_or(1);
    let want: Vec<String> = (0..members)
        .map(|i| format!("http://mesh-etcd-{i}.mesh-etcd.mesh-system.svc:2379"))
        .collect();
    assert_eq!(url.endpoints, want);

    // The Service's target ports are the container's named ports.
    let svc: Service =
        serde_json::from_value(find(&docs, "Service", "mesh-control-plane").clone()).unwrap();
    let named: Vec<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    let svc_spec = svc.spec.unwrap();
    for p in svc_spec.ports.iter().flatten() {
        match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                assert!(
                    named.contains(n),
                    "Service port {:?} targets {n}, not a container port",
                    p.name
                )
            }
            other => panic!(
                "Service port {:?} targets {other:?}: name a container port",
                p.name
            ),
        }
    }
    // The webhook calls that Service on a port it has, at the path the control plane serves.
    let hook: MutatingWebhookConfiguration = serde_json::from_value(
        find(
            &docs,
            "MutatingWebhookConfiguration",
            "mesh-sidecar-injector",
        )
        .clone(),
    )
    .unwrap();
    for w in hook.webhooks.iter().flatten() {
        let s = w.client_config.service.as_ref().expect("service");
        assert_eq!(
            (s.name.as_str(), s.namespace.as_str()),
            ("mesh-control-plane", "mesh-system")
        );
        assert_eq!(s.path.as_deref(), Some("/inject"));
        let port = s.port.unwrap_or(443);
        assert!(
            svc_spec.ports.iter().flatten().any(|p| p.port == port),
            "no Service port {port}"
        );
    }
    // The serving certificate covers the name the webhook and the proxies dial.
    assert!(args.contains(&"--server-name=mesh-control-plane.mesh-system.svc".to_string()));
    // RBAC names what the control plane uses.
    let role: ClusterRole =
        serde_json::from_value(find(&docs, "ClusterRole", "mesh-control-plane").clone()).unwrap();
    assert!(role.rules.iter().flatten().any(|r| {
        r.resource_names
            .as_ref()
            .is_some_and(|n| n.contains(&"mesh-sidecar-injector".to_string()))
    }));
    let lease_role: Role =
        serde_json::from_value(find(&docs, "Role", "mesh-control-plane").clone()).unwrap();
    assert!(lease_role.rules.iter().flatten().any(|r| {
        r.resource_names
            .as_ref()
            .is_some_and(|n| n.contains(&mesh_control_plane::server::LEASE_NAME.to_string()))
    }));
    assert!(lease_role.rules.iter().flatten().any(|r| {
        r.resource_names.as_ref().is_some_and(|n| {
            n.contains(&mesh_control_plane::state::store::kube::DEFAULT_NAME.to_string())
        })
    }));
    // Every resource the control plane watches may be listed and watched.
    for res in [
        "pods",
        "services",
        "namespaces",
        "endpointslices",
        "meshroutes",
        "meshpolicies",
        "meshauthorizations",
        "meshexternals",
        "httproutes",
        "grpcroutes",
        "gateways",
    ] {
        assert!(
            role.rules.iter().flatten().any(|r| {
                r.resources
                    .as_ref()
                    .is_some_and(|x| x.iter().any(|x| x == res))
                    && ["list", "watch"]
                        .iter()
                        .all(|v| r.verbs.iter().any(|x| x == v))
            }),
            "the ClusterRole does not let the control plane watch {res}"
        );
    }
}

/// The Dockerfile (no Docker engine runs on the test machines, so it is checked, not built):
/// the images the manifests name are its targets, each copies binaries the workspace builds,
/// from a stage that exists, and the builder makes them with the release script (the sidecar
/// profile-guided).
#[test]
fn dockerfile_targets_and_binaries_match_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let stages: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .map(|s| s.trim().to_string())
        .collect();
    for target in ["build", "control-plane", "proxy"] {
        assert!(
            stages.iter().any(|s| s == target),
            "no stage {target}: {stages:?}"
        );
    }
    let bins = mesh_tests::bin_dir();
    // The builder runs the release script; what it copies out must be what that script makes:
    // the workspace's binaries in target/release, the profile-guided sidecar in target/pgo.
    assert!(
        text.contains("./scripts/build-release.sh --locked"),
        "the builder does not run scripts/build-release.sh"
    );
    let script = std::fs::read_to_string(root.join("scripts/build-release.sh"))
        .expect("scripts/build-release.sh");
    assert!(script.contains("cargo build --release --workspace --bins"));
    assert!(script.contains("cargo build --profile pgo -p mesh-proxy --bin mesh-proxy"));
    let copied = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("&& cp "))
        .expect("the builder copies its binaries out");
    let mut outputs: Vec<&str> = copied.split_whitespace().collect();
    assert_eq!(outputs.pop(), Some("/out/"), "{copied}");
    for f in outputs {
        let name = f
            .strip_prefix("target/release/")
            .or_else(|| f.strip_prefix("target/pgo/").filter(|n| *n == "mesh-proxy"))
            .unwrap_or_else(|| panic!("{f} is not an output of scripts/build-release.sh"));
        assert!(
            bins.join(name).is_file(),
            "{f}: {name} is not a binary of the workspace"
        );
    }
    for l in text.lines().filter(|l| l.starts_with("COPY --from=")) {
        let mut words = l.split_whitespace().skip(1);
        let from = words.next().unwrap_or("").trim_start_matches("--from=");
        assert!(stages.iter().any(|s| s == from), "{l}: no stage {from}");
        let files: Vec<&str> = words.collect();
        for f in &files[..files.len() - 1] {
            let name = Path::new(f)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            assert!(
                bins.join(name).is_file(),
                "{l}: {name} is not a binary of the workspace"
            );
        }
    }
    // The images the manifests and injection use are this Dockerfile's.
    let deploy = std::fs::read_to_string(root.join("cli/manifests/30-control-plane.yaml"))
        .expect("control plane manifest");
    assert!(
        deploy.contains("image: mesh-control-plane:")
            && deploy.contains("--proxy-image=mesh-proxy:")
    );
    assert!(text.contains("-t mesh-control-plane:") && text.contains("-t mesh-proxy:"));
}

/// Issue 27 item 1: `meshctl install` values (`--set` over `-f`), its Secrets (a fresh CA
/// that is a P-256 CA and a 256-bit token, or the operator's CA, checked), `--no-secrets` for
/// upgrades, refusals naming the value, and `meshctl uninstall` naming every object the
/// install makes, the namespace last. Every rendering round-trips as the default does.
#[test]
fn install_values_secrets_and_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "namespace: mesh\ntrustDomain: corp.example\ncontrolPlane:\n  replicas: 5\n  image: reg.example/cp:1\nproxy:\n  image: reg.example/proxy:1\nstore: etcd://etcd-0.etcd:2379,etcd-1.etcd:2379\n",
    )
    .unwrap();
    let docs = rendered(&[
        "install",
        "-f",
        values.to_str().unwrap(),
        "--set",
        "controlPlane.replicas=3,webhook.failurePolicy=Ignore",
    ]);
    for d in &docs {
        let ns = &d["metadata"]["namespace"];
        assert!(ns.is_null() || ns == "mesh", "{d}");
        assert!(!d.to_string().contains("mesh-system"), "{d}");
    }
    let deploy: Deployment =
        serde_json::from_value(find_in(&docs, "Deployment", "mesh-control-plane").clone()).unwrap();
    let spec = deploy.spec.unwrap();
    assert_eq!(spec.replicas, Some(3), "--set wins over -f");
    let c = &spec.template.spec.unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("reg.example/cp:1"));
    let args = c.args.clone().unwrap_or_default();
    for want in [
        "--store=etcd://etcd-0.etcd:2379,etcd-1.etcd:2379",
        "--trust-domain=corp.example",
        "--proxy-image=reg.example/proxy:1",
        "--inject-control-plane=https://mesh-control-plane.mesh.svc:15010",
        "--server-name=mesh-control-plane.mesh.svc",
    ] {
        assert!(args.iter().any(|a| a == want), "{want}: {args:?}");
    }
    assert_eq!(
        args.iter().filter(|a| a.starts_with("--store=")).count(),
        1,
        "{args:?}"
    );
    let hpa = find_in(&docs, "HorizontalPodAutoscaler", "mesh-control-plane");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    let hook = find_in(
        &docs,
        "MutatingWebhookConfiguration",
        "mesh-sidecar-injector",
    );
    for w in hook["webhooks"].as_array().unwrap() {
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(w["clientConfig"]["service"]["namespace"], "mesh");
    }
    let binding = find_in(&docs, "ClusterRoleBinding", "mesh-control-plane");
    assert_eq!(binding["subjects"][0]["namespace"], "mesh");

    // The fresh CA: a P-256 CA certificate for its key; the token: 64 hex digits.
    let ca = find_in(&docs, "Secret", "mesh-ca");
    assert_eq!(ca["type"], "kubernetes.io/tls");
    let (cert, key) = (
        ca["stringData"]["tls.crt"].as_str().unwrap().to_string(),
        ca["stringData"]["tls.key"].as_str().unwrap().to_string(),
    );
    let pair = rcgen::KeyPair::from_pem(&key).unwrap();
    assert_eq!(pair.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cert, pair).unwrap();
    // It signs: a leaf made with it is accepted by rustls' verifier of that root.
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["x.mesh".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(
            leaf.der(),
            &[],
            &rustls_pki_types::ServerName::try_from("x.mesh").unwrap(),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .expect("a leaf the rendered CA signed verifies against it");
    let token = find_in(&docs, "Secret", "mesh-admin-token")["stringData"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
    // Each install makes its own.
    let again = rendered(&["install"]);
    assert_ne!(
        find_in(&again, "Secret", "mesh-admin-token")["stringData"]["token"],
        token.as_str()
    );

    // The operator's CA is used as given; a key of another certificate is refused.
    let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &key).unwrap();
    let own = rendered(&[
        "install",
        "--ca-cert",
        c.to_str().unwrap(),
        "--ca-key",
        k.to_str().unwrap(),
    ]);
    assert_eq!(
        find_in(&own, "Secret", "mesh-ca")["stringData"]["tls.crt"],
        cert.as_str()
    );
    let other = dir.path().join("other.key");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let (ok, _, err) = meshctl(&[
        "install",
        "--ca-cert",
        c.to_str().unwrap(),
        "--ca-key",
        other.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not that of --ca-key"), "{err}");
    // Upgrades keep the cluster's Secrets.
    let upgrade = rendered(&["install", "--no-secrets"]);
    assert!(!upgrade.iter().any(|d| d["kind"] == "Secret"));
    assert_eq!(upgrade.len() + 2, again.len());

    // Refusals name the value.
    for (set, says) in [
        ("nosuch=1", "unknown value \"nosuch\""),
        ("controlPlane.replicas=0", "controlPlane.replicas=\"0\""),
        ("store=file,controlPlane.replicas=2", "store=file"),
        ("namespace=Mesh_System", "not a namespace name"),
    ] {
        let (ok, _, err) = meshctl(&["install", "--set", set]);
        assert!(!ok && err.contains(says), "{set}: {err}");
    }
    // One replica on the file store: no autoscaler, no disruption budget.
    let single = rendered(&["install", "--set", "store=file,controlPlane.replicas=1"]);
    assert!(
        !single
            .iter()
            .any(|d| d["kind"] == "HorizontalPodAutoscaler" || d["kind"] == "PodDisruptionBudget")
    );

    // Uninstall: every object of that install, by kind, name and namespace, namespace last.
    let gone = rendered(&["uninstall", "-f", values.to_str().unwrap()]);
    let key = |d: &Value| {
        (
            d["kind"].as_str().unwrap_or("").to_string(),
            d["metadata"]["name"].as_str().unwrap_or("").to_string(),
            d["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    let mut made: Vec<_> = docs.iter().map(key).collect();
    let mut removed: Vec<_> = gone.iter().map(key).collect();
    assert_eq!(
        gone.last().map(key),
        Some(("Namespace".into(), "mesh".into(), String::new()))
    );
    made.sort();
    removed.sort();
    assert_eq!(made, removed);

    // Every rendering is valid, as the default one is.
    for d in docs.iter().chain(&single) {
        let r = match d["kind"].as_str().unwrap_or("") {
            "Deployment" => round_trip::<Deployment>(d),
            "Secret" => round_trip::<k8s_openapi::api::core::v1::Secret>(d),
            "HorizontalPodAutoscaler" => round_trip::<HorizontalPodAutoscaler>(d),
            "MutatingWebhookConfiguration" => round_trip::<MutatingWebhookConfiguration>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            _ => Ok(()),
        };
        r.unwrap_or_else(|e| panic!("{}: {e}", d["kind"]));
    }
}

fn find_in<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}
