//! Issue 30, the ingress gateway, end to end with clients and apps the project did not write:
//! curl (HTTP/1.1 and HTTP/2 over TLS, by ALPN), h2load, grpcurl with TLS; Node.js's `http`
//! and Python's `http.server` as apps behind their sidecars. The gateway's certificates come
//! from an operator CA the test makes (`pki::TestCa`), nothing to do with the mesh CA.

use mesh_tests::peers::{self, curl};
use mesh_tests::pki::TestCa;
use mesh_tests::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// curl to the gateway as `https://<host>:<port><path>`, the name resolving to the gateway's
/// loopback address (so SNI and Host are the host's), verifying with `ca`.
async fn curl_https(
    gw: SocketAddr,
    ca: &Path,
    host: &str,
    path: &str,
    extra: &[&str],
) -> anyhow::Result<(u16, String)> {
    let resolve = format!("{host}:{}:127.0.0.1", gw.port());
    let url = format!("https://{host}:{}{path}", gw.port());
    let ca = ca.display().to_string();
    let mut args = vec!["--cacert", &ca, "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).await
}

/// A CA of the test's own standing in for the operator's, and a certificate from it for
/// `host`: (the CA's file, the `--gateway-cert` value).
fn operator_cert(mesh: &Mesh, host: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let dir = mesh.data_dir().join("gateway-pki");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("operator CA")?;
    let ca_file = ca.write(&dir.join("ca.pem"))?;
    let (crt, key) = ca.leaf(&dir, host.split('.').next().unwrap_or("gw"), &[host])?;
    Ok((ca_file, format!("{}:{}", crt.display(), key.display())))
}

/// The response's head and body from `curl -i` output.
fn head_and_body(out: &str) -> (&str, &str) {
    out.split_once("\r\n\r\n").unwrap_or((out, ""))
}

/// A gateway `edge` (identity default/edge) with HTTPS and HTTP listeners, serving `certs`.
async fn gateway(mesh: &mut Mesh, certs: &str, extra: &[&str]) -> anyhow::Result<Sidecar> {
    gateway_replica(mesh, "edge-1", certs, extra).await
}

/// One replica of gateway `edge`, as node `node`.
async fn gateway_replica(
    mesh: &mut Mesh,
    node: &str,
    certs: &str,
    extra: &[&str],
) -> anyhow::Result<Sidecar> {
    let mut flags = vec![
        "--gateway-https-addr",
        "127.0.0.1:0",
        "--gateway-http-addr",
        "127.0.0.1:0",
        "--gateway-cert",
        certs,
    ];
    flags.extend_from_slice(extra);
    let gw = mesh
        .sidecar(SidecarOpts {
            service: Some("edge"),
            service_account: "edge",
            node_id: Some(node),
            extra: &flags,
            ..Default::default()
        })
        .await?;
    // Routes for `edge` are refused until the gateway has declared it.
    mesh.wait_service("edge").await?;
    Ok(gw)
}

/// `meshctl route set edge <args>`, then waits until the gateway runs a rule named `name`.
async fn gateway_rule(mesh: &Mesh, gw: &Sidecar, name: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["route", "set", "edge", "--name", name];
    all.extend_from_slice(args);
    mesh.meshctl(&all).await?;
    wait_config(gw.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "edge").iter().any(|r| r == name)
    })
    .await
    .map(|_| ())
}

/// TLS by SNI over two certificates, HTTP/1.1 and HTTP/2 by ALPN, routing by host and path to
/// other services with header edits, `x-forwarded-*`, 404 for a host no rule names, the
/// plaintext listener's redirect, gRPC (grpcurl over TLS), h2load, and a certificate replaced
/// on disk while h2load's connections stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_gateway_terminates_tls_and_routes_by_host_and_path() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let dir = mesh.data_dir().join("gateway-pki");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("operator CA")?;
    let ca_file = ca.write(&dir.join("ca.pem"))?;
    let (shop_crt, shop_key) = ca.leaf(&dir, "shop", &["shop.example.com"])?;
    let (api_crt, api_key) = ca.leaf(&dir, "api", &["*.example.org"])?;
    let certs = format!(
        "{}:{},{}:{}",
        shop_crt.display(),
        shop_key.display(),
        api_crt.display(),
        api_key.display()
    );

    let node = peers::node_app(&mut mesh).await?;
    let py = peers::python_app(&mut mesh).await?;
    mesh.front("web", node, &[]).await?;
    mesh.front("api", py, &[]).await?;
    mesh.workload("echo", "v1").await?;
    let gw = gateway(&mut mesh, &certs, &[]).await?;
    let https = gw.gateway_https.expect("the gateway's HTTPS listener");
    let http = gw.gateway_http.expect("the gateway's HTTP listener");
    for s in ["web", "api", "echo"] {
        mesh.wait_endpoints(s, 1).await?;
    }

    gateway_rule(
        &mesh,
        &gw,
        "shop",
        &["--match", "host:shop.example.com", "--to", "svc/web"],
    )
    .await?;
    gateway_rule(
        &mesh,
        &gw,
        "shop-api",
        &[
            "--match",
            "host:shop.example.com",
            "--match",
            "prefix:/hello/py",
            "--to",
            "svc/api",
            "--set-response-header",
            "x-served-by=gateway-rule",
        ],
    )
    .await?;
    gateway_rule(
        &mesh,
        &gw,
        "org",
        &["--match", "host:*.example.org", "--to", "svc/api"],
    )
    .await?;
    gateway_rule(
        &mesh,
        &gw,
        "grpc",
        &["--match", "host:grpc.example.net", "--to", "svc/echo"],
    )
    .await?;

    // HTTP/1.1 and HTTP/2 over TLS (ALPN), SNI shop.example.com: the Node app behind `web`
    // sees origin-form, the client's Host, and where the request came from.
    for (flag, proto) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let (status, out) = curl_https(
            https,
            &ca_file,
            "shop.example.com",
            "/hello?q=1",
            &[flag, "-i", "-H", "x-mesh-debug: 1"],
        )
        .await?;
        assert_eq!(status, 200, "{flag}: {out}");
        let (head, body) = head_and_body(&out);
        assert!(head.starts_with(proto), "{flag}: ALPN chose {head:?}");
        assert!(
            !head.to_ascii_lowercase().contains("x-mesh-endpoint"),
            "outside clients get no mesh internals: {head}"
        );
        let j = json(body);
        assert_eq!(j["app"], "node");
        assert_eq!(j["url"], "/hello?q=1");
        assert_eq!(
            j["hosts"],
            serde_json::json!([format!("shop.example.com:{}", https.port())])
        );
        assert_eq!(j["forwarded_for"], "127.0.0.1");
        assert_eq!(j["forwarded_proto"], "https");
        assert_eq!(j["mesh_debug"], serde_json::Value::Null);
        let xfcc = j["xfcc"].as_str().unwrap_or_default();
        assert!(
            xfcc.contains("URI=spiffe://mesh.local/ns/default/sa/edge"),
            "the app sees the gateway's mesh identity: {xfcc:?}"
        );
    }
    // A longer path on the same host goes to `api` (Python), with the rule's header edit.
    let (status, out) = curl_https(
        https,
        &ca_file,
        "shop.example.com",
        "/hello/py/items",
        &["-i"],
    )
    .await?;
    assert_eq!(status, 200, "{out}");
    let (head, body) = head_and_body(&out);
    assert!(
        head.to_ascii_lowercase()
            .contains("x-served-by: gateway-rule"),
        "{head}"
    );
    assert_eq!(json(body)["app"], "python");
    // The second certificate (a wildcard), chosen by SNI.
    let (status, body) = curl_https(https, &ca_file, "shop.example.org", "/hello", &[]).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["app"], "python");
    // A name neither certificate holds: the first is served, which curl refuses.
    let (status, _) = curl_https(https, &ca_file, "nope.example.net", "/", &[]).await?;
    assert_eq!(
        status, 0,
        "a certificate for another name must fail verification"
    );
    // Accepted anyway (-k), a host no rule names is 404 `no-route`.
    let (status, out) = curl_https(https, &ca_file, "nope.example.net", "/", &["-k", "-i"]).await?;
    assert_eq!(status, 404, "{out}");
    assert!(out.contains("x-mesh-error: no-route"), "{out}");

    // The plaintext listener redirects to HTTPS, keeping host and target.
    let url = format!("http://{http}/a/b?c=d");
    let (status, out) = curl(&["-i", "-H", "Host: shop.example.com", &url]).await?;
    assert_eq!(status, 301, "{out}");
    let location = format!(
        "location: https://shop.example.com:{}/a/b?c=d",
        https.port()
    );
    assert!(out.to_ascii_lowercase().contains(&location), "{out}");
    // ... and curl following it lands on the app.
    let resolve = format!("shop.example.com:{}:127.0.0.1", http.port());
    let resolve_tls = format!("shop.example.com:{}:127.0.0.1", https.port());
    let plain = format!("http://shop.example.com:{}/hello", http.port());
    let ca_s = ca_file.display().to_string();
    let (status, body) = curl(&[
        "-L",
        "--cacert",
        &ca_s,
        "--resolve",
        &resolve,
        "--resolve",
        &resolve_tls,
        &plain,
    ])
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["app"], "node");

    // gRPC over TLS: grpcurl with the operator CA and SNI.
    let (ok, out, err) = peers::grpcurl_with(
        &[
            "-cacert",
            &ca_s,
            "-servername",
            "grpc.example.net",
            "-authority",
            "grpc.example.net",
        ],
        https,
        "Unary",
        r#"{"message":"through the edge"}"#,
    )
    .await?;
    // grpc.example.net is in no certificate: grpcurl must refuse it...
    assert!(
        !ok,
        "grpcurl accepted a certificate for another name: {out}"
    );
    let (ok, out, err2) = peers::grpcurl_with(
        &[
            "-insecure",
            "-servername",
            "grpc.example.net",
            "-authority",
            "grpc.example.net",
        ],
        https,
        "Unary",
        r#"{"message":"through the edge"}"#,
    )
    .await?;
    assert!(ok, "grpcurl: {err} / {err2}");
    assert!(out.contains("through the edge"), "{out}");

    // h2load over TLS with SNI: every request answered.
    let target = format!("127.0.0.1:{}", https.port());
    let url = format!("https://shop.example.com:{}/hello", https.port());
    let (sum, text) =
        peers::h2load_with(&["-n", "400", "--connect-to", &target], &url, 4, 8).await?;
    assert_eq!((sum.succeeded, sum.status_2xx), (400, 400), "{text}");

    // The certificate replaced on disk (a new CA's): h2load's connections, open across the
    // change, lose nothing; new handshakes get the new certificate.
    let ca2 = TestCa::new("operator CA 2")?;
    let ca2_file = ca2.write(&dir.join("ca2.pem"))?;
    let run = tokio::spawn({
        let (url, target) = (url.clone(), target.clone());
        async move { peers::h2load_with(&["-D", "4", "--connect-to", &target], &url, 2, 4).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (new_crt, new_key) = ca2.leaf(&dir, "shop-new", &["shop.example.com"])?;
    // Key first, then the certificate: a half-done pair is not taken.
    std::fs::copy(&new_key, &shop_key)?;
    std::fs::copy(&new_crt, &shop_crt)?;
    until(
        Duration::from_secs(10),
        "the new certificate served",
        || {
            let ca2_file = ca2_file.clone();
            async move {
                let (s, _) =
                    curl_https(https, &ca2_file, "shop.example.com", "/hello", &[]).await?;
                Ok(s == 200)
            }
        },
    )
    .await?;
    let (sum, text) = run.await??;
    assert!(sum.done > 0, "{text}");
    assert_eq!(
        (sum.failed, sum.errored),
        (0, 0),
        "connections across the reload: {text}"
    );
    let (status, _) = curl_https(https, &ca_file, "shop.example.com", "/hello", &[]).await?;
    assert_eq!(status, 0, "the old certificate is gone");
    Ok(())
}

/// The gateway is a mesh identity: authorization rules name it, and its policy limits clients
/// by a header (or their address). Its requests are in its metrics as a sidecar's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_named_by_authorization_and_limits_its_clients() -> anyhow::Result<()> {
    let otlp = mesh_tests::otlp::OtlpReceiver::start().await?;
    let url = otlp.url();
    let mut mesh = Mesh::start().await?;
    let access_log = mesh.data_dir().join("gateway-access.log");
    let log_flag = access_log.display().to_string();
    let (ca_file, certs) = operator_cert(&mesh, "shop.example.com")?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("web", node, &["--otlp-endpoint", &url]).await?;
    let gw = gateway(
        &mut mesh,
        &certs,
        &["--otlp-endpoint", &url, "--access-log", &log_flag],
    )
    .await?;
    let https = gw.gateway_https.expect("HTTPS listener");
    let caller = mesh.client("batch").await?;
    mesh.wait_endpoints("web", 1).await?;
    gateway_rule(
        &mesh,
        &gw,
        "shop",
        &["--match", "host:shop.example.com", "--to", "svc/web"],
    )
    .await?;

    // Only the gateway may call `web`.
    mesh.meshctl(&[
        "authz",
        "set",
        "web",
        "--rule",
        "allow name=from-edge from=ns/default/sa/edge",
    ])
    .await?;
    mesh.meshctl(&["authz", "default", "default", "deny-all"])
        .await?;
    let direct = h1_client(caller.outbound);
    until(Duration::from_secs(10), "web's rules in force", || {
        let direct = direct.clone();
        async move {
            let r = get(&direct, "http://web/hello").await?;
            Ok(r.status == 403)
        }
    })
    .await?;
    let (status, body) = curl_https(https, &ca_file, "shop.example.com", "/traced", &[]).await?;
    assert_eq!(
        status, 404,
        "the gateway is allowed (the app has no /traced): {body}"
    );

    // A trace starts at the gateway: its span has no parent, and web's inbound span is its
    // child. The access log has the request, with the client's address.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (root, child) = loop {
        let spans = otlp.spans();
        let root = spans
            .iter()
            .find(|s| {
                s.service == "edge" && s.attributes.get("url.path").is_some_and(|p| p == "/traced")
            })
            .cloned();
        let child = root.as_ref().and_then(|r| {
            spans
                .iter()
                .find(|s| s.service == "web" && s.trace_id == r.trace_id)
                .cloned()
        });
        if let (Some(r), Some(c)) = (root, child) {
            break (r, c);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no gateway trace: {:#?}",
            otlp.spans()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        root.parent_span_id, "",
        "the trace starts at the gateway: {root:#?}"
    );
    assert_eq!(child.parent_span_id, root.span_id, "{child:#?}");
    // The access log is written in the background: waited for.
    until(
        Duration::from_secs(10),
        "the gateway's access-log line",
        || {
            let log = std::fs::read_to_string(&access_log).unwrap_or_default();
            async move { Ok(log.lines().any(|l| l.contains("/traced"))) }
        },
    )
    .await?;
    let log = std::fs::read_to_string(&access_log)?;
    let line = log.lines().find(|l| l.contains("/traced")).unwrap_or("");
    assert!(line.contains("\"status\":404"), "{line}");

    // Each client (by x-api-key) gets 3 requests in a burst; another key is not affected.
    mesh.set_policy(
        gw.admin,
        "edge",
        &[
            "--inbound-rate-limit-per-caller",
            "1/s,burst=3",
            "--client-header",
            "x-api-key",
        ],
        &["client_header: Some"],
    )
    .await?;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (s, _) = curl_https(
            https,
            &ca_file,
            "shop.example.com",
            "/hello",
            &["-H", "x-api-key: alice"],
        )
        .await?;
        codes.push(s);
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 3, "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");
    let (s, _) = curl_https(
        https,
        &ca_file,
        "shop.example.com",
        "/hello",
        &["-H", "x-api-key: bob"],
    )
    .await?;
    assert_eq!(s, 200, "another client's budget is its own");

    // The gateway's own metrics count its requests as `web`'s, as Istio's gateway does.
    let m = admin_get(gw.admin, "/metrics").await?;
    let rows = samples(
        &m.text,
        "istio_requests_total",
        &[
            "destination_service",
            "destination_principal",
            "response_code",
        ],
        &[("reporter", "source"), ("source_workload", "edge")],
    )?;
    let ok = rows
        .get(&vec![
            "web.default.svc.cluster.local".to_string(),
            "spiffe://mesh.local/ns/default/sa/web".to_string(),
            "200".to_string(),
        ])
        .copied()
        .unwrap_or(0.0);
    // alice's 3 and bob's 1 (the 429s never reached a service).
    assert_eq!(ok, 4.0, "gateway metrics: {rows:?}");
    Ok(())
}

/// On Kubernetes the gateway is configured by Gateway API: an HTTPRoute whose parentRef is the
/// Gateway `edge` (group and kind defaulted, as kubectl users write it) routes the gateway's
/// hosts and paths to Services, and its status says Accepted under this controller. Before the
/// gateway's proxy has started, the route is refused in status, saying so; it is taken as soon
/// as the gateway declares itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_httproutes_configure_the_gateway() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(Vec::new()).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let (ca_file, certs) = operator_cert(&mesh, "shop.example.com")?;
    let node = peers::node_app(&mut mesh).await?;
    let py = peers::python_app(&mut mesh).await?;
    mesh.front("web", node, &[]).await?;
    mesh.front("api", py, &[]).await?;
    mesh.wait_endpoints("web", 1).await?;
    mesh.wait_endpoints("api", 1).await?;

    let route = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "shop", "namespace": "default", "generation": 1,
                     "creationTimestamp": "2026-12-07T10:00:00Z"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "hostnames": ["shop.example.com"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/hello/py"}}],
                 "backendRefs": [{"name": "api", "port": 80}]},
                {"filters": [{"type": "ResponseHeaderModifier",
                              "responseHeaderModifier": {"set": [{"name": "x-route", "value": "shop"}]}}],
                 "backendRefs": [{"name": "web", "port": 80}]}
            ]
        }
    });
    api.apply(Kind::HttpRoute, "ADDED", route);
    // The Gateway object: class mesh, one HTTPS listener for the shop's host.
    api.apply(
        Kind::Gateway,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "default", "generation": 1},
            "spec": {"gatewayClassName": "mesh", "listeners": [
                {"name": "https", "hostname": "shop.example.com", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-tls"}]}}]}
        }),
    );
    let gateway_status = |api: &FakeKubeApi| -> (String, u64) {
        let o = api
            .object(Kind::Gateway, "default", "edge")
            .unwrap_or_default();
        let programmed = o["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Programmed")
            .and_then(|c| c["status"].as_str())
            .unwrap_or("")
            .to_string();
        let attached = o["status"]["listeners"][0]["attachedRoutes"]
            .as_u64()
            .unwrap_or(0);
        (programmed, attached)
    };
    until(
        Duration::from_secs(10),
        "the Gateway not yet programmed",
        || {
            let g = gateway_status(&api);
            async move { Ok(g.0 == "False") }
        },
    )
    .await?;
    let conditions = |api: &FakeKubeApi| -> Vec<(String, String, String)> {
        let o = api
            .object(Kind::HttpRoute, "default", "shop")
            .unwrap_or_default();
        o["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["controllerName"] == "mesh.io/mesh-controller")
            .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["type"] == "Accepted")
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    until(
        Duration::from_secs(10),
        "the route refused: no gateway yet",
        || {
            let c = conditions(&api);
            async move {
                Ok(c.iter()
                    .any(|(s, _, m)| s == "False" && m.contains("no gateway proxy yet")))
            }
        },
    )
    .await?;

    let gw = gateway(&mut mesh, &certs, &[]).await?;
    let https = gw.gateway_https.expect("HTTPS listener");
    until(Duration::from_secs(10), "the route accepted", || {
        let c = conditions(&api);
        async move { Ok(c.iter().any(|(s, r, _)| s == "True" && r == "Accepted")) }
    })
    .await?;
    wait_config(gw.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "edge").len() == 2
    })
    .await?;
    let (status, out) = curl_https(
        https,
        &ca_file,
        "shop.example.com",
        "/hello",
        &["--http2", "-i"],
    )
    .await?;
    assert_eq!(status, 200, "{out}");
    let (head, body) = head_and_body(&out);
    assert!(head.contains("x-route: shop"), "{head}");
    assert_eq!(json(body)["app"], "node");
    let (status, body) = curl_https(https, &ca_file, "shop.example.com", "/hello/py", &[]).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["app"], "python");
    // A host the route does not name.
    let (status, out) = curl_https(
        https,
        &ca_file,
        "other.example.com",
        "/hello",
        &["-k", "-i"],
    )
    .await?;
    assert_eq!(status, 404, "{out}");

    // The Gateway is programmed, with the one route attached.
    until(Duration::from_secs(10), "the Gateway programmed", || {
        let g = gateway_status(&api);
        async move { Ok(g == ("True".to_string(), 1)) }
    })
    .await?;

    // A route for a host the Gateway's listeners do not take is refused, saying so; the
    // route in force stays.
    api.apply(
        Kind::HttpRoute,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "stray", "namespace": "default", "generation": 1,
                         "creationTimestamp": "2026-12-07T11:00:00Z"},
            "spec": {"parentRefs": [{"name": "edge"}], "hostnames": ["other.example.net"],
                     "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
        }),
    );
    until(Duration::from_secs(10), "the stray route refused", || {
        let o = api
            .object(Kind::HttpRoute, "default", "stray")
            .unwrap_or_default();
        async move {
            Ok(o["status"]
                .to_string()
                .contains("NoMatchingListenerHostname"))
        }
    })
    .await?;
    let (status, body) = curl_https(https, &ca_file, "shop.example.com", "/hello/py", &[]).await?;
    assert_eq!(status, 200, "{body}");
    api.apply(
        Kind::HttpRoute,
        "DELETED",
        api.object(Kind::HttpRoute, "default", "stray")
            .unwrap_or_default(),
    );

    // A second replica of the same gateway (behind a balancer, each its own address) serves
    // the same route, and the route stays accepted.
    let gw2 = gateway_replica(&mut mesh, "edge-2", &certs, &[]).await?;
    let https2 = gw2.gateway_https.expect("HTTPS listener");
    wait_config(gw2.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "edge").len() == 2
    })
    .await?;
    for addr in [https, https2] {
        let (status, body) =
            curl_https(addr, &ca_file, "shop.example.com", "/hello/py", &[]).await?;
        assert_eq!(status, 200, "{addr}: {body}");
        assert_eq!(json(&body)["app"], "python");
    }
    assert!(
        conditions(&api)
            .iter()
            .any(|(s, r, _)| s == "True" && r == "Accepted")
    );
    Ok(())
}

/// On a VM the gateway runs from the settings file shipped in deploy/systemd/ (the unit
/// `mesh-proxy@edge`), nothing on its command line but `--config-file` and no MESH_*
/// environment: it declares itself, serves its route over TLS, and its plaintext listener
/// redirects to the balancer's port 443 (no port in the location).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_from_the_shipped_config_file() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (ca_file, certs) = operator_cert(&mesh, "shop.example.com")?;
    let dir = mesh.data_dir().join("gateway-pki");
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("web", node, &[]).await?;
    let token_file = dir.join("edge.token");
    std::fs::write(&token_file, mesh.token("edge").await?)?;
    let (https, http) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let ours = [
        ("MESH_CONTROL_PLANE", format!("https://{}", mesh.grpc)),
        (
            "MESH_CA_FILE",
            mesh.data_dir().join("ca/bundle.pem").display().to_string(),
        ),
        ("MESH_TOKEN_FILE", token_file.display().to_string()),
        ("MESH_GATEWAY_HTTPS_ADDR", https.to_string()),
        ("MESH_GATEWAY_HTTP_ADDR", http.to_string()),
        ("MESH_GATEWAY_CERT", certs),
        ("MESH_OUTBOUND_ADDR", "127.0.0.1:0".into()),
        ("MESH_ADMIN_ADDR", "127.0.0.1:0".into()),
    ];
    let file = dir.join("proxy-edge.env");
    std::fs::write(&file, shipped_config("proxy-edge.env", &ours)?)?;
    let mut cmd = tokio::process::Command::new(bin_dir().join("mesh-proxy"));
    cmd.arg("--config-file")
        .arg(&file)
        .env_clear()
        .env("RUST_LOG", "info")
        .stderr(mesh.log("edge-file-proxy")?);
    let (p, ready) = process::Process::spawn_ready("edge gateway", cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    assert_eq!(ready["gateway_https"], https.to_string(), "{ready}");
    mesh.wait_endpoints("web", 1).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The route can be set once the gateway has declared its service.
        let (code, _, err) = mesh
            .meshctl_exit(&[
                "route",
                "set",
                "edge",
                "--name",
                "shop",
                "--match",
                "host:shop.example.com",
                "--to",
                "svc/web",
            ])
            .await?;
        if code == 0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "route set: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(
        Duration::from_secs(10),
        "the gateway serving its route",
        || {
            let ca_file = ca_file.clone();
            async move {
                let (s, _) = curl_https(https, &ca_file, "shop.example.com", "/hello", &[]).await?;
                Ok(s == 200)
            }
        },
    )
    .await?;
    let url = format!("http://{http}/a?b=c");
    let (status, out) = curl(&["-i", "-H", "Host: shop.example.com", &url]).await?;
    assert_eq!(status, 301, "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("location: https://shop.example.com/a?b=c"),
        "{out}"
    );
    Ok(())
}

/// The gateway's route and policy are the mesh's: a weighted split across two services, a
/// mirror to a third, a rule's timeout, a rule's retries, and a per-client limit keyed by the
/// client's address (no header named), all at the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_splits_mirrors_times_out_retries_and_limits_by_address() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (ca_file, certs) = operator_cert(&mesh, "shop.example.com")?;
    let (node, py, shadow) = (
        peers::node_app(&mut mesh).await?,
        peers::python_app(&mut mesh).await?,
        peers::node_app(&mut mesh).await?,
    );
    mesh.front("web", node, &[]).await?;
    mesh.front("api", py, &[]).await?;
    mesh.front("shadow", shadow, &[]).await?;
    // Node's capacity app, every request taking a second before its head.
    let slow = peers::capacity_app(&mut mesh, 8, 1, 100.0).await?;
    mesh.front("slow", slow, &[]).await?;
    let gw = gateway(&mut mesh, &certs, &[]).await?;
    let https = gw.gateway_https.expect("HTTPS listener");
    for s in ["web", "api", "shadow", "slow"] {
        mesh.wait_endpoints(s, 1).await?;
    }
    // Half and half between two services, every request copied to a third.
    gateway_rule(
        &mesh,
        &gw,
        "shop",
        &[
            "--match",
            "host:shop.example.com",
            "--to",
            "svc/web=50,svc/api=50",
            "--mirror",
            "svc/shadow@100%",
        ],
    )
    .await?;
    let count = |app: SocketAddr| async move {
        let (_, body) = curl(&[&format!("http://{app}/count")]).await?;
        body.trim()
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("{body:?}: {e}"))
    };
    let before = count(shadow).await?;
    let mut by_app = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..40 {
        let (status, body) = curl_https(https, &ca_file, "shop.example.com", "/hello", &[]).await?;
        assert_eq!(status, 200, "{body}");
        *by_app
            .entry(json(&body)["app"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    let (n, p) = (
        by_app.get("node").copied().unwrap_or(0),
        by_app.get("python").copied().unwrap_or(0),
    );
    assert!(n + p == 40 && (8..=32).contains(&n), "split: {by_app:?}");
    until(
        Duration::from_secs(10),
        "the mirror's copies",
        || async move { Ok(count(shadow).await? >= before + 40) },
    )
    .await?;

    // A rule's own timeout: the slow app answers after 1 s, the rule allows 300 ms.
    gateway_rule(
        &mesh,
        &gw,
        "slow",
        &[
            "--match",
            "host:shop.example.com",
            "--match",
            "prefix:/stall",
            "--to",
            "svc/slow",
        ],
    )
    .await?;
    mesh.set_policy(
        gw.admin,
        "edge",
        &["--route", "slow", "--timeout", "300ms"],
        &[],
    )
    .await?;
    until(Duration::from_secs(10), "the rule's timeout", || {
        let ca_file = ca_file.clone();
        async move {
            let (s, out) =
                curl_https(https, &ca_file, "shop.example.com", "/stall", &["-i"]).await?;
            Ok(s == 504 && out.contains("x-mesh-error: timeout"))
        }
    })
    .await?;

    // Retries: an app failing half of its requests (the example app's /admin/sick/50), a rule
    // retrying 5xx up to 3 times: every request answered.
    let (flaky, _) = mesh.workload_app("flaky", "v1").await?;
    mesh.wait_endpoints("flaky", 1).await?;
    admin_get(flaky, "/admin/sick/50").await?;
    gateway_rule(
        &mesh,
        &gw,
        "flaky",
        &[
            "--match",
            "host:shop.example.com",
            "--match",
            "prefix:/flaky",
            "--to",
            "svc/flaky",
        ],
    )
    .await?;
    mesh.set_policy(
        gw.admin,
        "edge",
        &["--route", "flaky", "--retries", "3", "--retry-on", "5xx"],
        &[],
    )
    .await?;
    until(Duration::from_secs(10), "the rule's retries", || {
        let ca_file = ca_file.clone();
        async move {
            for _ in 0..20 {
                let (s, _) = curl_https(https, &ca_file, "shop.example.com", "/flaky", &[]).await?;
                if s != 200 {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await?;

    // Each client address gets 3 in a burst.
    mesh.set_policy(
        gw.admin,
        "edge",
        &["--inbound-rate-limit-per-caller", "1/s,burst=3"],
        &["rate_inbound_per_caller: Some"],
    )
    .await?;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (s, _) = curl_https(https, &ca_file, "shop.example.com", "/hello", &[]).await?;
        codes.push(s);
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 3, "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");
    Ok(())
}

/// A GRPCRoute on the Gateway: gRPC calls of one service, by method, go to the service its
/// backendRef names; grpcurl over TLS (the operator CA, SNI) gets the answer, and a method of
/// another service gets UNIMPLEMENTED from the gateway (`no-route`; curl as the gRPC caller,
/// since grpcurl refuses a method its proto lacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcroute_on_the_gateway_routes_grpc_by_method() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(Vec::new()).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let (ca_file, certs) = operator_cert(&mesh, "grpc.example.com")?;
    mesh.workload("echo", "v1").await?;
    mesh.wait_endpoints("echo", 1).await?;
    let gw = gateway(&mut mesh, &certs, &[]).await?;
    let https = gw.gateway_https.expect("HTTPS listener");
    api.apply(
        Kind::GrpcRoute,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "echo", "namespace": "default", "generation": 1,
                         "creationTimestamp": "2026-12-07T12:00:00Z"},
            "spec": {
                "parentRefs": [{"name": "edge"}],
                "hostnames": ["grpc.example.com"],
                "rules": [{"matches": [{"method": {"service": "mesh.example.v1.Echo"}}],
                           "backendRefs": [{"name": "echo", "port": 8080}]}]
            }
        }),
    );
    wait_config(gw.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "edge").len() == 1
    })
    .await?;
    let ca_s = ca_file.display().to_string();
    let flags = ["-cacert", ca_s.as_str(), "-authority", "grpc.example.com"];
    let (ok, out, err) =
        peers::grpcurl_with(&flags, https, "Unary", r#"{"message":"by method"}"#).await?;
    assert!(ok, "grpcurl: {err}");
    assert!(out.contains("by method"), "{out}");
    // Another service's method (curl speaking gRPC's framing): no rule takes it, and the
    // gateway answers UNIMPLEMENTED, saying why.
    let (_, out) = curl_https(
        https,
        &ca_file,
        "grpc.example.com",
        "/grpc.health.v1.Health/Check",
        &[
            "--http2",
            "-i",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
        ],
    )
    .await?;
    assert!(out.contains("grpc-status: 12"), "{out}");
    assert!(out.contains("x-mesh-error: no-route"), "{out}");
    Ok(())
}

/// Clients the gateway had not met: a WebSocket client (the `websockets` library) over
/// `wss://` to a WebSocket app behind its sidecar, and Envoy as an outside load balancer in
/// front of the gateway, originating TLS to it over HTTP/2 with the host's SNI, as a cloud
/// balancer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_and_an_outside_envoy_cross_the_gateway() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (ca, certs) = operator_cert(&mesh, "shop.example.com")?;
    let ws = peers::websocket_app(&mut mesh).await?;
    mesh.front("chat", ws, &[]).await?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("web", node, &[]).await?;
    let gw = gateway(&mut mesh, &certs, &[]).await?;
    let https = gw.gateway_https.expect("the gateway's HTTPS listener");
    mesh.wait_endpoints("chat", 1).await?;
    mesh.wait_endpoints("web", 1).await?;
    gateway_rule(
        &mesh,
        &gw,
        "chat",
        &[
            "--match",
            "host:shop.example.com",
            "--match",
            "prefix:/room",
            "--to",
            "svc/chat",
        ],
    )
    .await?;
    gateway_rule(
        &mesh,
        &gw,
        "shop",
        &["--match", "host:shop.example.com", "--to", "svc/web"],
    )
    .await?;

    // The WebSocket handshake (HTTP/1.1 Upgrade over TLS) and two messages each way. The
    // sidecars' logs are shown when it fails (a test that returns an error does not panic,
    // which is when `Mesh` shows them by itself).
    let answers = peers::websocket_client_via(
        &format!("wss://shop.example.com:{}/room", https.port()),
        Some((https, &ca)),
        &["hello", "second"],
    )
    .await
    .inspect_err(|_| mesh.dump_logs())?;
    assert_eq!(answers, ["echo:hello", "echo:second"]);

    // Envoy takes plaintext from the client and sends to the gateway over TLS (SNI and
    // certificate checked against the operator CA), HTTP/2 by ALPN.
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        r#"static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {front_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: gateway}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: gateway
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: gateway, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {gw_port}}}}}}}}}]}}]}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: shop.example.com
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: shop.example.com}}}}]
"#,
        front_port = front.port(),
        gw_port = https.port(),
        ca = ca.display(),
    );
    peers::envoy(&mut mesh, &config, &[front]).await?;
    let (status, body) = curl(&[
        "-H",
        "Host: shop.example.com",
        &format!("http://{front}/hello?via=envoy"),
    ])
    .await?;
    assert_eq!(status, 200, "{body}");
    let j = json(&body);
    assert_eq!(j["app"], "node", "{body}");
    assert_eq!(j["url"], "/hello?via=envoy", "{body}");
    assert_eq!(
        j["hosts"],
        serde_json::json!(["shop.example.com"]),
        "{body}"
    );
    // Envoy's hop to the gateway was TLS: the gateway says so to the app.
    assert_eq!(j["forwarded_proto"], "https", "{body}");
    Ok(())
}

/// A Gateway object of class mesh gets its gateway proxies from the control plane: a
/// ServiceAccount, a LoadBalancer Service with the listeners' ports, and a Deployment whose
/// container, run as the kubelet runs it (its environment, its mounted Secret, trust bundle
/// and token), serves the HTTPS listener's port with the Secret's certificate, redirects the
/// HTTP listener's port to it, and routes the HTTPRoute attached to the Gateway. A listener it
/// cannot serve says why in the Gateway's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_object_gets_its_proxies_from_the_control_plane() -> anyhow::Result<()> {
    use mesh_tests::kube_api::{FakeKubeApi, Kind};
    let api = FakeKubeApi::start(Vec::new()).await?;
    let mut mesh = Mesh::start_with(&["--kube-api", &api.url]).await?;
    let dir = mesh.data_dir().join("gateway-pki");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("operator CA")?;
    let ca_file = ca.write(&dir.join("ca.pem"))?;
    let (crt, key) = ca.leaf(&dir, "shop", &["shop.example.com"])?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("web", node, &[]).await?;
    mesh.wait_endpoints("web", 1).await?;

    let (https, http) = (free_port(), free_port());
    api.apply(
        Kind::Gateway,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "default", "generation": 1, "uid": "gw-1"},
            "spec": {"gatewayClassName": "mesh", "listeners": [
                {"name": "https", "hostname": "shop.example.com", "port": https, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-tls"}]}},
                {"name": "http", "hostname": "shop.example.com", "port": http, "protocol": "HTTP"},
                {"name": "postgres", "port": 5432, "protocol": "TCP"}]}
        }),
    );
    api.apply(
        Kind::HttpRoute,
        "ADDED",
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "shop", "namespace": "default", "generation": 1,
                         "creationTimestamp": "2026-12-07T10:00:00Z"},
            "spec": {"parentRefs": [{"name": "edge"}],
                     "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
        }),
    );

    let deployment_path = "/apis/apps/v1/namespaces/default/deployments/edge-mesh";
    until(
        Duration::from_secs(10),
        "the Gateway's Deployment, Service and ServiceAccount applied",
        || {
            let done = api.applied(deployment_path).is_some()
                && api.object(Kind::Service, "default", "edge").is_some()
                && api
                    .applied("/api/v1/namespaces/default/serviceaccounts/edge")
                    .is_some();
            async move { Ok(done) }
        },
    )
    .await?;
    let service = api
        .object(Kind::Service, "default", "edge")
        .unwrap_or_default();
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    let ports: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(ports, [u64::from(https), u64::from(http)]);
    let deployment = api.applied(deployment_path).unwrap_or_default();
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "gw-1");
    // The TCP listener is not served, and the status says so in Gateway API's terms.
    let listener_condition = |name: &str, t: &str| -> (String, String) {
        let g = api
            .object(Kind::Gateway, "default", "edge")
            .unwrap_or_default();
        g["status"]["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["name"] == name)
            .flat_map(|l| l["conditions"].as_array().cloned().unwrap_or_default())
            .find(|c| c["type"] == t)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .unwrap_or_default()
    };
    until(
        Duration::from_secs(10),
        "the TCP listener refused in status",
        || {
            let c = listener_condition("postgres", "Accepted");
            async move { Ok(c == ("False".to_string(), "UnsupportedProtocol".to_string())) }
        },
    )
    .await?;

    // The kubelet's part: the Deployment's container with the Secret `shop-tls` mounted.
    let secrets = mesh_tests::kubelet::Secrets::from([(
        "shop-tls".to_string(),
        vec![
            ("tls.crt".to_string(), std::fs::read(&crt)?),
            ("tls.key".to_string(), std::fs::read(&key)?),
        ],
    )]);
    let ready = mesh_tests::kubelet::run_deployment(&mut mesh, &deployment, &secrets).await?;
    assert_eq!(
        ready["gateway_https"].as_str(),
        Some(format!("127.0.0.1:{https}").as_str()),
        "{ready}"
    );
    until(
        Duration::from_secs(10),
        "the Gateway programmed, its HTTPS listener with the route attached",
        || {
            let ok = listener_condition("https", "Programmed").0 == "True";
            async move { Ok(ok) }
        },
    )
    .await?;
    let https_addr = SocketAddr::from(([127, 0, 0, 1], https));
    let mut answered = false;
    for _ in 0..100 {
        let (status, out) = curl_https(
            https_addr,
            &ca_file,
            "shop.example.com",
            "/hello?from=gateway-object",
            &["-i"],
        )
        .await?;
        if status == 200 {
            let (_, body) = head_and_body(&out);
            let j = json(body);
            assert_eq!(j["app"], "node");
            assert_eq!(j["url"], "/hello?from=gateway-object");
            assert_eq!(j["forwarded_proto"], "https");
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered,
        "the route never answered through the Gateway's proxy"
    );
    // The HTTP listener's port sends to the HTTPS one.
    let (status, out) = curl(&[
        "-i",
        "--resolve",
        &format!("shop.example.com:{http}:127.0.0.1"),
        &format!("http://shop.example.com:{http}/hello"),
    ])
    .await?;
    assert_eq!(status, 301, "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("location: https://shop.example.com:{https}/hello")),
        "{out}"
    );
    Ok(())
}
