//! Kubernetes, tested at its real interfaces (no API server runs here): the injection webhook
//! receives real `admission.k8s.io/v1` AdmissionReviews over HTTPS, verified the way the API
//! server verifies it (the mesh CA bundle as `caBundle`, the Service's DNS name), and
//! `meshctl inject -f` rewrites a manifest offline.

use anyhow::Context;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use mesh_tests::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/admission");
/// The name in the webhook configuration's `clientConfig.service`.
const WEBHOOK_NAME: &str = "mesh-control-plane.mesh-system.svc";

fn fixture(name: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(format!("{FIXTURES}/{name}"))?)
}

/// One HTTPS request over a fresh connection, verifying the server as `WEBHOOK_NAME` against
/// `ca_pem` (HTTP/1.1, as offered by ALPN).
async fn https(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, String)> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(WEBHOOK_NAME.try_into()?, tcp)
        .await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://{WEBHOOK_NAME}{path}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    use http_body_util::BodyExt;
    let text = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).to_string();
    Ok((status, text))
}

/// The review's answer and, if it carries a patch, the pod with the patch applied.
async fn admit(
    mesh: &Mesh,
    review: &serde_json::Value,
) -> anyhow::Result<(serde_json::Value, Option<serde_json::Value>)> {
    let addr = mesh
        .webhook
        .ok_or_else(|| anyhow::anyhow!("no webhook port"))?;
    let (status, text) = https(
        addr,
        &mesh.ca_pem()?,
        "POST",
        "/inject",
        review.to_string().into_bytes(),
    )
    .await?;
    anyhow::ensure!(status == 200, "{status}: {text}");
    let resp: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(resp["response"]["uid"], review["request"]["uid"]);
    let Some(p) = resp["response"]["patch"].as_str() else {
        return Ok((resp, None));
    };
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch: json_patch::Patch =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p)?)?;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch)?;
    Ok((resp, Some(pod)))
}

/// Test 1 of the Kubernetes issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_pods_from_admission_reviews_over_https() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(&[
        "--webhook-addr",
        "127.0.0.1:0",
        "--server-name",
        WEBHOOK_NAME,
        "--proxy-image",
        "registry.example/mesh-proxy:test",
    ])
    .await?;

    // A Deployment's pod (as the ReplicaSet controller creates it).
    let review: serde_json::Value = serde_json::from_str(&fixture("deployment-pod.json")?)?;
    let (resp, pod) = admit(&mesh, &review).await?;
    assert_eq!(resp["response"]["allowed"], true);
    let injected = pod.ok_or_else(|| anyhow::anyhow!("no patch: {resp}"))?;
    let typed: Pod = serde_json::from_value(injected.clone())?;
    let spec = typed.spec.ok_or_else(|| anyhow::anyhow!("no spec"))?;
    let inits = spec.init_containers.unwrap_or_default();
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["mesh-init", "mesh-proxy", "migrate"]);
    let proxy = &inits[1];
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    assert_eq!(
        proxy.image.as_deref(),
        Some("registry.example/mesh-proxy:test")
    );
    let probe = proxy
        .startup_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(probe.and_then(|g| g.path.as_deref()), Some("/ready"));
    assert_eq!(
        inits[0]
            .args
            .as_ref()
            .and_then(|a| a.first())
            .map(String::as_str),
        Some("init")
    );
    assert_eq!(spec.containers.len(), 1, "the app container is unchanged");

    // The injected pod, sent again: no patch.
    let mut again = review.clone();
    again["request"]["uid"] = "second".into();
    again["request"]["object"] = injected;
    let (resp, pod) = admit(&mesh, &again).await?;
    assert!(
        pod.is_none() && resp["response"]["allowed"] == true,
        "{resp}"
    );

    // A bare Pod: injected as a client-only sidecar.
    let bare: serde_json::Value = serde_json::from_str(&fixture("bare-pod.json")?)?;
    let (_, pod) = admit(&mesh, &bare).await?;
    let typed: Pod =
        serde_json::from_value(pod.ok_or_else(|| anyhow::anyhow!("bare pod not injected"))?)?;
    assert_eq!(
        typed.spec.and_then(|s| s.init_containers).map(|i| i.len()),
        Some(2)
    );

    // Opted out: allowed, untouched.
    let out: serde_json::Value = serde_json::from_str(&fixture("opted-out-pod.json")?)?;
    let (resp, pod) = admit(&mesh, &out).await?;
    assert!(
        pod.is_none() && resp["response"]["allowed"] == true,
        "{resp}"
    );

    // A bad annotation: refused, with the reason.
    let mut bad = bare.clone();
    bad["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({"mesh.io/app-port": "web"});
    let (resp, pod) = admit(&mesh, &bad).await?;
    assert!(pod.is_none());
    assert_eq!(resp["response"]["allowed"], false);
    let msg = resp["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("mesh.io/app-port"), "{msg}");

    // Malformed bodies: a clean 400, and the webhook keeps serving.
    let addr = mesh
        .webhook
        .ok_or_else(|| anyhow::anyhow!("no webhook port"))?;
    let ca = mesh.ca_pem()?;
    let (status, text) = https(addr, &ca, "POST", "/inject", b"{\"kind\":".to_vec()).await?;
    assert_eq!(status, 400);
    assert!(
        text.contains("not an admission.k8s.io/v1 AdmissionReview"),
        "{text}"
    );
    let (status, _) = https(addr, &ca, "POST", "/inject", vec![b'x'; 5 * 1024 * 1024]).await?;
    assert_eq!(status, 413);
    let (status, _) = https(addr, &ca, "GET", "/inject", vec![]).await?;
    assert_eq!(status, 405);
    let (_, pod) = admit(&mesh, &review).await?;
    assert!(pod.is_some(), "still injecting after bad requests");
    Ok(())
}

async fn meshctl_inject(path: &std::path::Path) -> anyhow::Result<std::process::Output> {
    Ok(tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["inject", "-f"])
        .arg(path)
        .output()
        .await?)
}

/// `meshctl inject -f`: Deployments, StatefulSets and Jobs get the sidecar; the rest passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_inject_rewrites_manifests_offline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: catalog, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: catalog}}
  template:
    metadata: {labels: {app: catalog, version: v1}}
    spec:
      containers:
        - {name: catalog, image: "catalog:1", ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: fast}
---
apiVersion: batch/v1
kind: Job
metadata: {name: load}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: load, image: "load:1"}]
"#,
    )?;
    let out = meshctl_inject(&path).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Deployment/catalog: injected") && stderr.contains("Job/load: injected"),
        "{stderr}"
    );
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&String::from_utf8(out.stdout)?)?;
    assert_eq!(docs.len(), 3);
    let deploy: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(docs[0].clone())?;
    let tpl = deploy
        .spec
        .and_then(|s| s.template.spec)
        .ok_or_else(|| anyhow::anyhow!("no template"))?;
    let inits = tpl.init_containers.unwrap_or_default();
    assert_eq!(
        inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["mesh-init", "mesh-proxy"]
    );
    assert_eq!(docs[1]["data"]["mode"], "fast");
    let job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(docs[2].clone())?;
    assert!(
        job.spec
            .and_then(|s| s.template.spec)
            .is_some_and(|s| s.init_containers.is_some_and(|i| i.len() == 2))
    );

    // A manifest with a bad annotation: refused with the document and the reason; exit 1.
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {mesh.io/proxy-memory-limit: lots}}\nspec: {containers: [{name: a, image: a}]}\n",
    )?;
    let out = meshctl_inject(&path).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("document 1 (Pod p)") && stderr.contains("not a quantity"),
        "{stderr}"
    );
    Ok(())
}

fn pod(name: &str, ip: &str, version: &str, injected: bool) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if injected {
        annotations.insert("mesh.io/injected".into(), "0.1.0".into());
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": "catalog", "version": version}, "annotations": annotations},
        "spec": {"serviceAccountName": "catalog", "containers": [{"name": "catalog", "image": "catalog:1"}]},
        "status": {"podIP": ip, "phase": "Running"}
    })
}

fn slice(endpoints: &[(&str, &str, bool)]) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(pod, ip, ready)| serde_json::json!({
            "addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod, "uid": format!("uid-{pod}")}
        }))
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "catalog-x7k2p", "namespace": "shop", "uid": "slice-1",
                     "labels": {"kubernetes.io/service-name": "catalog", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

/// The catalog endpoints in a proxy's config: (id, address, version, ready).
fn catalog_in_dump(d: &serde_json::Value) -> Vec<(String, String, String, bool)> {
    let mut v: Vec<_> = d["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "catalog.shop")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["address"].as_str().unwrap_or_default().to_string(),
                e["version"].as_str().unwrap_or_default().to_string(),
                e["ready"] == true,
            )
        })
        .collect();
    v.sort();
    v
}

/// Test 3 of the Kubernetes issue: the control plane watches Pods and EndpointSlices of an
/// API server (here a stand-in serving recorded objects and watch events over HTTP); a
/// proxy's endpoints follow each change — not ready, added, removed — within a second. Only
/// injected pods count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_kubernetes_endpointslices() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(vec![
        (Kind::Pod, pod("catalog-a", "10.1.0.11", "v1", true)),
        (Kind::Pod, pod("legacy", "10.1.0.99", "v1", false)),
        (
            Kind::EndpointSlice,
            slice(&[
                ("catalog-a", "10.1.0.11", true),
                ("legacy", "10.1.0.99", true),
            ]),
        ),
    ])
    .await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let c = mesh.client("web").await?;
    // The first request subscribes the proxy to catalog (its answer does not matter: the
    // addresses are not reachable from here).
    let _ = get(&h1_client(c.outbound), "http://catalog.shop/").await;
    let a = |ready| {
        (
            "catalog-a.shop".to_string(),
            "10.1.0.11:15006".to_string(),
            "v1".to_string(),
            ready,
        )
    };
    let b = (
        "catalog-b.shop".to_string(),
        "10.1.0.12:15006".to_string(),
        "v2".to_string(),
        true,
    );
    wait_config(c.admin, Duration::from_secs(5), |d| {
        catalog_in_dump(d) == vec![a(true)]
    })
    .await?;
    let identity = mesh
        .meshctl(&["-n", "shop", "-o", "json", "services"])
        .await?;
    assert!(
        identity.contains("spiffe://mesh.local/ns/shop/sa/catalog"),
        "{identity}"
    );

    let within_a_second = |want: Vec<(String, String, String, bool)>| {
        let admin = c.admin;
        async move {
            let t = tokio::time::Instant::now();
            wait_config(admin, Duration::from_secs(5), |d| {
                catalog_in_dump(d) == want
            })
            .await?;
            let took = t.elapsed();
            anyhow::ensure!(took < Duration::from_secs(1), "took {took:?}");
            anyhow::Ok(())
        }
    };
    // Not ready.
    api.apply(
        Kind::EndpointSlice,
        "MODIFIED",
        slice(&[
            ("catalog-a", "10.1.0.11", false),
            ("legacy", "10.1.0.99", true),
        ]),
    );
    within_a_second(vec![a(false)]).await?;
    // A second pod (v2) joins, the first is ready again.
    api.apply(
        Kind::Pod,
        "ADDED",
        pod("catalog-b", "10.1.0.12", "v2", true),
    );
    api.apply(
        Kind::EndpointSlice,
        "MODIFIED",
        slice(&[
            ("catalog-a", "10.1.0.11", true),
            ("catalog-b", "10.1.0.12", true),
        ]),
    );
    within_a_second(vec![a(true), b.clone()]).await?;
    // The first goes away.
    api.apply(
        Kind::EndpointSlice,
        "MODIFIED",
        slice(&[("catalog-b", "10.1.0.12", true)]),
    );
    within_a_second(vec![b]).await?;
    // The slice is deleted: no endpoints.
    api.apply(
        Kind::EndpointSlice,
        "DELETED",
        slice(&[("catalog-b", "10.1.0.12", true)]),
    );
    within_a_second(vec![]).await?;
    Ok(())
}

/// A client-only proxy of ServiceAccount `ns/sa` with nothing but its token in a file, as an
/// injected one; returns its readiness line.
async fn sa_proxy(
    mesh: &mut Mesh,
    ns: &str,
    sa: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let dir = mesh.dir.path().to_path_buf();
    let token_file = dir.join(format!("{ns}-{sa}-token"));
    std::fs::write(&token_file, token)?;
    let mut cmd = tokio::process::Command::new(bin_dir().join("mesh-proxy"));
    cmd.args([
        "--control-plane",
        &format!("https://{}", mesh.grpc),
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .arg("--ca-file")
    .arg(mesh.data_dir().join("ca/bundle.pem"))
    .arg("--token-file")
    .arg(token_file)
    .stderr(std::fs::File::create(
        dir.join(format!("{ns}-{sa}-proxy.log")),
    )?);
    let (p, ready) = process::Process::spawn_ready(sa, cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    Ok(ready)
}

/// Identity from Kubernetes: a projected ServiceAccount token, checked by the API server's
/// TokenReview (audience `mesh`), gets a certificate for that ServiceAccount's identity, and
/// for no other; an unknown token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serviceaccount_tokens_are_checked_by_tokenreview() -> anyhow::Result<()> {
    use mesh_proto::v1 as pb;
    use mesh_tests::kube_api::FakeKubeApi;
    let api = FakeKubeApi::start(vec![]).await?;
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6c2hvcDp3ZWIifQ.c2ln";
    api.add_token(jwt, "shop", "web");
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;

    // A proxy with nothing but the token file, as injected.
    let ready = sa_proxy(&mut mesh, "shop", "web", jwt).await?;
    assert_eq!(
        ready["identity"], "spiffe://mesh.local/ns/shop/sa/web",
        "{ready}"
    );

    let mut id = identity_client(&mesh).await?;
    // The token proves shop/web, not shop/admin.
    let (_, other) = csr("spiffe://mesh.local/ns/shop/sa/admin")?;
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: other,
            token: jwt.into(),
        })
        .await
        .expect_err("another identity");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A token the API server does not know.
    let (_, mine) = csr("spiffe://mesh.local/ns/shop/sa/web")?;
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: mine,
            token: "eyJ.unknown.token".into(),
        })
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("refused by the API server"), "{e:?}");
    Ok(())
}

/// The trust bundle is written as ConfigMap `mesh-ca-bundle` (which injected pods mount) into
/// every namespace, new ones included, and rewritten when a root rotation changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_configmap_is_in_every_namespace() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let ns = |name: &str| serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}")}});
    let api = FakeKubeApi::start(vec![
        (Kind::Namespace, ns("default")),
        (Kind::Namespace, ns("shop")),
    ])
    .await?;
    let mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let bundle_in = |name: &str| {
        api.config_map(name, "mesh-ca-bundle")
            .and_then(|c| c["data"]["bundle.pem"].as_str().map(String::from))
    };
    let wait_for = |names: &'static [&'static str], want: String| {
        let bundle_in = &bundle_in;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while names
                .iter()
                .any(|n| bundle_in(n).as_deref() != Some(want.as_str()))
            {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "ConfigMaps not written: {:?}",
                    names.iter().map(|n| bundle_in(n)).collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_for(&["default", "shop"], mesh.ca_pem()?).await?;
    api.apply(Kind::Namespace, "ADDED", ns("payments"));
    wait_for(&["default", "shop", "payments"], mesh.ca_pem()?).await?;
    // A rotation's first step puts two roots in the bundle: every ConfigMap follows.
    mesh.meshctl(&["ca", "rotate", "--step", "prepare"]).await?;
    let two = mesh.ca_pem()?;
    assert_eq!(two.matches("BEGIN CERTIFICATE").count(), 2);
    wait_for(&["default", "shop", "payments"], two).await?;
    Ok(())
}

/// The webhook configuration's `caBundle` follows the trust bundle, so the API server keeps
/// trusting the injection webhook across a root rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_ca_bundle_follows_the_trust_bundle() -> anyhow::Result<()> {
    use mesh_tests::kube_api::FakeKubeApi;
    let api = FakeKubeApi::start(vec![]).await?;
    let hook = |name: &str| {
        serde_json::json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "mesh-control-plane", "namespace": "mesh-system", "path": "/inject", "port": 443}}})
    };
    api.put_webhook_configuration(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mesh-sidecar-injector"},
        "webhooks": [hook("namespace.inject.mesh.io"), hook("object.inject.mesh.io")]
    }));
    let mesh = Mesh::start_with(&["--kube-api", &api.url, "--webhook-addr", "127.0.0.1:0"]).await?;
    let bundles = || -> Vec<String> {
        api.webhook_configuration("mesh-sidecar-injector")
            .and_then(|c| c["webhooks"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let wait_for = |pem: String| {
        let bundles = &bundles;
        async move {
            use base64::Engine;
            let want = base64::engine::general_purpose::STANDARD.encode(pem);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while bundles() != [want.clone(), want.clone()] {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "caBundle not set: {:?}",
                    bundles()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_for(mesh.ca_pem()?).await?;
    mesh.meshctl(&["ca", "rotate", "--step", "prepare"]).await?;
    wait_for(mesh.ca_pem()?).await?;
    Ok(())
}

/// Test 4: two control-plane replicas against the API server elect one leader with the
/// `coordination.k8s.io` Lease `mesh-system/mesh-control-plane`: exactly one leads, and it is
/// the Lease's holder. SIGKILL the leader: the other takes the Lease over once it has gone
/// unrenewed for its duration (3 s here; not sooner), and leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_leader_with_a_lease() -> anyhow::Result<()> {
    use mesh_tests::kube_api::FakeKubeApi;
    let api = FakeKubeApi::start(vec![]).await?;
    let replica = |id: &'static str| {
        let url = api.url.clone();
        async move {
            Mesh::start_with(&[
                "--kube-api",
                &url,
                "--replica-id",
                id,
                "--leader-lease-secs",
                "3",
                "--namespace",
                "mesh-system",
            ])
            .await
        }
    };
    let mut meshes = [replica("cp-a").await?, replica("cp-b").await?];
    let ids = ["cp-a", "cp-b"];
    let leader = one_leader(&[&meshes[0], &meshes[1]], Duration::from_secs(10)).await?;
    let holder = |api: &FakeKubeApi| {
        api.lease("mesh-system", "mesh-control-plane")
            .map(|l| l["spec"].clone())
            .unwrap_or_default()
    };
    let spec = holder(&api);
    assert_eq!(spec["holderIdentity"], ids[leader], "{spec}");
    assert_eq!(spec["leaseDurationSeconds"], 3, "{spec}");

    meshes[leader].kill_control_plane().await;
    let killed = tokio::time::Instant::now();
    let other = 1 - leader;
    let took = loop {
        if meshes[other].cp_gauge("leader").await? == 1 {
            break killed.elapsed();
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(15),
            "{} did not take over: {}",
            ids[other],
            holder(&api)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spec = holder(&api);
    assert_eq!(spec["holderIdentity"], ids[other], "{spec}");
    assert_eq!(spec["leaseTransitions"], 1, "{spec}");
    // The old holder renewed at most a third of the lease before it died.
    assert!(
        took >= Duration::from_secs(2),
        "taken over {took:?} after the kill, before the lease could expire"
    );
    Ok(())
}

/// A Service of the shop namespace: ClusterIP 10.96.0.20, port 80 to the endpoints' port named
/// `http`, and `extra` to a numbered target port.
fn service(extra: (i32, i32)) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "catalog", "namespace": "shop", "uid": "svc-1"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "extra", "port": extra.0, "targetPort": extra.1, "protocol": "TCP"}]}
    })
}

/// The catalog's virtual IPs and (port, target port)s in a proxy's config.
fn catalog_vips(d: &serde_json::Value) -> (Vec<String>, Vec<(u64, u64)>) {
    let s = d["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "catalog.shop")
        .cloned()
        .unwrap_or_default();
    let ips = s["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let ports = s["vip_ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["port"].as_u64().unwrap_or(0),
                p["target_port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    (ips, ports)
}

/// Services give mesh services their ClusterIPs: the proxies learn each virtual IP with its
/// ports and the app port each reaches (a named targetPort resolved through the EndpointSlice),
/// follow a change of the ports, and drop them when the Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cluster_ips_reach_the_proxies() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(vec![
        (Kind::Pod, pod("catalog-a", "10.1.0.11", "v1", true)),
        (
            Kind::EndpointSlice,
            slice(&[("catalog-a", "10.1.0.11", true)]),
        ),
        (Kind::Service, service((9090, 9091))),
    ])
    .await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let c = mesh.client("web").await?;
    let _ = get(&h1_client(c.outbound), "http://catalog.shop/").await;
    let vip = vec!["10.96.0.20".to_string()];
    wait_config(c.admin, Duration::from_secs(5), |d| {
        catalog_vips(d) == (vip.clone(), vec![(80, 8080), (9090, 9091)])
    })
    .await?;
    api.apply(Kind::Service, "MODIFIED", service((7000, 7001)));
    wait_config(c.admin, Duration::from_secs(2), |d| {
        catalog_vips(d) == (vip.clone(), vec![(80, 8080), (7000, 7001)])
    })
    .await?;
    api.apply(Kind::Service, "DELETED", service((7000, 7001)));
    wait_config(c.admin, Duration::from_secs(2), |d| {
        catalog_vips(d) == (vec![], vec![])
    })
    .await?;
    Ok(())
}

/// A MeshRoute object as `kubectl apply` would write it.
fn mesh_route(backends: &[(&str, u32)]) -> serde_json::Value {
    let b: Vec<_> = backends
        .iter()
        .map(|(v, w)| serde_json::json!({"version": v, "weight": w}))
        .collect();
    serde_json::json!({
        "apiVersion": "mesh.io/v1alpha1", "kind": "MeshRoute",
        "metadata": {"name": "catalog", "namespace": "shop"},
        "spec": {"service": "catalog", "backends": b}
    })
}

/// Catalog v1 (and v2 when `two`) as injected pods of one EndpointSlice on the stand-in API
/// server, a control plane on it, and a client proxy that has asked for catalog and sees its
/// endpoints.
async fn catalog_on_kubernetes(
    two: bool,
) -> anyhow::Result<(mesh_tests::kube_api::FakeKubeApi, Mesh, Sidecar)> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let mut objects = vec![(Kind::Pod, pod("catalog-a", "10.1.0.11", "v1", true))];
    let mut eps = vec![("catalog-a", "10.1.0.11", true)];
    if two {
        objects.push((Kind::Pod, pod("catalog-b", "10.1.0.12", "v2", true)));
        eps.push(("catalog-b", "10.1.0.12", true));
    }
    objects.push((Kind::EndpointSlice, slice(&eps)));
    let api = FakeKubeApi::start(objects).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let c = mesh.client("web").await?;
    let _ = get(&h1_client(c.outbound), "http://catalog.shop/").await;
    wait_config(c.admin, Duration::from_secs(5), |d| {
        catalog_in_dump(d).len() == eps.len()
    })
    .await?;
    Ok((api, mesh, c))
}

/// Polls the catalog MeshRoute until `pred` holds of its status (bounded); returns the object.
async fn route_status_within(
    api: &mesh_tests::kube_api::FakeKubeApi,
    pred: &dyn Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = api
            .object(mesh_tests::kube_api::Kind::MeshRoute, "shop", "catalog")
            .unwrap_or_default();
        if pred(&o["status"]) {
            return Ok(o);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "MeshRoute status is {}",
            o["status"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Routes as Kubernetes objects: `meshctl route set` writes the service's MeshRoute; a
/// MeshRoute applied with kubectl becomes the route the proxies use, its status saying so
/// (revision, proxies that applied it); one naming an unknown version is refused in its
/// status, left as written, and changes nothing; deleting it resets the service's route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_meshroute_objects_both_ways() -> anyhow::Result<()> {
    use mesh_tests::kube_api::Kind;
    let (api, mesh, c) = catalog_on_kubernetes(true).await?;
    let weights = |v: &serde_json::Value| -> Vec<(String, u64)> {
        v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["version"].as_str().unwrap_or("").to_string(),
                    b["weight"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let want = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
        pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect()
    };
    let object_within = |pairs: Vec<(String, u64)>| {
        let api = &api;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let spec = api
                    .object(Kind::MeshRoute, "shop", "catalog")
                    .map(|o| o["spec"].clone())
                    .unwrap_or_default();
                if weights(&spec) == pairs && spec["service"] == "catalog" {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "MeshRoute is {spec}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // meshctl → the object.
    mesh.meshctl(&[
        "-n",
        "shop",
        "route",
        "set",
        "catalog",
        "--weights",
        "v1=80,v2=20",
    ])
    .await?;
    object_within(want(&[("v1", 80), ("v2", 20)])).await?;

    // kubectl apply → the route, in the registry and at the proxy.
    api.apply(
        Kind::MeshRoute,
        "MODIFIED",
        mesh_route(&[("v1", 10), ("v2", 90)]),
    );
    wait_config(c.admin, Duration::from_secs(5), |d| {
        route_in_dump(d, "catalog.shop") == want(&[("v1", 10), ("v2", 90)])
    })
    .await?;
    let got = mesh
        .meshctl(&["-n", "shop", "-o", "json", "route", "get", "catalog"])
        .await?;
    assert!(got.contains("90"), "{got}");

    // Accepted: the status says so, with the revision in force and the proxies that applied
    // it (the client, subscribed to catalog).
    let accepted = |s: &serde_json::Value| {
        s["conditions"][0]["type"] == "Accepted"
            && s["conditions"][0]["status"] == "True"
            && s["appliedRevision"].as_u64().is_some_and(|r| r > 0)
            && s["proxiesApplied"] == "1/1"
    };
    route_status_within(&api, &accepted).await?;

    // An unknown version is refused: the route stays, and the object stays as written, its
    // status saying why.
    api.apply(Kind::MeshRoute, "MODIFIED", mesh_route(&[("v9", 100)]));
    let refused = route_status_within(&api, &|s| {
        s["conditions"][0]["status"] == "False"
            && s["conditions"][0]["reason"] == "Invalid"
            && s["conditions"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown version \"v9\""))
    })
    .await?;
    assert_eq!(
        weights(&refused["spec"]),
        want(&[("v9", 100)]),
        "the user's object is not rewritten"
    );
    let dump = admin_get(c.admin, "/config_dump").await?;
    assert_eq!(
        route_in_dump(&dump.json, "catalog.shop"),
        want(&[("v1", 10), ("v2", 90)])
    );

    // meshctl again: the object follows.
    mesh.meshctl(&[
        "-n",
        "shop",
        "route",
        "set",
        "catalog",
        "--weights",
        "v1=50,v2=50",
    ])
    .await?;
    object_within(want(&[("v1", 50), ("v2", 50)])).await?;

    // kubectl delete → the default route (no weights).
    api.apply(
        Kind::MeshRoute,
        "DELETED",
        mesh_route(&[("v1", 50), ("v2", 50)]),
    );
    wait_config(c.admin, Duration::from_secs(5), |d| {
        route_in_dump(d, "catalog.shop").is_empty()
    })
    .await?;
    Ok(())
}

/// Policies are objects too: a MeshPolicy applied with kubectl becomes the service's
/// resilience policy at the proxies (hedging, adaptive concurrency and global limits included), and `meshctl authz set` writes the service's
/// MeshAuthorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_authorizations_are_objects_too() -> anyhow::Result<()> {
    use mesh_tests::kube_api::Kind;
    let (api, mesh, c) = catalog_on_kubernetes(false).await?;

    api.apply(
        Kind::MeshPolicy,
        "ADDED",
        serde_json::json!({
            "apiVersion": "mesh.io/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": "catalog", "namespace": "shop"},
            "spec": {
                "service": "catalog",
                "timeouts": {"request_ms": 1234},
                "hedge": {"delay_ms": 40},
                "adaptive_concurrency": {"max_limit": 64},
                "rate_limit": {"global": {"per_second": 500}, "global_per_caller": true}
            }
        }),
    );
    // Hedging, adaptive concurrency and the global limit are fields of the same object.
    wait_config(c.admin, Duration::from_secs(5), |d| {
        d["services"].as_array().into_iter().flatten().any(|s| {
            s["name"] == "catalog.shop"
                && s["policy"].as_str().is_some_and(|p| {
                    p.contains("1.234s")
                        && p.contains("hedge: Some(HedgeConfig { delay: Some(40ms)")
                        && p.contains("max_limit: 64")
                        && p.contains("per_second: 500, burst: 50 }, per_caller: true")
                })
        })
    })
    .await?;

    mesh.meshctl(&[
        "-n",
        "shop",
        "authz",
        "set",
        "catalog",
        "--rule",
        "allow from=ns/shop/*",
    ])
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let spec = api
            .object(Kind::MeshAuthorization, "shop", "catalog")
            .map(|o| o["spec"].clone())
            .unwrap_or_default();
        if spec["service"] == "catalog" && spec.to_string().contains("ns/shop/*") {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "MeshAuthorization is {spec}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The HA control plane on Kubernetes alone: two replicas keep their state in ConfigMap
/// `mesh-system/mesh-state` through the API server. A route set on replica A reaches a proxy
/// connected to replica B in under a second; writes racing on both replicas all land (a
/// replace with a stale resourceVersion is refused and computed again); one replica leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_through_the_kubernetes_api() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(vec![
        (Kind::Pod, pod("catalog-a", "10.1.0.11", "v1", true)),
        (Kind::Pod, pod("catalog-b", "10.1.0.12", "v2", true)),
        (
            Kind::EndpointSlice,
            slice(&[
                ("catalog-a", "10.1.0.11", true),
                ("catalog-b", "10.1.0.12", true),
            ]),
        ),
    ])
    .await?;
    let dir = tempfile::tempdir()?;
    let ca = shared_ca(dir.path())?;
    let extra = ["--kube-api", api.url.as_str(), "--namespace", "mesh-system"];
    let replica = |id: &'static str| Mesh::replica("kubernetes", &ca, id, &extra);
    let a = replica("cp-a").await?;
    let mut b = replica("cp-b").await?;
    let c = b.client("web").await?;
    let _ = get(&h1_client(c.outbound), "http://catalog.shop/").await;
    wait_config(c.admin, Duration::from_secs(5), |d| {
        catalog_in_dump(d).len() == 2
    })
    .await?;
    // Replica A learns the service through its own watch of the shared state: B's proxy
    // having it says nothing of A yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a
        .meshctl(&["-n", "shop", "route", "get", "catalog"])
        .await
        .is_err()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "replica A never learned the catalog service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (v1, v2) in [(100u64, 0u64), (30, 70)] {
        a.meshctl(&[
            "-n",
            "shop",
            "route",
            "set",
            "catalog",
            "--weights",
            &format!("v1={v1},v2={v2}"),
        ])
        .await?;
        let want = vec![("v1".to_string(), v1), ("v2".to_string(), v2)];
        let took = wait_config(c.admin, Duration::from_secs(1), |d| {
            route_in_dump(d, "catalog.shop") == want
        })
        .await?;
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    // Writes racing on both replicas: every one lands.
    let mut racing = Vec::new();
    for i in 0..5 {
        racing.push(a.meshctl_spawn(&[
            "token",
            "create",
            "--identity",
            &format!("default/a{i}"),
        ])?);
        racing.push(b.meshctl_spawn(&[
            "token",
            "create",
            "--identity",
            &format!("default/b{i}"),
        ])?);
    }
    for child in racing {
        let out = child.wait_with_output().await?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tokens = b.meshctl(&["token", "list"]).await?;
    for i in 0..5 {
        for r in ["a", "b"] {
            assert!(
                tokens.contains(&format!("default/sa/{r}{i}")),
                "{r}{i} missing: {tokens}"
            );
        }
    }
    let state = api
        .object(Kind::ConfigMap, "mesh-system", "mesh-state")
        .expect("state ConfigMap");
    assert!(
        state["data"]["state.json"]
            .as_str()
            .is_some_and(|s| s.contains("routes/catalog"))
    );
    one_leader(&[&a, &b], Duration::from_secs(10)).await?;
    Ok(())
}

/// Issue 29 finding 3 on Kubernetes: once a ServiceAccount is deleted, the CA refuses to renew
/// the certificates issued against its token; another ServiceAccount's proxy keeps renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_serviceaccount_is_no_longer_renewed() -> anyhow::Result<()> {
    use mesh_tests::kube_api::FakeKubeApi;
    let api = FakeKubeApi::start(vec![]).await?;
    // 30 s certificates: the renewals come at about 21 s.
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url, "--cert-ttl-secs", "30"]).await?;
    let mut admins = Vec::new();
    for sa in ["web", "api"] {
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{sa}.c2ln");
        api.add_token(&jwt, "shop", sa);
        let ready = sa_proxy(&mut mesh, "shop", sa, &jwt).await?;
        let admin: std::net::SocketAddr = ready["admin"].as_str().unwrap_or_default().parse()?;
        admins.push(admin);
    }
    let expiry = |admin| async move {
        let d = admin_get(admin, "/config_dump").await?.json;
        anyhow::Ok(
            d["certificate"]["expires_at_unix"]
                .as_i64()
                .unwrap_or_default(),
        )
    };
    let api_first = expiry(admins[1]).await?;
    api.delete_service_account("shop", "web");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let refused = mesh
            .cp_log()
            .contains("renewal refused: ServiceAccount shop/web no longer exists");
        let api_renewed = expiry(admins[1]).await? > api_first;
        if refused && api_renewed {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "web refused: {refused}, api renewed: {api_renewed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The ids of catalog's endpoints, sorted, as meshctl lists them.
async fn catalog_endpoint_ids(mesh: &Mesh) -> anyhow::Result<Vec<String>> {
    let out = match mesh
        .meshctl(&[
            "-n",
            "shop",
            "-o",
            "json",
            "endpoints",
            "--service",
            "catalog",
        ])
        .await
    {
        Err(e) if e.to_string().contains("unknown service") => return Ok(Vec::new()),
        r => r?,
    };
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut ids: Vec<String> = v["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    Ok(ids)
}

/// One endpoint per pod: an injected pod's proxy registers itself (node id
/// `$(POD_NAME).$(NAMESPACE)`) while the EndpointSlice reconciler lists the same pod; the
/// service has one endpoint, under that id, through slice changes and re-registrations, and it
/// goes when the pod leaves the slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_one_endpoint_whether_its_proxy_or_its_endpointslice_says_so() -> anyhow::Result<()>
{
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(vec![
        (Kind::Pod, pod("catalog-a", "127.0.0.1", "v1", true)),
        (
            Kind::EndpointSlice,
            slice(&[("catalog-a", "127.0.0.1", true)]),
        ),
    ])
    .await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    until(
        Duration::from_secs(5),
        "the slice's endpoint never came",
        || async { Ok(catalog_endpoint_ids(&mesh).await? == ["catalog-a.shop"]) },
    )
    .await?;

    // The pod's proxy, as injected: node id POD.NS, identity shop/catalog, its app behind it.
    let app = mesh.app("catalog", "v1").await?;
    let token = mesh
        .meshctl(&["token", "create", "--identity", "shop/catalog"])
        .await?;
    let mut cmd = tokio::process::Command::new(bin_dir().join("mesh-proxy"));
    cmd.args(["--control-plane", &format!("https://{}", mesh.grpc)])
        .args(["--namespace", "shop", "--service-account", "catalog"])
        .args(["--service", "catalog", "--service-version", "v1"])
        .args([
            "--node-id",
            "catalog-a.shop",
            "--app-port",
            &app.port().to_string(),
        ])
        .args([
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0"])
        .arg("--ca-file")
        .arg(mesh.data_dir().join("ca/bundle.pem"))
        .env("MESH_TOKEN", token.trim())
        .stderr(mesh.log("catalog-a-proxy")?);
    let (p, ready) = process::Process::spawn_ready("catalog-a", cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    let inbound = ready["inbound"].as_str().context("inbound")?.to_string();

    // Registered by its proxy: still one endpoint, at the proxy's address, and it stays one
    // through slice updates (not ready, ready again).
    until(
        Duration::from_secs(5),
        "the proxy's registration",
        || async {
            let out = mesh
                .meshctl(&[
                    "-n",
                    "shop",
                    "-o",
                    "json",
                    "endpoints",
                    "--service",
                    "catalog",
                ])
                .await?;
            Ok(out.contains(&inbound))
        },
    )
    .await?;
    // A negative claim needs a window: each update is watched for 300 ms (the reconciler
    // acts on a watch event within milliseconds).
    for ready in [false, true, true] {
        api.apply(
            Kind::EndpointSlice,
            "MODIFIED",
            slice(&[("catalog-a", "127.0.0.1", ready)]),
        );
        let window_end = tokio::time::Instant::now() + Duration::from_millis(300);
        while tokio::time::Instant::now() < window_end {
            assert_eq!(
                catalog_endpoint_ids(&mesh).await?,
                ["catalog-a.shop"],
                "ready={ready}"
            );
        }
    }

    // The pod leaves the slice: its endpoint goes, although its proxy had registered it.
    api.apply(Kind::EndpointSlice, "MODIFIED", slice(&[]));
    until(
        Duration::from_secs(5),
        "the endpoint outlived its pod",
        || async { Ok(catalog_endpoint_ids(&mesh).await?.is_empty()) },
    )
    .await?;
    Ok(())
}

/// Probes keep working in STRICT mode. `meshctl inject` (the webhook's function) rewrites a
/// pod's httpGet (named port, header), tcpSocket and grpc probes to paths on the proxy's admin
/// port and hands the originals to the proxy; the proxy, beside a Node.js app and a grpcio
/// health server, answers each rewritten probe as the original would have: 200 while the app
/// passes, 503 when it does not. The kubelet's original probe of the app port meets the STRICT
/// inbound listener and gets no HTTP answer. `--uninject` gives back the original manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_probes_reach_the_app_through_the_sidecar() -> anyhow::Result<()> {
    use mesh_tests::peers;
    let mut mesh = Mesh::start().await?;
    let app = peers::node_app(&mut mesh).await?;
    let grpc = peers::grpc_health_app(&mut mesh).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pod.yaml");
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: shop-0, namespace: default, labels: {{app: shop, version: v1}}}}
spec:
  containers:
    - name: app
      image: "shop:1"
      ports: [{{name: http, containerPort: {http}}}, {{name: grpc, containerPort: {grpc}}}]
      readinessProbe:
        httpGet: {{path: /healthz, port: http, httpHeaders: [{{name: x-probe, value: "1"}}]}}
        periodSeconds: 2
      livenessProbe: {{tcpSocket: {{port: {http}}}, failureThreshold: 5}}
      startupProbe: {{grpc: {{port: {grpc}, service: echo}}}}
    - name: other
      image: "other:1"
      readinessProbe: {{grpc: {{port: {grpc}, service: other}}}}
      livenessProbe: {{exec: {{command: ["true"]}}}}
"#,
        http = app.port(),
        grpc = grpc.port()
    );
    std::fs::write(&path, &manifest)?;
    let out = meshctl_inject(&path).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = String::from_utf8(out.stdout)?;
    let pod: serde_json::Value = serde_saphyr::from_str(&injected)?;
    let containers = pod["spec"]["containers"].as_array().context("containers")?;
    let probe_path = |c: usize, field: &str| {
        let h = &containers[c][field]["httpGet"];
        assert_eq!(h["port"], 15000, "{field} of container {c}: {h}");
        h["path"].as_str().unwrap_or_default().to_string()
    };
    let probes = [
        (probe_path(0, "readinessProbe"), "/app-health/app/readyz"),
        (probe_path(0, "livenessProbe"), "/app-health/app/livez"),
        (probe_path(0, "startupProbe"), "/app-health/app/startupz"),
        (probe_path(1, "readinessProbe"), "/app-health/other/readyz"),
    ];
    for (got, want) in &probes {
        assert_eq!(got, want);
    }
    assert_eq!(containers[0]["readinessProbe"]["periodSeconds"], 2);
    assert_eq!(containers[0]["livenessProbe"]["failureThreshold"], 5);
    assert!(
        containers[1]["livenessProbe"]["exec"].is_object(),
        "exec probes stay"
    );
    let env = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "mesh-proxy")
        .and_then(|c| c["env"].as_array())
        .and_then(|e| e.iter().find(|v| v["name"] == "MESH_APP_PROBES"))
        .and_then(|v| v["value"].as_str())
        .context("MESH_APP_PROBES on the sidecar")?
        .to_string();

    // The sidecar, configured as injected (STRICT inbound in front of the app).
    let web = mesh
        .sidecar(SidecarOpts {
            env: &[],
            namespace: None,
            service: Some("shop"),
            version: Some("v1"),
            service_account: "shop",
            app: Some(app),
            node_id: None,
            workers: 0,
            extra: &["--app-probes", &env],
        })
        .await?;
    // The kubelet's way: GET on the admin port.
    for (path, want) in [
        (&probes[0].0, 200),
        (&probes[1].0, 200),
        (&probes[2].0, 200),
        (&probes[3].0, 503),
    ] {
        let r = admin_get(web.admin, path).await?;
        assert_eq!(r.status, want, "{path}: {}", r.text);
    }
    assert_eq!(
        admin_get(web.admin, "/app-health/nope/readyz")
            .await?
            .status,
        404
    );

    // Without the rewrite the kubelet's plaintext probe meets the STRICT inbound port.
    let inbound = web.inbound.context("inbound")?;
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(inbound).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-probe: 1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        anyhow::Ok(String::from_utf8_lossy(&buf).to_string())
    })
    .await??;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");

    // The app turns sick: readiness fails with the app's answer, the TCP liveness holds.
    let sick = get(&h1_client(app), &format!("http://{app}/sick")).await?;
    assert_eq!(sick.status, 200);
    let r = admin_get(web.admin, &probes[0].0).await?;
    assert_eq!(r.status, 503);
    assert!(r.text.contains("500"), "{}", r.text);
    assert_eq!(admin_get(web.admin, &probes[1].0).await?.status, 200);

    // Reversible: un-injecting gives back the original pod.
    let injected_path = dir.path().join("injected.yaml");
    std::fs::write(&injected_path, &injected)?;
    let back = meshctl_manifest(&["inject", "--uninject", "-f"], &injected_path, &[]).await?;
    let original: serde_json::Value = serde_saphyr::from_str(&manifest)?;
    assert_eq!(back, original);
    Ok(())
}

/// A Service whose pods run under several service accounts: each pod's proxy registers with
/// its own account, its endpoint carries that identity, and callers verify each endpoint
/// against its own; an account the Kubernetes view does not vouch for is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_run_under_several_service_accounts() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let mut canary = pod("catalog-b", "127.0.0.1", "v2", true);
    canary["spec"]["serviceAccountName"] = "catalog-canary".into();
    let api = FakeKubeApi::start(vec![
        (Kind::Pod, pod("catalog-a", "127.0.0.1", "v1", true)),
        (Kind::Pod, canary),
        (
            Kind::EndpointSlice,
            slice(&[
                ("catalog-a", "127.0.0.1", true),
                ("catalog-b", "127.0.0.1", true),
            ]),
        ),
    ])
    .await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    until(
        Duration::from_secs(5),
        "the slice's endpoints never came",
        || async { Ok(catalog_endpoint_ids(&mesh).await?.len() >= 2) },
    )
    .await?;
    // Each pod's proxy, under its own account.
    for (node, sa, version) in [
        ("catalog-a.shop", "catalog", "v1"),
        ("catalog-b.shop", "catalog-canary", "v2"),
    ] {
        let app = mesh.app("catalog", version).await?;
        mesh.sidecar(SidecarOpts {
            namespace: Some("shop"),
            service: Some("catalog"),
            version: Some(version),
            service_account: sa,
            app: Some(app),
            node_id: Some(node),
            ..Default::default()
        })
        .await?;
    }
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);
    // Both answer, each verified against its own identity.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "answers only from {seen:?}"
        );
        let r = get(&http, "http://catalog.shop/").await?;
        if r.status == 200 {
            seen.insert(r.json["version"].as_str().unwrap_or_default().to_string());
        }
    }
    let (_, failed) = split(&http, "http://catalog.shop/", 40).await?;
    assert_eq!(failed, 0);
    let eps = mesh
        .meshctl(&[
            "-n",
            "shop",
            "-o",
            "json",
            "endpoints",
            "--service",
            "catalog",
        ])
        .await?;
    assert!(
        eps.contains("spiffe://mesh.local/ns/shop/sa/catalog-canary"),
        "{eps}"
    );

    // An account no pod of the Service runs under is refused.
    let app = mesh.app("catalog", "v9").await?;
    mesh.sidecar(SidecarOpts {
        namespace: Some("shop"),
        service: Some("catalog"),
        version: Some("v9"),
        service_account: "intruder",
        app: Some(app),
        node_id: Some("intruder.shop"),
        ..Default::default()
    })
    .await?;
    // Its proxy is told why, and retries (logged).
    until(
        Duration::from_secs(10),
        "the intruder's registration refused",
        || async {
            let log = mesh.logs_of("catalog-v9-proxy")?;
            Ok(log.contains("PermissionDenied")
                && log.contains("not spiffe://mesh.local/ns/shop/sa/intruder"))
        },
    )
    .await?;
    assert!(
        !catalog_endpoint_ids(&mesh)
            .await?
            .contains(&"intruder.shop".to_string())
    );
    Ok(())
}

/// An injected pod of service `app` (its ServiceAccount too) in namespace `test`, and the
/// EndpointSlice of that service holding it.
fn test_app(app: &str, ip: &str) -> [(mesh_tests::kube_api::Kind, serde_json::Value); 2] {
    use mesh_tests::kube_api::Kind;
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{app}-0"), "namespace": "test", "uid": format!("uid-{app}"),
                     "labels": {"app": app}, "annotations": {"mesh.io/injected": "0.1.0"}},
        "spec": {"serviceAccountName": app, "containers": [{"name": app, "image": "podinfo:6"}]},
        "status": {"podIP": ip, "phase": "Running"}
    });
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{app}-abcde"), "namespace": "test", "uid": format!("slice-{app}"),
                     "labels": {"kubernetes.io/service-name": app}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9898, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": "test", "name": format!("{app}-0"), "uid": format!("uid-{app}")}}]
    });
    [(Kind::Pod, pod), (Kind::EndpointSlice, slice)]
}

/// The HTTPRoute Flagger's Gateway API provider writes for a mesh (GAMMA) canary of
/// `podinfo`, at `primary`/`canary` weights and metadata.generation `generation`.
fn flagger_route(primary: u32, canary: u32, generation: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "podinfo", "namespace": "test", "generation": generation,
                     "creationTimestamp": "2026-12-06T10:00:00Z",
                     "ownerReferences": [{"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "name": "podinfo", "uid": "c-1", "controller": true}]},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "podinfo", "port": 9898}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [
                    {"group": "", "kind": "Service", "name": "podinfo-primary", "port": 9898, "weight": primary},
                    {"group": "", "kind": "Service", "name": "podinfo-canary", "port": 9898, "weight": canary}
                ]
            }]
        }
    })
}

/// Issue 27 item 5: Gateway API for the mesh. HTTPRoutes exactly as Flagger's Gateway API
/// provider writes them for a canary of `podinfo` (apex Service parent, `-primary` and
/// `-canary` Services as backendRefs) set the weights at the proxies as Flagger moves them,
/// with the canary's endpoints; each route's status says Accepted (with its
/// observedGeneration) under this controller's name. A GRPCRoute on the same Service adds its
/// rule; a backendRef to a Service the mesh does not know, and an unsupported filter, are
/// refused in status (ResolvedRefs / Accepted false, saying why) and change nothing at the
/// proxies; deleting the routes sends the Service's traffic back to its own endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_routes_drive_the_mesh_as_flagger_writes_them() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let mut objects = Vec::new();
    for (app, ip) in [
        ("podinfo", "10.2.0.10"),
        ("podinfo-primary", "10.2.0.11"),
        ("podinfo-canary", "10.2.0.12"),
    ] {
        objects.extend(test_app(app, ip));
    }
    let api = FakeKubeApi::start(objects).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let c = mesh.client("web").await?;
    let _ = get(&h1_client(c.outbound), "http://podinfo.test/").await;
    let endpoints_of = |d: &serde_json::Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "podinfo.test")
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                (
                    e["address"].as_str().unwrap_or("").to_string(),
                    e["version"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    wait_config(c.admin, Duration::from_secs(10), |d| {
        endpoints_of(d).len() == 1
    })
    .await?;
    let split = |p: u64, cn: u64| {
        vec![
            ("podinfo-primary.test".to_string(), p),
            ("podinfo-canary.test".to_string(), cn),
        ]
    };
    let ours = |o: &serde_json::Value| -> Vec<(String, String, String, u64)> {
        o["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["controllerName"] == "mesh.io/mesh-controller")
            .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or("").to_string(),
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                    c["observedGeneration"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let status_within =
        |kind: Kind,
         name: &'static str,
         want: Vec<(&'static str, &'static str, &'static str, u64)>| {
            let api = &api;
            async move {
                let want: Vec<(String, String, String, u64)> = want
                    .into_iter()
                    .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d))
                    .collect();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let o = api.object(kind, "test", name).unwrap_or_default();
                    if ours(&o) == want {
                        return anyhow::Ok(o);
                    }
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "{name}'s status is {}",
                        o["status"]
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };

    // Flagger starts the canary at 0%, then shifts: each step reaches the proxy.
    api.apply(Kind::HttpRoute, "ADDED", flagger_route(100, 0, 1));
    wait_config(c.admin, Duration::from_secs(5), |d| {
        route_in_dump(d, "podinfo.test") == split(100, 0)
    })
    .await?;
    // The apex Service's callers now know the backends' endpoints, as their versions.
    let eps = endpoints_of(&admin_get(c.admin, "/config_dump").await?.json);
    assert!(
        eps.contains(&("10.2.0.12:15006".into(), "podinfo-canary.test".into()))
            || eps
                .iter()
                .any(|(a, v)| a.starts_with("10.2.0.12:") && v == "podinfo-canary.test"),
        "{eps:?}"
    );
    let accepted = |g| {
        vec![
            ("Accepted", "True", "Accepted", g),
            ("ResolvedRefs", "True", "ResolvedRefs", g),
        ]
    };
    status_within(Kind::HttpRoute, "podinfo", accepted(1)).await?;
    for (step, (p, cn)) in [(90, 10), (50, 50), (0, 100)].into_iter().enumerate() {
        let generation = step as u64 + 2;
        api.apply(
            Kind::HttpRoute,
            "MODIFIED",
            flagger_route(p, cn, generation),
        );
        wait_config(c.admin, Duration::from_secs(5), |d| {
            route_in_dump(d, "podinfo.test") == split(p as u64, cn as u64)
        })
        .await?;
        status_within(Kind::HttpRoute, "podinfo", accepted(generation)).await?;
    }
    let shown = mesh
        .meshctl(&["-n", "test", "route", "get", "podinfo"])
        .await?;
    assert!(
        shown.contains("svc/podinfo-primary=0,svc/podinfo-canary=100"),
        "{shown}"
    );

    // A GRPCRoute on the same Service adds its rule.
    api.apply(
        Kind::GrpcRoute,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "podinfo-grpc", "namespace": "test", "generation": 1,
                         "creationTimestamp": "2026-12-06T11:00:00Z"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "podinfo"}],
                "rules": [{
                    "matches": [{"method": {"service": "grpc.health.v1.Health"}}],
                    "backendRefs": [{"name": "podinfo-primary"}]
                }]
            }
        }),
    );
    wait_config(c.admin, Duration::from_secs(5), |d| {
        rules_in_dump(d, "podinfo.test") == ["podinfo-grpc-1"]
            && route_in_dump(d, "podinfo.test") == split(0, 100)
    })
    .await?;
    status_within(Kind::GrpcRoute, "podinfo-grpc", accepted(1)).await?;

    // Refused in status, nothing changed at the proxy: a backend the mesh does not know...
    let mut unknown = flagger_route(50, 50, 6);
    unknown["spec"]["rules"][0]["backendRefs"][1]["name"] = "podinfo-nosuch".into();
    api.apply(Kind::HttpRoute, "MODIFIED", unknown);
    let o = status_within(
        Kind::HttpRoute,
        "podinfo",
        vec![
            ("Accepted", "False", "BackendNotFound", 6),
            ("ResolvedRefs", "False", "BackendNotFound", 6),
        ],
    )
    .await?;
    assert!(
        o["status"].to_string().contains("podinfo-nosuch.test"),
        "{}",
        o["status"]
    );
    // ...and a filter the mesh does not implement.
    let mut rewrite = flagger_route(50, 50, 7);
    rewrite["spec"]["rules"][0]["filters"] =
        serde_json::json!([{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}]);
    api.apply(Kind::HttpRoute, "MODIFIED", rewrite);
    status_within(
        Kind::HttpRoute,
        "podinfo",
        vec![
            ("Accepted", "False", "UnsupportedValue", 7),
            ("ResolvedRefs", "True", "ResolvedRefs", 7),
        ],
    )
    .await?;
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    assert_eq!(route_in_dump(&dump, "podinfo.test"), split(0, 100));

    // Both routes deleted: the Service's own endpoints again, no split.
    api.apply(Kind::HttpRoute, "DELETED", flagger_route(50, 50, 7));
    api.apply(
        Kind::GrpcRoute,
        "DELETED",
        serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                           "metadata": {"name": "podinfo-grpc", "namespace": "test"}}),
    );
    wait_config(c.admin, Duration::from_secs(5), |d| {
        route_in_dump(d, "podinfo.test").is_empty()
            && rules_in_dump(d, "podinfo.test").is_empty()
            && endpoints_of(d).len() == 1
    })
    .await?;
    Ok(())
}

/// A kubeconfig for the stand-in API server (plain HTTP, a bearer token).
fn kubeconfig(dir: &std::path::Path, url: &str) -> anyhow::Result<std::path::PathBuf> {
    kubeconfig_as(dir, url, "admin-token")
}

/// A kubeconfig for the stand-in API server whose user presents `token`.
fn kubeconfig_as(
    dir: &std::path::Path,
    url: &str,
    token: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(format!("kubeconfig-{token}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {url}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: admin\ncurrent-context: stand-in\n"
        ),
    )?;
    Ok(path)
}

/// Issue 27, the whole flow on the stand-in API server: `meshctl check --pre` against an
/// empty cluster passes (API version, namespace free, every permission install needs); with a
/// permission missing and the namespace taken it fails, saying what to do, exit 1. After the
/// install (the CRDs and Deployment `meshctl install` prints, as the API server shows them once
/// established and ready; a control plane keeping the webhook's caBundle; a proxy), `meshctl
/// check` passes every check, the webhook's TLS included (reached through a port-forward, as
/// the API server would verify it); an HTTPRoute as Flagger writes it sets the weights at the
/// proxy; `meshctl uninstall` names every object the install made; and check fails naming the
/// control plane when its replicas are not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_check_before_and_after_an_install() -> anyhow::Result<()> {
    use mesh_tests::kube_api::FakeKubeApi;
    let api = FakeKubeApi::start(Vec::new()).await?;
    let dir = tempfile::tempdir()?;
    let kcfg = kubeconfig(dir.path(), &api.url)?;
    let check = |args: &'static [&'static str]| {
        let kcfg = kcfg.clone();
        async move {
            let out = tokio::process::Command::new(bin_dir().join("meshctl"))
                .args(args)
                .env("KUBECONFIG", &kcfg)
                .output()
                .await?;
            anyhow::Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).to_string(),
            ))
        }
    };
    let (code, out) = check(&["check", "--pre"]).await?;
    assert_eq!(code, 0, "{out}");
    for line in [
        "✔ Kubernetes API reachable, version 1.33",
        "✔ namespace mesh-system is free",
        "✔ may create customresourcedefinitions",
        "✔ may create deployments",
        "✔ clock within 5 s of the API server's",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    api.deny("customresourcedefinitions");
    api.put_at(
        "/api/v1/namespaces/mesh-system",
        Some(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh-system"}})),
    );
    let (code, out) = check(&["check", "--pre"]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✖ may create customresourcedefinitions\n    → ask a cluster admin"),
        "{out}"
    );
    assert!(out.contains("✖ namespace mesh-system exists"), "{out}");

    // The install, as the API server holds it once applied: CRDs established, the
    // control plane's Deployment ready, the webhook configuration.
    let install = tokio::process::Command::new(bin_dir().join("meshctl"))
        .arg("install")
        .output()
        .await?;
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&String::from_utf8(install.stdout)?)?;
    for d in docs.iter().filter(|d| !d.is_null()) {
        let name = d["metadata"]["name"].as_str().unwrap_or("");
        match d["kind"].as_str() {
            Some("CustomResourceDefinition") => {
                let mut d = d.clone();
                d["status"] =
                    serde_json::json!({"conditions": [{"type": "Established", "status": "True"}]});
                api.put_at(
                    &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
                    Some(d),
                );
            }
            Some("Deployment") => {
                let mut d = d.clone();
                d["status"] = serde_json::json!({"replicas": 2, "readyReplicas": 2});
                api.put_at(
                    &format!("/apis/apps/v1/namespaces/mesh-system/deployments/{name}"),
                    Some(d),
                );
            }
            Some("MutatingWebhookConfiguration") => api.put_webhook_configuration(d.clone()),
            _ => {}
        }
    }
    let mut mesh = Mesh::start_with(&[
        "--kube-api",
        &api.url,
        "--webhook-addr",
        "127.0.0.1:0",
        "--server-name",
        "mesh-control-plane.mesh-system.svc",
    ])
    .await?;
    // Its pod, which check reaches the webhook of through a port-forward.
    api.apply(
        mesh_tests::kube_api::Kind::Pod,
        "ADDED",
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "mesh-control-plane-0", "namespace": "mesh-system", "uid": "cp-0",
                         "labels": {"app.kubernetes.io/name": "mesh-control-plane"}},
            "spec": {"containers": [{"name": "control-plane", "image": "mesh-control-plane:0.1.0"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5"}}),
    );
    let webhook = mesh.webhook.context("the webhook's address")?;
    api.forward("mesh-system", "mesh-control-plane-0", 15017, webhook);
    for (app, ip) in [
        ("podinfo", "10.2.0.10"),
        ("podinfo-primary", "10.2.0.11"),
        ("podinfo-canary", "10.2.0.12"),
    ] {
        for (kind, obj) in test_app(app, ip) {
            api.apply(kind, "ADDED", obj);
        }
    }
    let c = mesh.client("web").await?;
    let _ = get(&h1_client(c.outbound), "http://podinfo.test/").await;
    let env = [("KUBECONFIG", kcfg.as_path())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let out = loop {
        let (code, out, err) = mesh.meshctl_env(&["check"], &env).await?;
        if code == 0 {
            break out;
        }
        // The control plane fills the webhook's caBundle, the proxy ACKs: soon.
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "check never passed:\n{out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for line in [
        "✔ CRD meshroutes.mesh.io established",
        "✔ control plane ready (2/2 replicas)",
        "✔ control plane version 0.1.0 (meshctl 0.1.0)",
        "✔ webhook caBundle holds the mesh's roots",
        "✔ webhook mesh-control-plane.mesh-system.svc answers TLS with a certificate the caBundle verifies",
        "✔ 1 of 1 proxies run an ACKed config",
        "✔ no proxy certificate expires within 1h",
        "✔ proxies run the control plane's version 0.1.0",
        "all checks passed",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    // A canary as Flagger drives it reaches the proxy (the GAMMA route of the install).
    api.apply(
        mesh_tests::kube_api::Kind::HttpRoute,
        "ADDED",
        flagger_route(90, 10, 1),
    );
    wait_config(c.admin, Duration::from_secs(10), |d| {
        route_in_dump(d, "podinfo.test")
            == [
                ("podinfo-primary.test".to_string(), 90),
                ("podinfo-canary.test".to_string(), 10),
            ]
    })
    .await?;
    // Uninstall names every object the install made.
    let gone = tokio::process::Command::new(bin_dir().join("meshctl"))
        .arg("uninstall")
        .output()
        .await?;
    let gone: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&String::from_utf8(gone.stdout)?)?;
    let names = |d: &serde_json::Value| {
        (
            d["kind"].as_str().unwrap_or("").to_string(),
            d["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    let mut made: Vec<_> = docs.iter().filter(|d| !d.is_null()).map(names).collect();
    let mut removed: Vec<_> = gone.iter().filter(|d| !d.is_null()).map(names).collect();
    made.sort();
    removed.sort();
    assert_eq!(made, removed);

    // Replicas not ready: named, with where to look.
    let mut d = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .cloned()
        .unwrap_or_default();
    d["status"] = serde_json::json!({"replicas": 2, "readyReplicas": 0});
    api.put_at(
        "/apis/apps/v1/namespaces/mesh-system/deployments/mesh-control-plane",
        Some(d),
    );
    let (code, out, _) = mesh.meshctl_env(&["check"], &env).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "✖ control plane ready (0/2 replicas)\n    → kubectl -n mesh-system describe deployment"
        ),
        "{out}"
    );
    Ok(())
}

/// Issue 27 item 3: on Kubernetes meshctl needs no shared token. Without --token or a local
/// data dir it presents its kubeconfig's token; the control plane asks the API server who that
/// is (TokenReview) and what RBAC grants it on `mesh.io/admin` (SubjectAccessReview, as the
/// install's mesh-viewer and mesh-editor ClusterRoles grant): a viewer lists but may not
/// change a route, an editor changes it, and an unknown token is refused. With `--server
/// kube://mesh-system` meshctl needs nothing but the kubeconfig: it port-forwards through the
/// API server (WebSocket, `v4.channel.k8s.io`) to a running control-plane pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_users_reach_the_admin_api_with_their_own_tokens() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    // The control plane's namespace and its pod, for the port-forward.
    let api = FakeKubeApi::start(vec![
        (
            Kind::Namespace,
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh-system"}}),
        ),
        (
            Kind::Pod,
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "mesh-control-plane-7f9c-x2k4", "namespace": "mesh-system", "uid": "cp-1",
                             "labels": {"app.kubernetes.io/name": "mesh-control-plane"}},
                "spec": {"containers": [{"name": "control-plane", "image": "mesh-control-plane:0.1.0"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.5"}}),
        ),
    ])
    .await?;
    api.add_token("alice-token", "team", "alice");
    api.add_token("bob-token", "team", "bob");
    api.grant("system:serviceaccount:team:alice", &["read"]);
    api.grant("system:serviceaccount:team:bob", &["read", "write"]);
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let dir = tempfile::tempdir()?;
    let ca = mesh.data_dir().join("ca/bundle.pem");
    let as_user = |token: &str, args: &[&str]| {
        let kcfg = kubeconfig_as(dir.path(), &api.url, token);
        let mut cmd = tokio::process::Command::new(bin_dir().join("meshctl"));
        cmd.args(["--server", &format!("https://{}", mesh.admin_addr)])
            .arg("--ca-file")
            .arg(&ca)
            // No admin token there: the kubeconfig's is the credential.
            .arg("--data-dir")
            .arg(dir.path())
            .args(args);
        async move {
            cmd.env("KUBECONFIG", kcfg?);
            let out = cmd.output().await?;
            anyhow::Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            ))
        }
    };
    let set = ["route", "set", "backend", "--weights", "v1=100"];
    let (code, out, err) = as_user("alice-token", &["services"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backend"), "{out}");
    let (code, _, err) = as_user("alice-token", &set).await?;
    assert_ne!(code, 0);
    assert!(err.contains("needs the \"write\" scope"), "{err}");
    let (code, out, err) = as_user("bob-token", &set).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("route of backend set to v1=100"), "{out}");
    let (code, _, err) = as_user("mallory-token", &["services"]).await?;
    assert_ne!(code, 0);
    assert!(err.contains("Unauthenticated"), "{err}");

    // Through the API server alone: `--server kube://mesh-system` port-forwards to a running
    // control-plane pod and verifies it against the bundle the control plane publishes in its
    // namespace; no address, CA file or mesh token is given.
    api.forward(
        "mesh-system",
        "mesh-control-plane-7f9c-x2k4",
        15011,
        mesh.admin_addr,
    );
    let kcfg = kubeconfig_as(dir.path(), &api.url, "alice-token")?;
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--server", "kube://mesh-system", "--data-dir"])
        .arg(dir.path())
        .arg("services")
        .env("KUBECONFIG", &kcfg)
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("backend"), "{stdout}");
    Ok(())
}
