//! Hostile clients against a running sidecar's outbound listener (the same HTTP server code
//! serves the inbound one): request smuggling, oversized and too many headers, slow clients, a
//! connection flood and HTTP/2 abuse are refused or bounded, and after each a well-behaved
//! client is still served promptly. The sidecar runs with small limits so each bound is hit fast.

use mesh_tests::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const LIMITS: [&str; 10] = [
    "--header-read-timeout-ms",
    "500",
    "--max-header-bytes",
    "8192",
    "--max-headers",
    "20",
    "--max-concurrent-streams",
    "100",
    "--max-connections",
    "50",
];

/// Sends `bytes` on a new connection and reads until the proxy closes it (bounded).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(bytes).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("connection still open after 5 s"))??;
    Ok((String::from_utf8_lossy(&buf).to_string(), t.elapsed()))
}

/// Speaks raw HTTP/2 (the h2 crate would hold the streams back itself): after the SETTINGS
/// exchange, opens `streams` requests whose bodies stay open, so none finishes. Returns how
/// many the proxy refused with RST_STREAM(REFUSED_STREAM) and whether it sent GOAWAY.
async fn h2_past_stream_limit(addr: SocketAddr, streams: u32) -> anyhow::Result<(usize, bool)> {
    const SETTINGS: u8 = 4;
    const RST_STREAM: u8 = 3;
    const GOAWAY: u8 = 7;
    const REFUSED_STREAM: u32 = 7;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    // HPACK: :method POST (3), :scheme http (6), :path / (4), :authority "backend" (literal,
    // indexed name 1).
    let mut block = vec![0x83, 0x86, 0x84, 0x01, 7];
    block.extend(b"backend");
    let (mut refused, mut goaway, mut sent) = (0, false, false);
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && refused == 0 && !goaway {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => continue,
        };
        anyhow::ensure!(n > 0, "connection closed after {refused} refusals");
        buf.extend(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags, payload) = (buf[3], buf[4], buf[9..9 + len].to_vec());
            buf.drain(..9 + len);
            match kind {
                SETTINGS if flags & 1 == 0 && !sent => {
                    // ACK the proxy's SETTINGS (its stream limit now binds), then the burst:
                    // HEADERS with END_HEADERS but not END_STREAM.
                    let mut burst = frame(SETTINGS, 1, 0, &[]);
                    for i in 0..streams {
                        burst.extend(frame(1, 4, 2 * i + 1, &block));
                    }
                    tcp.write_all(&burst).await?;
                    sent = true;
                }
                RST_STREAM
                    if payload.len() == 4
                        && u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            == REFUSED_STREAM =>
                {
                    refused += 1;
                }
                GOAWAY => goaway = true,
                _ => {}
            }
        }
    }
    Ok((refused, goaway))
}

/// A fresh well-behaved client gets its answer within a second.
async fn served_promptly(outbound: SocketAddr, after: &str) -> anyhow::Result<()> {
    let http = h1_client(outbound);
    let r = tokio::time::timeout(Duration::from_secs(1), get(&http, "http://backend/ok"))
        .await
        .map_err(|_| anyhow::anyhow!("after {after}: no answer within 1 s"))??;
    anyhow::ensure!(r.status == 200, "after {after}: {}", r.status);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_or_bounded() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (app, _) = mesh.workload_app("backend", "v1").await?;
    let c = mesh
        .sidecar(SidecarOpts {
            service_account: "web",
            extra: &LIMITS,
            ..Default::default()
        })
        .await?;
    mesh.wait_endpoints("backend", 1).await?;
    let out = c.outbound;
    served_promptly(out, "start").await?;

    // Request smuggling: both Content-Length and Transfer-Encoding, or two Content-Lengths.
    let before = app_requests(app).await?;
    let (r, _) = raw(
        out,
        b"POST / HTTP/1.1\r\nHost: backend\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: backend\r\n\r\n",
    )
    .await?;
    // Read as chunked (Transfer-Encoding wins, RFC 9112 §6.3), answered once, and the
    // connection closed after it: the "request" hidden in the body is never served.
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "CL+TE: {r}");
    assert!(r.starts_with("HTTP/1.1 200"), "CL+TE: {r}");
    assert!(!r.contains("/smuggled"), "CL+TE: {r}");
    let (r, _) = raw(
        out,
        b"POST / HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 400"), "duplicate CL: {r}");
    assert_eq!(
        app_requests(app).await?,
        before + 1,
        "the app saw the one POST, not the smuggled GET nor the duplicate-CL request"
    );
    served_promptly(out, "smuggling").await?;

    // Oversized head, too many headers.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: backend\r\nx-big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let (r, _) = raw(out, big.as_bytes()).await?;
    assert!(r.starts_with("HTTP/1.1 431"), "oversized head: {r}");
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (r, _) = raw(
        out,
        format!("GET / HTTP/1.1\r\nHost: backend\r\n{many}\r\n").as_bytes(),
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 431"), "too many headers: {r}");
    served_promptly(out, "oversized headers").await?;

    // Slowloris: a head that never ends is dropped at the header read timeout.
    let (_, took) = raw(out, b"GET / HTTP/1.1\r\nHost: backend\r\n").await?;
    assert!(took < Duration::from_secs(3), "slowloris held {took:?}");
    served_promptly(out, "slowloris").await?;

    // Slow bodies: 20 requests whose bodies stall hold 20 connections, nothing more.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(out).await?;
        s.write_all(b"POST /slow HTTP/1.1\r\nHost: backend\r\nContent-Length: 100000\r\n\r\nab")
            .await?;
        slow.push(s);
    }
    served_promptly(out, "slow bodies").await?;
    drop(slow);

    // Connection flood: past --max-connections new connections are closed at once, while a
    // client with a connection already open is still served.
    let pooled = h1_client(out);
    assert_eq!(get(&pooled, "http://backend/").await?.status, 200);
    let mut flood = Vec::new();
    for _ in 0..80 {
        flood.push(TcpStream::connect(out).await?);
    }
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        get(&pooled, "http://backend/during"),
    )
    .await??;
    assert_eq!(r.status, 200, "during the flood");
    // The kernel completes the flood's handshakes before the proxy accepts them, so the
    // refusals are counted as its accept loop drains the backlog: wait for the count.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = admin_get(c.admin, "/metrics").await?.text;
        let refused = samples(&m, "mesh_connections_refused_total", &[], &[])?;
        if refused.values().sum::<f64>() >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal counted: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(flood);
    // The flood's connections go (closed by us, or by the header timeout): new clients again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_promptly(out, "flood").await.is_err() {
        assert!(Instant::now() < deadline, "not served after the flood");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // HTTP/2: the advertised stream limit, then a rapid-reset burst.
    let tcp = TcpStream::connect(out).await?;
    let (h2c, mut conn) = h2::client::handshake(tcp).await?;
    let req = || {
        http::Request::get("http://backend/h2")
            .body(())
            .expect("request")
    };
    let (resp, _) = h2c.clone().ready().await?.send_request(req(), true)?;
    let status = tokio::select! {
        r = resp => r?.status(),
        r = &mut conn => anyhow::bail!("h2 connection ended: {r:?}"),
    };
    assert_eq!(status, 200);
    // The proxy's SETTINGS came with the answer: its stream limit is the configured one.
    assert_eq!(conn.max_concurrent_send_streams(), 100);
    // A client that ignores it gets the streams past the limit refused, nothing more.
    let (refused, goaway) = h2_past_stream_limit(out, 120).await?;
    assert!(
        refused >= 1 && !goaway,
        "refused {refused}, goaway {goaway}"
    );
    served_promptly(out, "too many streams").await?;
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..2000 {
        match h2c.clone().ready().await {
            Ok(mut c) => match c.send_request(req(), true) {
                Ok((resp, _)) => {
                    drop(resp); // RST_STREAM(CANCEL) right after HEADERS
                    sent += 1;
                }
                Err(_) => break,
            },
            Err(_) => break,
        }
    }
    assert!(sent > 0);
    drop(h2c);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    served_promptly(out, "rapid reset").await?;

    // HTTP/2 SETTINGS abuse: an illegal window size, and a SETTINGS frame larger than the
    // frame size limit: the connection is closed (GOAWAY), nothing else is affected.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut bad_window = preface.to_vec();
    bad_window.extend([0, 0, 6, 4, 0, 0, 0, 0, 0]); // len 6, SETTINGS, stream 0
    bad_window.extend([0, 4, 0x80, 0, 0, 0]); // INITIAL_WINDOW_SIZE = 2^31
    let (_, took) = raw(out, &bad_window).await?;
    assert!(took < Duration::from_secs(3));
    let mut huge = preface.to_vec();
    huge.extend([0, 0xff, 0xfa, 4, 0, 0, 0, 0, 0]); // len 65530
    huge.extend(std::iter::repeat_n(0u8, 65530));
    let (_, took) = raw(out, &huge).await?;
    assert!(took < Duration::from_secs(3));
    served_promptly(out, "SETTINGS abuse").await?;
    Ok(())
}

/// Issue 29 finding 1: a deny on a path prefix cannot be walked around with another spelling
/// of the same path (`//`, `/./`, `/a/../`, `%61`), an ambiguous one (`%2F`) is refused with
/// 400, and the app — Node.js's `http`, which takes the path as it comes — receives the
/// normalised path, so the proxy and the app agree on what was asked for. `meshctl authz
/// check` decides the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_path_cannot_be_bypassed_by_spelling() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let node = mesh_tests::peers::node_app(&mut mesh).await?;
    let b = mesh.front("files", node, &[]).await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("files", 1).await?;
    mesh.meshctl(&[
        "authz",
        "set",
        "files",
        "--rule",
        "deny name=no-secret paths=/hello/secret/*",
    ])
    .await?;
    wait_config(b.admin, Duration::from_secs(10), |d| {
        d["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "files" && s["authz"].to_string().contains("no-secret"))
        })
    })
    .await?;
    let proxy = format!("http://{}", c.outbound);
    let call = |path: &str| {
        let url = format!("http://files{path}");
        let proxy = proxy.clone();
        async move { mesh_tests::peers::curl(&["--path-as-is", "-x", &proxy, &url]).await }
    };
    let (status, _) = call("/hello/secret/x").await?;
    assert_eq!(status, 403);
    for path in [
        "//hello/secret/x",
        "/hello//secret/x",
        "/./hello/secret/x",
        "/a/../hello/secret/x",
        "/%68ello/secret/x",
        "/hello/%73ecret/x",
        "/hello/public/../secret/x",
    ] {
        let (status, body) = call(path).await?;
        assert_eq!(status, 403, "{path}: {body}");
    }
    for path in ["/hello%2Fsecret/x", "/hello/secret%5Cx", "/hello/%zz"] {
        let (status, body) = call(path).await?;
        assert_eq!(status, 400, "{path}: {body}");
    }
    // What is allowed reaches the app normalised.
    let (status, body) = call("/hello/./public//page/../item?x=1").await?;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["url"], "/hello/public/item?x=1");

    for (path, want) in [
        ("/a/../hello/secret/x", "DENY"),
        ("/hello/public", "ALLOW"),
        ("/hello%2Fsecret", "refused before authorization (400)"),
    ] {
        let (_, out, _) = mesh
            .meshctl_exit(&[
                "authz",
                "check",
                "--from",
                "default/web",
                "--to",
                "files",
                "--path",
                path,
            ])
            .await?;
        assert!(out.contains(want), "{path}: {out}");
    }
    Ok(())
}
