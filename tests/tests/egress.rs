//! Issue 30, egress: services outside the mesh declared with `meshctl external add`, called by
//! an app through its sidecar as `http://<host>`, the sidecar originating TLS. The outside
//! service is Python's `http.server` behind the standard `ssl` module with a CA of the test's
//! own (tests/peers/tls_api.py), which reports the SNI, ALPN and client certificate it saw;
//! curl is the app's client. And the namespace egress mode: registry-only refuses what no
//! registry names.

use mesh_tests::peers::{self, curl};
use mesh_tests::pki::TestCa;
use mesh_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// curl through the caller's sidecar (its outbound port as the HTTP proxy); `-i` so the
/// headers come back too.
async fn via(proxy: SocketAddr, url: &str) -> anyhow::Result<(u16, String)> {
    let p = format!("http://{proxy}");
    curl(&["-i", "-x", &p, url]).await
}

fn body_of(out: &str) -> &str {
    out.split_once("\r\n\r\n").map_or(out, |(_, b)| b)
}

/// Declared with its CA, an outside TLS API is reached by plain `http://` calls: the sidecar
/// originates TLS with the right SNI (or the one set), verifies the server against the given
/// CA (the system's roots refuse it), presents a client certificate when asked, and applies
/// the service's policy (a retry) and metrics as for a mesh service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_api_is_called_over_tls_the_sidecar_originates() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let dir = mesh.data_dir().join("payments-pki");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("payments CA")?;
    let ca_file = ca.write(&dir.join("ca.pem"))?;
    let (crt, key) = ca.leaf(
        &dir,
        "api",
        &["api.payments.example", "alt.payments.example"],
    )?;
    let api = peers::tls_api(&mut mesh, &crt, &key, None).await?;
    let c = mesh.client("shop").await?;
    let port = api.port().to_string();
    let address = api.to_string();
    let ca_s = ca_file.display().to_string();

    // With the system's roots only, the test CA is not trusted: refused, saying why.
    mesh.meshctl(&[
        "external",
        "add",
        "api.payments.example",
        "--port",
        &port,
        "--tls",
        "--address",
        &address,
    ])
    .await?;
    let (status, out) = via(c.outbound, "http://api.payments.example/hello").await?;
    assert_eq!(status, 503, "{out}");
    assert!(out.contains("x-mesh-error: connect-failed"), "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");

    // With its CA: a plain call leaves encrypted, SNI the host, HTTP/1.1 by ALPN.
    mesh.meshctl(&[
        "external",
        "add",
        "api.payments.example",
        "--port",
        &port,
        "--tls",
        "--ca-cert",
        &ca_s,
        "--address",
        &address,
    ])
    .await?;
    let host = format!("api.payments.example:{port}");
    let j = until_json(c.outbound, "http://api.payments.example/hello?x=1").await?;
    assert_eq!(j["app"], "tls-api");
    assert_eq!(j["url"], "/hello?x=1");
    assert_eq!(j["host"], host);
    assert_eq!(j["sni"], "api.payments.example");
    assert_eq!(j["alpn"], "http/1.1");
    assert_eq!(j["client_cn"], serde_json::Value::Null);

    // Another name in SNI.
    mesh.meshctl(&[
        "external",
        "add",
        "api.payments.example",
        "--port",
        &port,
        "--tls",
        "--ca-cert",
        &ca_s,
        "--sni",
        "alt.payments.example",
        "--address",
        &address,
    ])
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let j = until_json(c.outbound, "http://api.payments.example/hello").await?;
        if j["sni"] == "alt.payments.example" {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "SNI still {}",
            j["sni"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The service's policy applies: a retry on 503 turns the first failure into a 200.
    mesh.meshctl(&[
        "policy",
        "set",
        "api.payments.example",
        "--retries",
        "2",
        "--retry-on",
        "503",
    ])
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let (status, out) = via(
            c.outbound,
            &format!("http://api.payments.example/flaky/{n}"),
        )
        .await?;
        if status == 200 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "retries never applied: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // And a timeout: the API answers /stall/2000 after 2 s; the policy allows 300 ms.
    mesh.meshctl(&[
        "policy",
        "set",
        "api.payments.example",
        "--timeout",
        "300ms",
    ])
    .await?;
    until(
        Duration::from_secs(10),
        "the external's timeout",
        || async move {
            let (status, out) = via(c.outbound, "http://api.payments.example/stall/2000").await?;
            Ok(status == 504 && out.contains("x-mesh-error: timeout"))
        },
    )
    .await?;

    // Its requests are in the caller's metrics under its host.
    let m = admin_get(c.admin, "/metrics").await?;
    let rows = samples(
        &m.text,
        "istio_requests_total",
        &["destination_service", "response_code"],
        &[("reporter", "source")],
    )?;
    let ok = rows
        .get(&vec!["api.payments.example".to_string(), "200".to_string()])
        .copied()
        .unwrap_or(0.0);
    assert!(ok >= 3.0, "{rows:?}");

    // A partner API that requires a client certificate: refused without one, then the
    // sidecar presents the one declared.
    let partner_ca = TestCa::new("partner client CA")?;
    let partner_ca_file = partner_ca.write(&dir.join("partner-ca.pem"))?;
    let (pcrt, pkey) = ca.leaf(&dir, "partner", &["partner.payments.example"])?;
    let (ccrt, ckey) = partner_ca.leaf(&dir, "shop-client", &["shop.client.example"])?;
    let partner = peers::tls_api(&mut mesh, &pcrt, &pkey, Some(&partner_ca_file)).await?;
    let (pport, paddr) = (partner.port().to_string(), partner.to_string());
    let mut args = vec![
        "external",
        "add",
        "partner.payments.example",
        "--port",
        &pport,
        "--tls",
        "--ca-cert",
        &ca_s,
        "--address",
        &paddr,
    ];
    mesh.meshctl(&args).await?;
    let (status, out) = via(c.outbound, "http://partner.payments.example/hello").await?;
    assert!(status >= 500, "no client certificate must fail: {out}");
    let (cc, ck) = (ccrt.display().to_string(), ckey.display().to_string());
    args.extend_from_slice(&["--client-cert", &cc, "--client-key", &ck]);
    mesh.meshctl(&args).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, out) = via(c.outbound, "http://partner.payments.example/hello").await?;
        if status == 200 {
            assert_eq!(json(body_of(&out))["client_cn"], "shop.client.example");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "client certificate not presented: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = mesh.meshctl(&["external", "list"]).await?;
    assert!(
        listed.contains("partner.payments.example") && listed.contains("given"),
        "{listed}"
    );
    assert!(
        !listed.contains("BEGIN"),
        "no key material is shown: {listed}"
    );
    Ok(())
}

/// GETs `url` through the caller's sidecar until it answers 200 (the external's config
/// reaching the sidecar); returns the JSON body.
async fn until_json(proxy: SocketAddr, url: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, out) = via(proxy, url).await?;
        if status == 200 {
            return Ok(json(body_of(&out)));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{url}: {status} {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A namespace's egress mode: allow-any (the default) says a name is unknown (404); under
/// registry-only the same call is refused as egress (502 `egress-denied`) while mesh services
/// and declared externals still answer; bad modes and hosts are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_egress_refuses_what_no_registry_names() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    let node = peers::node_app(&mut mesh).await?;
    // A plaintext external (the Node app, outside the mesh).
    let c = mesh.client("shop").await?;
    mesh.meshctl(&[
        "external",
        "add",
        "status.partner.example",
        "--port",
        &node.port().to_string(),
        "--address",
        &node.to_string(),
    ])
    .await?;
    mesh.wait_endpoints("backend", 1).await?;
    let j = until_json(c.outbound, "http://status.partner.example/hello").await?;
    assert_eq!(j["app"], "node", "plaintext external: {j}");
    // Its route applies (a header set on the way back).
    mesh.meshctl(&[
        "route",
        "set",
        "status.partner.example",
        "--match",
        "prefix:/",
        "--name",
        "all",
        "--set-response-header",
        "x-via=mesh",
    ])
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out) = via(c.outbound, "http://status.partner.example/hello").await?;
        if out.to_ascii_lowercase().contains("x-via: mesh") {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "route not applied: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, out) = via(c.outbound, "http://unknown.partner.example/").await?;
    assert_eq!(status, 404, "{out}");
    assert!(out.contains("x-mesh-error: unknown-service"), "{out}");

    mesh.meshctl(&["egress", "default", "registry-only"])
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (status, out) = via(c.outbound, "http://elsewhere.partner.example/").await?;
        if status == 502 {
            break out;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{status}: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(out.contains("x-mesh-error: egress-denied"), "{out}");
    assert!(out.contains("registry-only"), "the answer says why: {out}");
    let (status, _) = via(c.outbound, "http://backend/").await?;
    assert_eq!(status, 200, "mesh services are still reachable");
    let j = until_json(c.outbound, "http://status.partner.example/hello").await?;
    assert_eq!(j["app"], "node", "declared externals are still reachable");

    mesh.meshctl(&["egress", "default", "allow-any"]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = via(c.outbound, "http://another.partner.example/").await?;
        if status == 404 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (args, want) in [
        (
            &["egress", "default", "closed"][..],
            "allow-any or registry-only",
        ),
        (
            &[
                "external",
                "add",
                "*.partner.example",
                "--port",
                "443",
                "--address",
                "127.0.0.1:1",
            ][..],
            "no wildcard",
        ),
        (
            &[
                "external",
                "add",
                "backend.default",
                "--port",
                "80",
                "--address",
                "127.0.0.1:1",
            ][..],
            "is a mesh service",
        ),
        (
            &[
                "external",
                "add",
                "x.partner.example",
                "--port",
                "80",
                "--address",
                "nowhere",
            ][..],
            "is not ip:port",
        ),
    ] {
        let (code, _, err) = mesh.meshctl_exit(args).await?;
        assert_ne!(code, 0, "{args:?} must be refused");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    Ok(())
}

/// On Kubernetes, a `MeshExternal` object declares an external service as `meshctl external
/// add` does: the sidecar originates TLS to it with the object's CA, the object's status says
/// Accepted; a bad one is refused in its status, naming why, and changes nothing; deleting
/// the object removes the external.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_external_objects_declare_externals_on_kubernetes() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(Vec::new()).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let dir = mesh.data_dir().join("payments-pki");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("payments CA")?;
    let (crt, key) = ca.leaf(&dir, "api", &["api.payments.example"])?;
    let tls_api = peers::tls_api(&mut mesh, &crt, &key, None).await?;
    let c = mesh.client("shop").await?;
    let object = |generation: u64, port: u16| {
        serde_json::json!({
            "apiVersion": "mesh.io/v1alpha1", "kind": "MeshExternal",
            "metadata": {"name": "api.payments.example", "generation": generation},
            "spec": {"port": port, "tls": true, "ca_pem": ca.pem,
                     "addresses": [tls_api.to_string()]}
        })
    };
    let accepted = |api: &FakeKubeApi| -> Option<(String, String)> {
        let o = api.object(Kind::MeshExternal, "default", "api.payments.example")?;
        let c = o["status"]["conditions"].as_array()?.first()?.clone();
        Some((
            c["status"].as_str()?.to_string(),
            c["message"].as_str()?.to_string(),
        ))
    };
    api.apply(Kind::MeshExternal, "ADDED", object(1, tls_api.port()));
    let j = until_json(c.outbound, "http://api.payments.example/hello").await?;
    assert_eq!(j["sni"], "api.payments.example", "{j}");
    until(Duration::from_secs(10), "the object accepted", || {
        let a = accepted(&api);
        async move { Ok(a.is_some_and(|(s, _)| s == "True")) }
    })
    .await?;
    let listed = mesh.meshctl(&["external", "list"]).await?;
    assert!(listed.contains("api.payments.example"), "{listed}");

    // Port 0: refused in the status, the external in force unchanged.
    api.apply(Kind::MeshExternal, "MODIFIED", object(2, 0));
    until(Duration::from_secs(10), "the bad object refused", || {
        let a = accepted(&api);
        async move { Ok(a.is_some_and(|(s, m)| s == "False" && m.contains("port"))) }
    })
    .await?;
    let j = until_json(c.outbound, "http://api.payments.example/hello").await?;
    assert_eq!(j["app"], "tls-api");

    // Deleted: the external goes; the name is unknown again.
    api.apply(Kind::MeshExternal, "DELETED", object(2, 0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, out) = via(c.outbound, "http://api.payments.example/hello").await?;
        if status == 404 {
            assert!(out.contains("unknown-service"), "{out}");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still {status}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
