//! End-to-end tests with apps and callers the project did not write (tests/src/peers.rs):
//! what reaches a strict app through the sidecar pair is what a direct call would have sent.
//! Node.js's `http` module refuses an HTTP/1.1 request without Host; Python's `http.server`
//! takes an absolute-form target for the path; nginx speaks only h2c on its port and closes
//! connections with GOAWAY; Python's `websockets` checks the upgrade handshake; curl and
//! h2load call.

use mesh_tests::peers::{self, curl};
use mesh_tests::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Issue 24 item 1: Node's and Python's HTTP/1.1 servers get origin-form and exactly one Host
/// naming the service, whether the caller used the outbound port as an HTTP proxy
/// (absolute-form), a fixed `--upstream` port (origin-form), or h2c; the app also learns the
/// caller's verified identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_apps_receive_origin_form_and_one_host() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let node = peers::node_app(&mut mesh).await?;
    let py = peers::python_app(&mut mesh).await?;
    mesh.front("nodeapp", node, &[]).await?;
    mesh.front("pyapp", py, &[]).await?;
    let (c, fixed) = mesh.client_with_upstream("nodeapp").await?;
    mesh.wait_endpoints("nodeapp", 1).await?;
    mesh.wait_endpoints("pyapp", 1).await?;
    let proxy = format!("http://{}", c.outbound);

    for (service, app) in [("nodeapp", "node"), ("pyapp", "python")] {
        let url = format!("http://{service}/hello?x=1");
        let (status, body) = curl(&["-x", &proxy, &url]).await?;
        assert_eq!(status, 200, "{service} through http_proxy: {body}");
        let j = json(&body);
        assert_eq!(j["app"], app);
        assert_eq!(j["url"], "/hello?x=1", "origin-form target");
        assert_eq!(j["hosts"], serde_json::json!([service]), "one Host");
        assert_eq!(j["method"], "GET");
        let xfcc = j["xfcc"].as_str().unwrap_or_default();
        assert!(
            xfcc.contains("URI=spiffe://mesh.local/ns/default/sa/caller"),
            "caller identity: {xfcc:?}"
        );
    }

    // Origin-form to the fixed port, HTTP/1.1 and h2c (prior knowledge): the HTTP/1.1-only
    // Node app answers both, and sees the authority the caller used.
    let url = format!("http://{fixed}/hello");
    for flags in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let mut args = flags.to_vec();
        args.push(&url);
        let (status, body) = curl(&args).await?;
        assert_eq!(status, 200, "{flags:?}: {body}");
        let j = json(&body);
        assert_eq!(j["url"], "/hello", "{flags:?}");
        assert_eq!(j["version"], "1.1", "{flags:?}");
        assert_eq!(
            j["hosts"],
            serde_json::json!([fixed.to_string()]),
            "{flags:?}"
        );
    }
    Ok(())
}

/// Sends raw bytes to `addr`; returns everything it answered until it closed the connection.
async fn raw(addr: SocketAddr, request: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| anyhow::anyhow!("the proxy kept the connection open: {request:?}"))??;
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// The inbound sidecar closes an HTTP/1.1 connection to the app left unused for 3 s (swept
/// every second), before the app's own keep-alive timeout would: Node's `http` closes idle
/// connections after 5 s, and a request sent as it closes one would meet a closed connection
/// (RFC 9110 §9.2.2). Node tells which side closed: it saw the sidecar's FIN first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_app_connections_close_from_the_sidecar_before_the_apps_keepalive_timeout()
-> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("nodeapp", node, &[]).await?;
    let c = mesh.client("caller").await?;
    mesh.wait_endpoints("nodeapp", 1).await?;
    let proxy = format!("http://{}", c.outbound);
    let (status, body) = curl(&["-x", &proxy, "http://nodeapp/hello"]).await?;
    assert_eq!(status, 200, "{body}");
    // Asked of the app directly, on connections of the test's own (not counted by the app).
    let conns = || async {
        let out = raw(
            node,
            "GET /conns HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        anyhow::Ok(json(body))
    };
    let after = until(
        Duration::from_secs(8),
        "the app's connection closed after its request",
        || async { Ok(conns().await?["closed"].as_u64().unwrap_or(0) >= 1) },
    )
    .await?;
    let closed = conns().await?;
    assert_eq!(
        closed,
        serde_json::json!({"closed": 1, "closed_by_caller": 1}),
        "the sidecar, not the app's timeout, closed it ({after:?} after the request)"
    );
    assert!(
        after >= Duration::from_millis(2500),
        "kept until the idle timeout, not closed after the answer: {after:?}"
    );
    Ok(())
}

/// Issue 24 item 8: ambiguous framing (RFC 9112 §3.2, §6.3) is answered 400 with the
/// connection closed, and the app never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_before_the_app() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("nodeapp", node, &[]).await?;
    let c = mesh.client("caller").await?;
    mesh.wait_endpoints("nodeapp", 1).await?;
    for req in [
        "GET /hello HTTP/1.1\r\nHost: nodeapp\r\nHost: evil\r\n\r\n",
        "GET /hello HTTP/1.1\r\nHost: nodeapp\r\nHost: nodeapp\r\n\r\n",
        "GET /hello HTTP/1.1\r\n\r\n",
        "GET /hello HTTP/1.1\r\nHost: user@nodeapp\r\n\r\n",
        "POST /hello HTTP/1.0\r\nHost: nodeapp\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET /hello HTTP/1.1\r\nHost: nodeapp\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "GET /hello HTTP/1.1\r\nHost: nodeapp\r\nX: a\r\n b\r\n\r\n",
    ] {
        let answer = raw(c.outbound, req).await?;
        assert!(answer.starts_with("HTTP/1.1 400"), "{req:?} got {answer:?}");
    }
    // Content-Length beside Transfer-Encoding: hyper frames the body by Transfer-Encoding
    // alone, drops Content-Length, and closes the connection after answering, as RFC 9112
    // §6.3 (3) allows; `raw` returning at all shows the close. The app is asked below.
    let both = "POST /hello HTTP/1.1\r\nHost: nodeapp\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: nodeapp\r\n\r\n";
    let answer = raw(c.outbound, both).await?;
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled second request was not served: {answer:?}"
    );
    let (status, count) = curl(&[&format!("http://{node}/count")]).await?;
    assert_eq!(
        (status, count.trim()),
        (200, "1"),
        "the app saw only the TE-framed request: none of the refused ones"
    );
    // And a well-formed request still goes through.
    let answer = raw(
        c.outbound,
        "GET /hello HTTP/1.1\r\nHost: nodeapp\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    Ok(())
}

/// Issue 24 item 3: a WebSocket client and server that check the handshake talk through the
/// pair (client → outbound → mTLS → inbound → app), and `CONNECT service:port` through the
/// outbound port tunnels opaque TCP over mTLS to that port of the service's app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_connect_cross_the_pair() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let ws = peers::websocket_app(&mut mesh).await?;
    mesh.front("chat", ws, &[]).await?;
    let node = peers::node_app(&mut mesh).await?;
    mesh.front("nodeapp", node, &[]).await?;
    let (c, fixed) = mesh.client_with_upstream("chat").await?;
    mesh.wait_endpoints("chat", 1).await?;
    mesh.wait_endpoints("nodeapp", 1).await?;

    let answers =
        peers::websocket_client(&format!("ws://{fixed}/room"), &["hello", "second"]).await?;
    assert_eq!(answers, ["echo:hello", "echo:second"]);

    // curl's proxy tunnel: CONNECT nodeapp:<app port>, then plain HTTP inside it.
    let url = format!("http://nodeapp:{}/hello", node.port());
    let proxy = format!("http://{}", c.outbound);
    let (status, body) = curl(&["-p", "-x", &proxy, &url]).await?;
    assert_eq!(status, 200, "{body}");
    let j = json(&body);
    assert_eq!(
        j["hosts"],
        serde_json::json!([format!("nodeapp:{}", node.port())])
    );
    assert!(
        j["xfcc"].is_null(),
        "an opaque stream carries no headers of the proxy"
    );
    // The tunnel counts in Istio's TCP families at the caller's proxy, as an intercepted
    // opaque stream does: one stream closed, the request in, the answer (its body and head)
    // out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let tcp = |m: &str, name: &str| {
        samples(
            m,
            name,
            &[],
            &[
                ("reporter", "source"),
                ("destination_service_name", "nodeapp"),
            ],
        )
        .map(|s| s.values().sum::<f64>())
    };
    loop {
        let m = admin_get(c.admin, "/metrics").await?.text;
        if tcp(&m, "istio_tcp_connections_closed_total")? >= 1.0 {
            assert_eq!(tcp(&m, "istio_tcp_connections_opened_total")?, 1.0, "{m}");
            assert_eq!(tcp(&m, "istio_tcp_connections_closed_total")?, 1.0, "{m}");
            assert!(tcp(&m, "istio_tcp_received_bytes_total")? >= 40.0, "{m}");
            assert!(
                tcp(&m, "istio_tcp_sent_bytes_total")? > body.len() as f64,
                "{m}"
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the tunnel never counted as closed: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A CONNECT to a service the mesh does not know is refused, not passed through.
    let (status, _) = curl(&[
        "-w",
        "\n%{http_connect}",
        "-p",
        "-x",
        &proxy,
        "http://nosuch:80/",
    ])
    .await?;
    assert_eq!(status, 404);
    Ok(())
}

/// Issue 24 items 2 and 7: nginx speaking only h2c (declared `--app-protocol http2`) closes its
/// connection with GOAWAY after every 100 requests; under h2load through the pair no request
/// fails. An HTTP/1.1 caller reaches the same h2c-only app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_graceful_close_loses_no_request() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let nginx = peers::nginx_h2c(&mut mesh, 100).await?;
    mesh.front("web", nginx, &["--app-protocol", "http2"])
        .await?;
    let (_c, fixed) = mesh.client_with_upstream("web").await?;
    mesh.wait_endpoints("web", 1).await?;

    let (status, body) = curl(&["--http1.1", &format!("http://{fixed}/")]).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let n = 20_000;
    let (s, text) = peers::h2load(&format!("http://{fixed}/"), n, 4, 10, None).await?;
    assert_eq!(
        (s.done, s.succeeded, s.failed, s.errored, s.status_2xx),
        (n, n, 0, 0, n),
        "h2load GETs through the pair to nginx (GOAWAY every 100 requests):\n{text}"
    );
    // Requests with a body: what the GOAWAY left unprocessed goes again with its body.
    let data = mesh.dir.path().join("post.bin");
    std::fs::write(&data, vec![b'p'; 4096])?;
    let n = 10_000;
    let (s, text) = peers::h2load(&format!("http://{fixed}/"), n, 4, 10, Some(&data)).await?;
    assert_eq!(
        (s.done, s.succeeded, s.failed, s.errored, s.status_2xx),
        (n, n, 0, 0, n),
        "h2load POSTs through the pair to nginx (GOAWAY every 100 requests):\n{text}"
    );
    Ok(())
}

/// Reads from `s` until `want` has arrived (bounded by `within`).
async fn read_until(
    s: &mut tokio::net::TcpStream,
    want: &str,
    within: Duration,
) -> anyhow::Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = s.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "{want:?} not within {within:?}; got {:?}",
            String::from_utf8_lossy(&got)
        )
    })??;
    Ok(String::from_utf8_lossy(&got).to_string())
}

/// Issue 24 item 5: on a PERMISSIVE service, a plaintext client that does not speak HTTP
/// passes through to the app as TCP: a server-first protocol's greeting arrives after the
/// detection window (not never), and a client-first one is echoed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_plaintext_that_is_not_http_passes_through() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let banner = peers::banner_app(&mut mesh).await?;
    let s = mesh.front("smtp", banner, &[]).await?;
    let inbound = s.inbound.expect("inbound");
    mesh.wait_endpoints("smtp", 1).await?;
    mesh.meshctl(&["mtls", "smtp", "permissive"]).await?;
    wait_config(s.admin, Duration::from_secs(10), |d| {
        d["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "smtp" && s["mtls_permissive"] == true)
        })
    })
    .await?;

    // Server-first: the client waits for the greeting.
    let mut c = tokio::net::TcpStream::connect(inbound).await?;
    read_until(&mut c, "220 banner\r\n", Duration::from_secs(3)).await?;
    c.write_all(b"EHLO test\r\n").await?;
    read_until(&mut c, "EHLO test\r\n", Duration::from_secs(3)).await?;

    // Client-first, not HTTP.
    let mut c = tokio::net::TcpStream::connect(inbound).await?;
    c.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let got = read_until(&mut c, "PING\r\n", Duration::from_secs(3)).await?;
    assert!(got.starts_with("220 banner\r\n"), "{got:?}");
    Ok(())
}

/// Issue 24 item 2, the service's own setting: nginx speaks only h2c and its sidecar is told
/// nothing (`--app-protocol` left at detect), so an HTTP/1.1 caller's request reaches it as
/// HTTP/1.1 and fails. `meshctl protocol h2web <port>=http2` declares the app port in the
/// service's config: once pushed, the same request reaches nginx as HTTP/2 and succeeds, and
/// clearing the declaration brings detection back. A bad declaration is refused by meshctl with
/// the model's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_declared_app_protocol_decides_how_the_app_is_called() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let nginx = peers::nginx_h2c(&mut mesh, 1000).await?;
    mesh.front("h2web", nginx, &[]).await?;
    let (_c, fixed) = mesh.client_with_upstream("h2web").await?;
    mesh.wait_endpoints("h2web", 1).await?;
    let url = format!("http://{fixed}/");
    let h1_status = || async { Ok::<_, anyhow::Error>(curl(&["--http1.1", &url]).await?.0) };

    assert_eq!(
        h1_status().await?,
        502,
        "undeclared: HTTP/1.1 to an h2c-only app"
    );

    let bad = mesh
        .meshctl(&["protocol", "h2web", &format!("{}=h3", nginx.port())])
        .await
        .expect_err("h3 is not an app protocol");
    assert!(
        bad.to_string()
            .contains("unknown app protocol \"h3\": use http1, http2 or opaque"),
        "{bad}"
    );

    let declared = format!("{}=http2", nginx.port());
    mesh.meshctl(&["protocol", "h2web", &declared]).await?;
    until(
        Duration::from_secs(10),
        "the declaration reaches the app's sidecar",
        || async { Ok(h1_status().await? == 200) },
    )
    .await?;
    let (status, body) = curl(&["--http1.1", &url]).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = curl(&["--http2-prior-knowledge", &url]).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "h2c caller");

    let v = json(&mesh.meshctl(&["-o", "json", "services"]).await?);
    let svc = v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "h2web"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        svc["app_protocols"],
        serde_json::json!([{"port": nginx.port(), "protocol": "http2"}]),
        "{v}"
    );

    mesh.meshctl(&["protocol", "h2web"]).await?;
    until(
        Duration::from_secs(10),
        "the cleared declaration reaches the sidecar",
        || async { Ok(h1_status().await? == 502) },
    )
    .await?;
    Ok(())
}

/// An Envoy HTTP/2 cluster of `name` to `addr` (WebSockets to it go as extended CONNECT,
/// RFC 8441): h2c, or mTLS with the mesh certificate of
/// `cert` (files `<cert>.crt`/`.key` in `dir`) expecting the peer's SPIFFE id `peer_id`.
fn envoy_h2_cluster(
    name: &str,
    addr: SocketAddr,
    tls: Option<(&std::path::Path, &str, &str)>,
) -> String {
    let transport = match tls {
        None => String::new(),
        Some((dir, cert, peer_id)) => format!(
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
          # The mesh speaks TLS 1.3 only (as Linkerd); Envoy's upstream default stops at 1.2.
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          tls_certificates: [{{certificate_chain: {{filename: "{d}/{cert}.crt"}}, private_key: {{filename: "{d}/{cert}.key"}}}}]
          validation_context:
            trusted_ca: {{filename: "{d}/ca.pem"}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{peer_id}"}}}}]"#,
            d = dir.display()
        ),
    };
    format!(
        r#"
  - name: {name}
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{allow_connect: true}}}}{transport}
    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]}}"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// An Envoy HTTP/1.1 cluster of `name` to `addr` (plaintext).
fn envoy_h1_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]}}"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// An Envoy listener on `addr` sending every request to `cluster` (WebSocket upgrades too).
fn envoy_listener(name: &str, addr: SocketAddr, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          upgrade_configs: [{{upgrade_type: websocket}}]
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]"#,
        ip = addr.ip(),
        port = addr.port()
    )
}

/// Issue 24 "how it is shown", Envoy as a peer and as a caller:
/// - as a peer sidecar, Envoy calls our inbound over mTLS with its own mesh certificate and
///   HTTP/2, sending no hint of its caller's protocol; the HTTP/1.1-only Node app behind our
///   inbound answers GETs and a 100 kB POST, in origin-form with one Host, and learns Envoy's
///   SPIFFE identity;
/// - as a caller, Envoy speaks h2c to our outbound (an `--upstream` port), through the pair to
///   the same Node app; and it carries a WebSocket through the pair to Python's `websockets`
///   server, once as an HTTP/1.1 upgrade and once as an HTTP/2 extended CONNECT (RFC 8441),
///   which the outbound turns into the upgrade the app expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_a_peer_sidecar_and_as_a_caller_reaches_real_apps() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let node = peers::node_app(&mut mesh).await?;
    let nodeapp = mesh.front("nodeapp", node, &[]).await?;
    let ws = peers::websocket_app(&mut mesh).await?;
    mesh.front("chat", ws, &[]).await?;
    let (_c, fixed) = mesh.client_with_upstream("nodeapp").await?;
    let (_w, ws_fixed) = mesh.client_with_upstream("chat").await?;
    mesh.wait_endpoints("nodeapp", 1).await?;
    mesh.wait_endpoints("chat", 1).await?;

    // Envoy's mesh certificate, as any workload gets one: a CSR and a bootstrap token.
    let dir = mesh.dir.path().to_path_buf();
    let token = mesh.token("envoy").await?;
    let (key, csr_pem) = csr("spiffe://mesh.local/ns/default/sa/envoy")?;
    let cert = identity_client(&mesh)
        .await?
        .certify(mesh_proto::v1::CertifyRequest { csr_pem, token })
        .await?
        .into_inner();
    std::fs::write(dir.join("envoy.crt"), &cert.cert_chain_pem)?;
    std::fs::write(dir.join("envoy.key"), key.serialize_pem())?;
    std::fs::write(dir.join("ca.pem"), mesh.ca_pem()?)?;

    let loopback = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let (peer, front, ws_front, ws_h2_front) = (
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
    );
    let inbound = nodeapp.inbound.expect("the app's inbound");
    let config = format!(
        "static_resources:\n  listeners:{}{}{}{}\n  clusters:{}{}{}{}\n",
        envoy_listener("peer", peer, "mesh_inbound"),
        envoy_listener("front", front, "mesh_outbound"),
        envoy_listener("ws_front", ws_front, "mesh_outbound_h1"),
        envoy_listener("ws_h2_front", ws_h2_front, "mesh_outbound_connect"),
        envoy_h2_cluster(
            "mesh_inbound",
            inbound,
            Some((&dir, "envoy", "spiffe://mesh.local/ns/default/sa/nodeapp"))
        ),
        envoy_h2_cluster("mesh_outbound", fixed, None),
        envoy_h1_cluster("mesh_outbound_h1", ws_fixed),
        envoy_h2_cluster("mesh_outbound_connect", ws_fixed, None),
    );
    peers::envoy(&mut mesh, &config, &[peer, front, ws_front, ws_h2_front]).await?;

    for (via, caller) in [(peer, "envoy"), (front, "caller")] {
        for flags in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
            let url = format!("http://{via}/hello?x=1");
            let mut args = flags.to_vec();
            args.push(&url);
            let (status, body) = curl(&args).await?;
            assert_eq!(status, 200, "via {via} {flags:?}: {body}");
            let j = json(&body);
            assert_eq!(j["app"], "node");
            assert_eq!(j["version"], "1.1", "the HTTP/1.1-only app got HTTP/1.1");
            assert_eq!(j["url"], "/hello?x=1", "origin-form");
            assert_eq!(
                j["hosts"].as_array().map(Vec::len),
                Some(1),
                "one Host: {j}"
            );
            let xfcc = j["xfcc"].as_str().unwrap_or_default();
            assert!(
                xfcc.contains(&format!("URI=spiffe://mesh.local/ns/default/sa/{caller}")),
                "the app learns the mesh caller: {xfcc:?}"
            );
        }
        let data = dir.join("post.bin");
        std::fs::write(&data, vec![b'p'; 100_000])?;
        let (status, body) = curl(&[
            "--http2-prior-knowledge",
            "--data-binary",
            &format!("@{}", data.display()),
            &format!("http://{via}/sink"),
        ])
        .await?;
        assert_eq!((status, body.as_str()), (200, "100000"), "POST via {via}");
    }

    for via in [ws_front, ws_h2_front] {
        let answers =
            peers::websocket_client(&format!("ws://{via}/room"), &["through", "envoy"]).await?;
        assert_eq!(answers, ["echo:through", "echo:envoy"], "via {via}");
    }
    Ok(())
}

/// Issue 24 item 7, a peer's GOAWAY: nginx, holding a mesh certificate for `backend`'s
/// identity, stands where backend's sidecar would (mTLS 1.3, HTTP/2) and ends each connection
/// with a GOAWAY after 100 requests without announcing it first (a hyper-based sidecar sends a
/// two-step GOAWAY; nginx, like many servers, one). The streams above its last stream id were
/// never processed, so the caller's sidecar sends them again on a new connection, with no
/// retry policy, bodies included: h2load loses none of 20,000 GETs and 10,000 POSTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sidecars_goaway_loses_no_request() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let dir = mesh.dir.path().to_path_buf();
    let token = mesh.token("backend").await?;
    let (key, csr_pem) = csr("spiffe://mesh.local/ns/default/sa/backend")?;
    let cert = identity_client(&mesh)
        .await?
        .certify(mesh_proto::v1::CertifyRequest { csr_pem, token })
        .await?
        .into_inner();
    let (crt_file, key_file) = (dir.join("backend.crt"), dir.join("backend.key"));
    std::fs::write(&crt_file, &cert.cert_chain_pem)?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let nginx = peers::nginx_h2(&mut mesh, 100, Some((&crt_file, &key_file))).await?;
    mesh.meshctl(&[
        "endpoints",
        "add",
        "backend",
        "--id",
        "nginx-peer",
        "--address",
        &nginx.to_string(),
        "--version",
        "v1",
    ])
    .await?;
    let (_c, fixed) = mesh.client_with_upstream("backend").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let url = format!("http://{fixed}/");
    until(
        Duration::from_secs(10),
        "the caller's sidecar knows the endpoint",
        || async { Ok(curl(&[&url]).await?.0 == 200) },
    )
    .await?;

    let n = 20_000;
    let (s, text) = peers::h2load(&url, n, 4, 10, None).await?;
    assert_eq!(
        (s.done, s.succeeded, s.failed, s.errored, s.status_2xx),
        (n, n, 0, 0, n),
        "h2load GETs through the caller's sidecar to the nginx peer (GOAWAY every 100):\n{text}"
    );
    let data = dir.join("post.bin");
    std::fs::write(&data, vec![b'p'; 4096])?;
    let n = 10_000;
    let (s, text) = peers::h2load(&url, n, 4, 10, Some(&data)).await?;
    assert_eq!(
        (s.done, s.succeeded, s.failed, s.errored, s.status_2xx),
        (n, n, 0, 0, n),
        "h2load POSTs through the caller's sidecar to the nginx peer (GOAWAY every 100):\n{text}"
    );
    Ok(())
}
