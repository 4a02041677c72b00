use super::manifest::inject_manifest;
use super::review::{MalformedReview, review};
use super::*;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;

const DEPLOYMENT_POD: &str = include_str!("../../tests/fixtures/admission/deployment-pod.json");
const BARE_POD: &str = include_str!("../../tests/fixtures/admission/bare-pod.json");
const OPTED_OUT: &str = include_str!("../../tests/fixtures/admission/opted-out-pod.json");

fn cfg() -> InjectConfig {
    InjectConfig::default()
}

/// The review's patch applied to its pod.
fn patched(review_json: &str) -> (Value, Value) {
    let req: Value = serde_json::from_str(review_json).unwrap();
    let resp = review(review_json.as_bytes(), &cfg()).unwrap();
    let mut pod = req["request"]["object"].clone();
    if let Some(p) = resp["response"]["patch"].as_str() {
        assert_eq!(resp["response"]["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    (resp, pod)
}

fn env_of(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn deployment_pod_gets_native_sidecar_and_init_step() {
    let (resp, pod) = patched(DEPLOYMENT_POD);
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    let pod: Pod = serde_json::from_value(pod).expect("a valid Pod");
    let spec = pod.spec.expect("spec");
    let inits = spec.init_containers.expect("init containers");
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["mesh-init", "mesh-proxy", "migrate"]);
    let (init, proxy) = (&inits[0], &inits[1]);

    // Native sidecar, held ready before the app starts.
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let startup = proxy.startup_probe.as_ref().expect("startup probe");
    let get = startup.http_get.as_ref().expect("http probe");
    assert_eq!(get.path.as_deref(), Some("/ready"));
    assert_eq!(get.port, IntOrString::Int(ADMIN_PORT));
    assert_eq!(env_of(proxy, "MESH_SERVICE").as_deref(), Some("catalog"));
    assert_eq!(env_of(proxy, "MESH_SERVICE_VERSION").as_deref(), Some("v2"));
    assert_eq!(env_of(proxy, "MESH_APP_PORT").as_deref(), Some("8080"));
    let sc = proxy.security_context.as_ref().expect("security context");
    assert_eq!(sc.run_as_user, Some(PROXY_UID));
    assert_eq!(sc.run_as_non_root, Some(true));
    let res = proxy.resources.as_ref().expect("resources");
    assert_eq!(
        res.limits.as_ref().and_then(|l| l.get("cpu")),
        Some(&Quantity("500m".into())),
        "from the annotation"
    );
    assert_eq!(
        res.requests.as_ref().and_then(|l| l.get("memory")),
        Some(&Quantity("32Mi".into())),
        "the default"
    );

    // The init step: redirect installed by uid, admin port and annotated ports skipped.
    let args = init.args.clone().unwrap_or_default().join(" ");
    assert!(
        args.starts_with("init --proxy-uid 2102 --inbound-port 15006 --outbound-port 15001"),
        "{args}"
    );
    assert!(args.contains("--skip-inbound-ports 15000"), "{args}");
    assert!(args.contains("--skip-outbound-ports 5432"), "{args}");
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);

    // The app and its volumes are untouched; ours are added.
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(spec.containers[0].name, "catalog");
    let vols: Vec<String> = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(vols, ["kube-api-access-x7k2p", "mesh-ca", "mesh-token"]);
    let ann = pod.metadata.annotations.unwrap_or_default();
    assert_eq!(
        ann.get(INJECTED).map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        ann.get("mesh.io/proxy-cpu-limit").map(String::as_str),
        Some("500m")
    );
}

#[test]
fn injection_is_idempotent() {
    let (_, once) = patched(DEPLOYMENT_POD);
    let mut again: Value = serde_json::from_str(DEPLOYMENT_POD).unwrap();
    again["request"]["object"] = once.clone();
    let resp = review(again.to_string().as_bytes(), &cfg()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none(), "{resp}");
    assert_eq!(
        inject_pod(&once, &cfg()),
        Ok(Outcome::Skipped("already injected"))
    );
}

#[test]
fn bare_pod_without_ports_is_a_client_only_sidecar() {
    let (_, pod) = patched(BARE_POD);
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let spec = pod.spec.unwrap();
    let inits = spec.init_containers.unwrap();
    assert_eq!(inits.len(), 2);
    let proxy = &inits[1];
    assert_eq!(env_of(proxy, "MESH_APP_PORT"), None);
    assert_eq!(env_of(proxy, "MESH_SERVICE"), None, "no app label");
    assert!(
        inits[0]
            .args
            .clone()
            .unwrap_or_default()
            .contains(&"--no-inbound".to_string())
    );
    assert_eq!(spec.volumes.unwrap().len(), 2);
}

#[test]
fn opted_out_pod_and_other_objects_pass_unchanged() {
    let resp = review(OPTED_OUT.as_bytes(), &cfg()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());
    let mut other: Value = serde_json::from_str(BARE_POD).unwrap();
    other["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let resp = review(other.to_string().as_bytes(), &cfg()).unwrap();
    assert!(resp["response"].get("patch").is_none());
    let mut update: Value = serde_json::from_str(BARE_POD).unwrap();
    update["request"]["operation"] = "UPDATE".into();
    let resp = review(update.to_string().as_bytes(), &cfg()).unwrap();
    assert!(resp["response"].get("patch").is_none());
    let mut host: Value = serde_json::from_str(BARE_POD).unwrap();
    host["request"]["object"]["spec"]["hostNetwork"] = true.into();
    let resp = review(host.to_string().as_bytes(), &cfg()).unwrap();
    assert!(resp["response"].get("patch").is_none());
}

#[test]
fn bad_annotations_refuse_the_pod_with_the_reason() {
    for (key, value, says) in [
        ("mesh.io/app-port", "http", "not a port"),
        ("mesh.io/app-port", "70000", "not a port"),
        ("mesh.io/skip-outbound-ports", "80,x", "not a port"),
        ("mesh.io/skip-outbound-cidrs", "10.0.0.0/33", "not a CIDR"),
        ("mesh.io/proxy-memory-limit", "lots", "not a quantity"),
        ("mesh.io/proxy-cpu-request", ".5", "not a quantity"),
        ("mesh.io/app-protocol", "spdy", "not http1, http2 or detect"),
        ("mesh.io/opaque-ports", "5432,db", "not a port"),
    ] {
        let mut r: Value = serde_json::from_str(BARE_POD).unwrap();
        r["request"]["object"]["metadata"]["annotations"] = json!({ key: value });
        let resp = review(r.to_string().as_bytes(), &cfg()).unwrap();
        assert_eq!(resp["response"]["allowed"], false, "{key}={value}");
        let msg = resp["response"]["status"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(key) && msg.contains(says),
            "{key}={value}: {msg}"
        );
    }
    for q in ["100m", "1.5", "64Mi", "2Gi", "1"] {
        assert!(valid_quantity(q), "{q}");
    }
}

#[test]
fn malformed_reviews_are_refused_with_an_error() {
    for (body, says) in [
        ("", "bad JSON"),
        ("{not json", "bad JSON"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            "apiVersion",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
            "uid",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","kind":"Pod"},"operation":"CREATE"}}"#,
            "object",
        ),
    ] {
        let Err(MalformedReview(m)) = review(body.as_bytes(), &cfg()) else {
            panic!("{body:?} accepted");
        };
        assert!(m.contains(says), "{body:?}: {m}");
    }
}

#[test]
fn manifests_get_every_pod_template_injected() {
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v1}
    spec:
      containers:
        - name: web
          image: web:1
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {mesh.io/inject: disabled}
        spec:
          restartPolicy: Never
          containers: [{name: report, image: report:1}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}}
        spec:
          containers: [{name: db, image: db:1, ports: [{containerPort: 5432}]}]
"#;
    let (out, report) = inject_manifest(yaml, &cfg()).unwrap();
    assert_eq!(
        report.lines,
        [
            "Deployment/web: injected",
            "CronJob/report: skipped (opted out (mesh.io/inject: disabled))",
            "StatefulSet/db: injected",
        ]
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
    assert_eq!(docs.len(), 4);
    let deploy: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(docs[0].clone()).expect("a valid Deployment");
    let tpl = deploy.spec.unwrap().template.spec.unwrap();
    assert_eq!(tpl.init_containers.unwrap()[1].name, "mesh-proxy");
    assert_eq!(docs[1]["kind"], "Service");
    assert!(docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"].is_null());
    let sts: k8s_openapi::api::apps::v1::StatefulSet =
        serde_json::from_value(docs[3]["items"][0].clone()).expect("a valid StatefulSet");
    let proxy = &sts
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()[1];
    assert_eq!(env_of(proxy, "MESH_APP_PORT").as_deref(), Some("5432"));
    // Injecting the output again changes nothing.
    let (again, report) = inject_manifest(&out, &cfg()).unwrap();
    assert_eq!(again, out);
    assert!(
        report.lines.iter().all(|l| l.contains("skipped")),
        "{:?}",
        report.lines
    );
    assert!(inject_manifest("a: [unclosed", &cfg()).is_err());
}

#[test]
fn app_protocol_and_opaque_ports_reach_the_proxy() {
    let proxy_env = |r: &Value, name: &str| {
        let resp = review(r.to_string().as_bytes(), &cfg()).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(resp["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut pod = r["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        let pod: Pod = serde_json::from_value(pod).unwrap();
        let inits = pod.spec.unwrap().init_containers.unwrap();
        let proxy = inits.iter().find(|c| c.name == PROXY_CONTAINER).unwrap();
        env_of(proxy, name)
    };
    let base: Value = serde_json::from_str(DEPLOYMENT_POD).unwrap();
    let mut r = base.clone();
    r["request"]["object"]["metadata"]["annotations"] =
        json!({"mesh.io/app-protocol": "http2", "mesh.io/opaque-ports": "5432, 6380"});
    assert_eq!(proxy_env(&r, "MESH_APP_PROTOCOL").as_deref(), Some("http2"));
    assert_eq!(
        proxy_env(&r, "MESH_OPAQUE_PORTS").as_deref(),
        Some("5432,6380")
    );
    // Without the annotation, the app port's name says it (grpc-*, h2c-*: http2; http-*: http1).
    for (name, want) in [
        ("grpc-api", Some("http2")),
        ("http-web", Some("http1")),
        ("db", None),
    ] {
        let mut r = base.clone();
        let ports = &mut r["request"]["object"]["spec"]["containers"][0]["ports"][0];
        ports["name"] = json!(name);
        assert_eq!(
            proxy_env(&r, "MESH_APP_PROTOCOL").as_deref(),
            want,
            "{name}"
        );
    }
    assert_eq!(proxy_env(&base, "MESH_OPAQUE_PORTS"), None);
}

#[test]
fn pods_get_prometheus_scrape_annotations_for_the_proxy_unless_they_have_their_own() {
    let (_, pod) = patched(DEPLOYMENT_POD);
    let a = &pod["metadata"]["annotations"];
    assert_eq!(a[SCRAPE], "true");
    assert_eq!(a[SCRAPE_PORT], ADMIN_PORT.to_string());
    assert_eq!(a[SCRAPE_PATH], "/metrics");
    // Undone with the rest of the injection.
    let Ok(Outcome::Injected(back)) = uninject_pod(&pod) else {
        panic!("uninjected");
    };
    assert!(
        back["metadata"]["annotations"].get(SCRAPE).is_none(),
        "{back}"
    );

    // An app that is scraped itself keeps its own annotations.
    let mut own: Value = serde_json::from_str(DEPLOYMENT_POD).unwrap();
    own["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({SCRAPE: "true", SCRAPE_PORT: "9090"});
    let (_, pod) = patched(&own.to_string());
    let a = &pod["metadata"]["annotations"];
    assert_eq!(
        (a[SCRAPE_PORT].as_str(), a.get(SCRAPE_PATH)),
        (Some("9090"), None)
    );
    let Ok(Outcome::Injected(back)) = uninject_pod(&pod) else {
        panic!("uninjected");
    };
    assert_eq!(back["metadata"]["annotations"][SCRAPE_PORT], "9090");
}

#[test]
fn the_shipped_scrape_configs_name_what_the_injector_sets() {
    let monitor = include_str!("../../deploy/observability/podmonitor.yaml");
    assert!(
        monitor.contains(&format!("- port: {ADMIN_PORT_NAME}")),
        "{monitor}"
    );
    let job = include_str!("../../deploy/observability/prometheus-kubernetes.yaml");
    for a in [SCRAPE, SCRAPE_PORT, SCRAPE_PATH] {
        // Prometheus's meta label for an annotation: non-alphanumerics become `_`.
        let meta = a.replace(['.', '/'], "_");
        assert!(
            job.contains(&format!("__meta_kubernetes_pod_annotation_{meta}")),
            "{a}"
        );
    }
}
