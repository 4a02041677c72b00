//! End-to-end tests of the resilience policies: real control plane, sidecars and example apps
//! that fail on purpose (error rate, delay, reset, refused connection, sick mode).

use bytes::Bytes;
use http_body_util::Full;
use mesh_proto::example::{EchoRequest, echo_client::EchoClient};
use mesh_tests::*;
use prost::Message;
use std::net::SocketAddr;
use std::time::Duration;

/// One `backend` v1 workload and a `web` client that has called it once; returns the app's
/// address, the client sidecar and an HTTP/1.1 client through it.
async fn backend_and_client(mesh: &mut Mesh) -> anyhow::Result<(SocketAddr, Sidecar, HttpClient)> {
    let (app, _) = mesh.workload_app("backend", "v1").await?;
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);
    let r = get(&http, "http://backend/").await?;
    anyhow::ensure!(r.status == 200, "first request: {} {}", r.status, r.text);
    Ok((app, c, http))
}

/// Three `backend` v1 workloads and a `web` client that sees all three; returns the apps'
/// addresses, the client sidecar and an HTTP/1.1 client through it.
async fn three_backends(mesh: &mut Mesh) -> anyhow::Result<(Vec<SocketAddr>, Sidecar, HttpClient)> {
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(mesh.workload_app("backend", "v1").await?.0);
    }
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 3).await?;
    let http = h1_client(c.outbound);
    Ok((apps, c, http))
}

/// Every endpoint's balancer state in a /config_dump.
fn balancer_entries(dump: &serde_json::Value) -> Vec<serde_json::Value> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["balancer"].as_array().into_iter().flatten())
        .cloned()
        .collect()
}

fn ok(rs: &[Result<(u16, String, Duration), String>]) -> usize {
    rs.iter().filter(|r| matches!(r, Ok((200, _, _)))).count()
}

fn endpoint_state(dump: &serde_json::Value, service: &str, id: &str) -> serde_json::Value {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["balancer"].as_array().into_iter().flatten())
        .find(|e| e["id"] == id)
        .cloned()
        .unwrap_or_default()
}

/// Test 1: 3 retries on 5xx hide an upstream failing half its GETs; against an upstream that
/// always fails, retries stay within the budget (counted at the upstream) and errors are prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_upstream_and_stay_in_budget() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (flaky, _) = mesh.workload_app("flaky", "v1").await?;
    let (down, _) = mesh.workload_app("down", "v1").await?;
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://flaky/").await?.status, 200);
    assert_eq!(get(&http, "http://down/").await?.status, 200);
    let retry = [
        "--retries",
        "3",
        "--retry-on",
        "5xx",
        "--retry-backoff",
        "5ms,50ms",
    ];
    let mut flaky_args = retry.to_vec();
    flaky_args.extend(["--retry-budget", "100%"]);
    mesh.set_policy(c.admin, "flaky", &flaky_args, &["max_retries: 3"])
        .await?;
    let mut down_args = retry.to_vec();
    down_args.extend(["--retry-budget", "20%", "--retry-budget-min", "1"]);
    mesh.set_policy(c.admin, "down", &down_args, &["budget_percent: 20.0"])
        .await?;

    let n = 200;
    let before = app_requests(flaky).await?;
    // One at a time: the upstream fails every other request it gets.
    let rs = load(&http, n, 1, |_| get_req("http://flaky/fail/50")).await;
    assert!(ok(&rs) * 100 >= n * 99, "{} of {n} succeeded", ok(&rs));
    let seen = app_requests(flaky).await? - before;
    assert!(
        seen >= n as u64 * 3 / 2,
        "half the requests were retried: {seen}"
    );
    // The proxy's retry counter saw each of them (the app counted every attempt).
    let retries = |text: &str, svc: &str| -> anyhow::Result<f64> {
        Ok(samples(
            text,
            "mesh_retries_total",
            &[],
            &[("dst_service", svc), ("route", "")],
        )?
        .values()
        .sum())
    };
    let m = admin_get(c.admin, "/metrics").await?.text;
    assert_eq!(retries(&m, "flaky")?, (seen - n as u64) as f64, "{m}");

    let before = app_requests(down).await?;
    let n = 100;
    let rs = load(&http, n, 4, |_| get_req("http://down/fail/100")).await;
    let seen = app_requests(down).await? - before;
    assert!(rs.iter().all(|r| matches!(r, Ok((500, _, _)))), "{rs:?}");
    // 20% of the recent requests (the 100, plus the first GET) plus 1/s over the 10 s window.
    let budget = n as u64 / 5 + 10 + 1;
    assert!(
        seen <= n as u64 + budget,
        "upstream saw {seen} for {n} requests: retries exceeded the budget of {budget}"
    );
    assert!(seen > n as u64, "some retries happened ({seen})");
    let m = admin_get(c.admin, "/metrics").await?.text;
    assert_eq!(retries(&m, "down")?, (seen - n as u64) as f64, "{m}");
    let slowest = rs.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.2).max();
    assert!(
        slowest < Some(Duration::from_millis(500)),
        "errors were not prompt: {slowest:?}"
    );
    Ok(())
}

fn post(url: &str, body: &'static str) -> http::Request<Full<Bytes>> {
    let mut r = http::Request::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = url.parse().expect("url");
    r
}

/// Test 2: a POST the upstream read and then reset is not retried (it may have had effects);
/// a POST whose connection was refused never reached anyone and is retried elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_when_it_never_reached_the_upstream() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (app, c, http) = backend_and_client(&mut mesh).await?;
    mesh.set_policy(
        c.admin,
        "backend",
        &[
            "--retries",
            "3",
            "--retry-on",
            "5xx,reset,connect-failure",
            "--lb",
            "round-robin",
        ],
        &["max_retries: 3", "RoundRobin"],
    )
    .await?;

    let before = app_requests(app).await?;
    let rs = load(&http, 1, 1, |_| post("http://backend/reset", "order #1")).await;
    assert!(matches!(&rs[0], Ok((502, _, _))), "{rs:?}");
    assert_eq!(
        app_requests(app).await? - before,
        1,
        "the POST was sent once"
    );

    // An endpoint that refuses connections, next to the live one.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    mesh.meshctl(&[
        "endpoints",
        "add",
        "backend",
        "--id",
        "dead",
        "--address",
        &dead.to_string(),
        "--version",
        "v1",
        "--service-account",
        "backend",
    ])
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        !endpoint_state(d, "backend", "dead").is_null()
    })
    .await?;
    let before = app_requests(app).await?;
    let n = 20;
    let rs = load(&http, n, 1, |_| post("http://backend/echo", "order")).await;
    assert_eq!(ok(&rs), n, "{rs:?}");
    assert_eq!(
        app_requests(app).await? - before,
        n as u64,
        "each POST reached the app once"
    );
    // Round robin sent about half of them to the dead endpoint first: its failures are on
    // record (failures count as at least 10 ms in its latency estimate).
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    let ewma = endpoint_state(&dump, "backend", "dead")["ewma_ms"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(ewma >= 5.0, "the dead endpoint was tried: {dump}");
    Ok(())
}

/// A unary Echo call as raw gRPC over h2c (so only the proxy enforces the deadline).
fn grpc_unary(grpc_timeout: &str, delay_ms: u32) -> http::Request<Full<Bytes>> {
    let msg = EchoRequest {
        message: "deadline".into(),
        delay_ms,
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let mut r = http::Request::new(Full::new(Bytes::from(frame)));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = "http://backend/mesh.example.v1.Echo/Unary"
        .parse()
        .expect("uri");
    let h = r.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("te", http::HeaderValue::from_static("trailers"));
    h.insert(
        "grpc-timeout",
        http::HeaderValue::from_str(grpc_timeout).expect("header"),
    );
    r
}

/// Test 3: a 200 ms route timeout against a 2 s upstream answers 504 in about 200 ms; a
/// client's shorter gRPC deadline wins and ends in DEADLINE_EXCEEDED; a longer one is cut to
/// the route's and the app is told. Invalid policy values are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_honour_grpc_deadlines() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, c, http) = backend_and_client(&mut mesh).await?;
    mesh.set_policy(
        c.admin,
        "backend",
        &["--timeout", "200ms"],
        &["request_timeout: Some(200ms)"],
    )
    .await?;

    let rs = load(&http, 1, 1, |_| get_req("http://backend/delay/2000")).await;
    let (status, reason, took) = rs[0].clone().map_err(anyhow::Error::msg)?;
    assert_eq!((status, reason.as_str()), (504, "timeout"));
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
        "{took:?}"
    );

    let h2 = h2c_client(c.outbound);
    let start = std::time::Instant::now();
    let resp = h2.request(grpc_unary("100m", 2000)).await?;
    let took = start.elapsed();
    assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
    assert_eq!(resp.headers()["x-mesh-error"], "timeout");
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_millis(190),
        "the client's 100 ms deadline, not the route's 200 ms: {took:?}"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.outbound))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(5));
    let reply = EchoClient::new(channel).unary(req).await?.into_inner();
    let told = reply
        .grpc_timeout
        .strip_suffix('m')
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        told.is_some_and(|ms| ms <= 200),
        "app was told {:?}, want the route's 200 ms or less",
        reply.grpc_timeout
    );

    let before = mesh.meshctl(&["policy", "get", "backend"]).await?;
    for bad in [
        vec!["--timeout", "2 parsecs"],
        vec!["--retry-on", "5xx,sometimes"],
        vec!["--rate-limit", "fast"],
        vec!["--fault-abort", "42@10%"],
    ] {
        let mut args = vec!["policy", "set", "backend"];
        args.extend(bad.iter());
        let err = mesh.meshctl(&args).await.expect_err("refused");
        assert!(
            err.to_string().contains("--") || err.to_string().contains("fault"),
            "{err}"
        );
    }
    assert_eq!(mesh.meshctl(&["policy", "get", "backend"]).await?, before);
    Ok(())
}

/// Test 4: one of three endpoints starts failing → it is ejected within the configured number
/// of failures, the success rate recovers to ≥ 99%, and once healthy it is let back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_let_back() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (apps, c, http) = three_backends(&mut mesh).await?;
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    mesh.set_policy(
        c.admin,
        "backend",
        &[
            "--circuit-breaker",
            "consecutive=3,eject=2s,max-ejected=50%",
            "--lb",
            "round-robin",
        ],
        &["consecutive_failures: 3"],
    )
    .await?;
    let rs = load(&http, 30, 1, |_| get_req("http://backend/")).await;
    assert_eq!(ok(&rs), 30);

    let sick = apps[0];
    admin_get(sick, "/admin/sick/100").await?;
    let mut failures = 0;
    let mut ejected = false;
    for _ in 0..30 {
        let dump = admin_get(c.admin, "/config_dump").await?.json;
        ejected = balancer_entries(&dump).iter().any(|e| e["ejected"] == true);
        if ejected {
            break;
        }
        if get(&http, "http://backend/").await?.status != 200 {
            failures += 1;
        }
    }
    assert!(ejected, "ejected after {failures} failures");
    assert!(
        failures <= 3,
        "ejected within 3 consecutive failures, saw {failures}"
    );
    let m = admin_get(c.admin, "/metrics").await?.text;
    assert_eq!(
        samples(&m, "mesh_endpoint_ejections_total", &["dst_service"], &[])?,
        expect(&[(&["backend"], 1.0)]),
        "{m}"
    );

    let n = 200;
    let rs = load(&http, n, 2, |_| get_req("http://backend/")).await;
    assert!(ok(&rs) * 100 >= n * 99, "{} of {n} after ejection", ok(&rs));

    admin_get(sick, "/admin/sick/0").await?;
    let before = app_requests(sick).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(&http, "http://backend/").await?;
        assert_eq!(r.status, 200);
        if app_requests(sick).await? >= before + 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "recovered endpoint never let back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    let back = balancer_entries(&dump)
        .iter()
        .all(|e| e["ejected"] == false && e["probation"] == false);
    assert!(back, "{dump}");
    Ok(())
}

/// Test 5: 50/s with 200/s offered → about 50/s pass and the rest get 429 with retry-after;
/// the per-caller limit leaves another caller untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_cap_the_rate_and_isolate_callers() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let server = mesh.workload("backend", "v1").await?;
    let a = mesh.client("web").await?;
    let b = mesh.client("batch").await?;
    let (ha, hb) = (h1_client(a.outbound), h1_client(b.outbound));
    assert_eq!(get(&ha, "http://backend/").await?.status, 200);
    assert_eq!(get(&hb, "http://backend/").await?.status, 200);
    mesh.set_policy(
        server.admin,
        "backend",
        &["--inbound-rate-limit-per-caller", "50/s,burst=5"],
        &["rate_inbound_per_caller: Some(Rate { per_second: 50"],
    )
    .await?;

    // Two seconds: caller A offers 200/s, caller B 20/s, at the same time.
    let (sa, sb) = tokio::join!(
        paced(&ha, 200, 400, |_| get_req("http://backend/")),
        paced(&hb, 20, 40, |_| get_req("http://backend/")),
    );
    let passed = sa.iter().filter(|s| **s == 200).count();
    let limited = sa.iter().filter(|s| **s == 429).count();
    assert_eq!(passed + limited, 400, "only 200 or 429: {sa:?}");
    // 50/s over about 2 s plus the burst of 5.
    assert!((85..=125).contains(&passed), "caller A: {passed} passed");
    assert!(sb.iter().all(|s| *s == 200), "caller B is isolated: {sb:?}");
    // A quick burst right after: refused with the reason and when to come back.
    let mut refused = None;
    for _ in 0..20 {
        let r = get(&ha, "http://backend/").await?;
        if r.status == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("a burst past the limit is refused");
    assert_eq!(r.headers["x-mesh-error"], "rate-limited");
    assert!(r.headers.contains_key("retry-after"));

    // Outbound, per destination, in the calling proxy.
    mesh.set_policy(
        a.admin,
        "backend",
        &[
            "--inbound-rate-limit-per-caller",
            "off",
            "--rate-limit",
            "50/s,burst=5",
        ],
        &["rate_outbound: Some(Rate { per_second: 50"],
    )
    .await?;
    let sa = paced(&ha, 200, 200, |_| get_req("http://backend/")).await;
    let passed = sa.iter().filter(|s| **s == 200).count();
    assert!(
        (45..=70).contains(&passed),
        "outbound limit: {passed} passed in ~1 s"
    );
    assert_eq!(passed + sa.iter().filter(|s| **s == 429).count(), 200);
    Ok(())
}

/// Share of `n` requests (at `concurrency`) that reached the app at `slow`.
async fn share_to(
    http: &HttpClient,
    slow: SocketAddr,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let before = app_requests(slow).await?;
    let rs = load(http, n, concurrency, |_| get_req("http://backend/")).await;
    anyhow::ensure!(ok(&rs) == n, "all requests succeed: {rs:?}");
    Ok((app_requests(slow).await? - before) as f64 / n as f64)
}

/// Test 6: P2C over peak EWMA sends measurably less traffic than round robin to an endpoint
/// with ten times the latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_avoids_a_slow_endpoint_better_than_round_robin() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (apps, c, http) = three_backends(&mut mesh).await?;
    for a in &apps[..2] {
        admin_get(*a, "/admin/delay/2").await?;
    }
    admin_get(apps[2], "/admin/delay/20").await?;
    assert_eq!(get(&http, "http://backend/").await?.status, 200);

    mesh.set_policy(
        c.admin,
        "backend",
        &["--lb", "round-robin"],
        &["RoundRobin"],
    )
    .await?;
    let rr = share_to(&http, apps[2], 300, 4).await?;
    mesh.set_policy(c.admin, "backend", &["--lb", "p2c-ewma"], &["P2cEwma"])
        .await?;
    let p2c = share_to(&http, apps[2], 300, 4).await?;
    eprintln!("share to the slow endpoint: round robin {rr:.3}, p2c-ewma {p2c:.3}");
    assert!((0.3..=0.37).contains(&rr), "round robin: {rr}");
    assert!(
        p2c < rr / 2.0,
        "p2c sent {p2c} to the slow endpoint, round robin {rr}"
    );
    Ok(())
}

/// Test 7: fault injection aborting 10% answers 503 to 10% ± 2 points of 2,000 requests, and
/// the aborted ones never reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_the_configured_share() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (app, c, http) = backend_and_client(&mut mesh).await?;
    mesh.set_policy(
        c.admin,
        "backend",
        &["--fault-abort", "503@10%"],
        &["abort_percent: 10.0"],
    )
    .await?;
    let before = app_requests(app).await?;
    let n = 2000;
    let rs = load(&http, n, 8, |_| get_req("http://backend/")).await;
    let aborted = rs
        .iter()
        .filter(|r| matches!(r, Ok((503, reason, _)) if reason == "fault-abort"))
        .count();
    assert_eq!(aborted + ok(&rs), n, "only 200 or the injected 503");
    assert!((160..=240).contains(&aborted), "{aborted} of {n} aborted");
    assert_eq!(app_requests(app).await? - before, (n - aborted) as u64);

    mesh.meshctl(&["policy", "clear", "backend"]).await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        policy_in_dump(d, "backend").is_some_and(|p| p.contains("fault: None"))
    })
    .await?;
    let rs = load(&http, 200, 8, |_| get_req("http://backend/")).await;
    assert_eq!(ok(&rs), 200, "off once cleared");
    Ok(())
}

/// Connect timeout: a peer that accepts TCP but never answers TLS costs the configured 300 ms,
/// not the 2 s default. Idle timeout: a pooled peer connection unused for 1 s is closed, and
/// the next request opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_idle_timeouts_bound_peer_connections() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hole_addr = hole.local_addr()?;
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            conns.push(s);
        }
    });
    mesh.meshctl(&[
        "endpoints",
        "add",
        "stuck",
        "--id",
        "hole",
        "--address",
        &hole_addr.to_string(),
        "--version",
        "v1",
        "--service-account",
        "stuck",
    ])
    .await?;
    mesh.meshctl(&["policy", "set", "stuck", "--connect-timeout", "300ms"])
        .await?;
    mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 1).await?;
    mesh.meshctl(&["policy", "set", "backend", "--idle-timeout", "1s"])
        .await?;
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);

    let rs = load(&http, 1, 1, |_| get_req("http://stuck/")).await;
    let (status, reason, took) = rs[0].clone().map_err(anyhow::Error::msg)?;
    assert_eq!((status, reason.as_str()), (503, "connect-failed"));
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    let peers = |d: &serde_json::Value| d["peer_connections"].as_u64().unwrap_or(99);
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    assert!(peers(&dump) >= 1, "{dump}");
    // The sweep runs every 5 s: closed within 1 s idle + one sweep.
    wait_config(c.admin, Duration::from_secs(10), |d| peers(d) == 0).await?;
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    held.abort();
    Ok(())
}

/// Per-route policy: a rule's timeout applies to the requests that take the rule and to no
/// others; `policy get --route` shows it; an unknown rule is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_policy_applies_only_to_its_requests() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_, c, http) = backend_and_client(&mut mesh).await?;
    mesh.meshctl(&[
        "route",
        "set",
        "backend",
        "--match",
        "header:x-tier=fast",
        "--name",
        "fast",
    ])
    .await?;
    mesh.meshctl(&[
        "policy",
        "set",
        "backend",
        "--route",
        "fast",
        "--timeout",
        "200ms",
    ])
    .await?;
    let out = mesh
        .meshctl(&["policy", "get", "backend", "--route", "fast"])
        .await?;
    assert!(
        out.contains("timeouts.request_ms") && out.contains("200"),
        "{out}"
    );
    assert!(
        mesh.meshctl(&[
            "policy",
            "set",
            "backend",
            "--route",
            "nope",
            "--timeout",
            "1s"
        ])
        .await
        .is_err()
    );
    wait_config(c.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "backend").iter().any(|r| r == "fast")
    })
    .await?;
    let fast = |i| {
        let mut r = get_req("http://backend/delay/600");
        if i == 0 {
            r.headers_mut()
                .insert("x-tier", http::HeaderValue::from_static("fast"));
        }
        r
    };
    let rs = load(&http, 1, 1, fast).await;
    let (status, reason, took) = rs[0].clone().map_err(anyhow::Error::msg)?;
    assert_eq!(
        (status, reason.as_str()),
        (504, "timeout"),
        "the rule's 200 ms"
    );
    assert!(took < Duration::from_millis(550), "{took:?}");
    let rs = load(&http, 1, 1, |_| get_req("http://backend/delay/600")).await;
    assert!(
        matches!(rs[0], Ok((200, _, _))),
        "no timeout outside the rule: {rs:?}"
    );
    Ok(())
}

/// An HTTP/1.1 app that answers the first request on each connection, then closes the
/// connection without a word when the next request arrives on it (no `connection: close`),
/// as an app does whose keep-alive timeout fires just as a request goes out. Returns its
/// address and its count of accepted connections.
async fn app_closing_reused_connections()
-> anyhow::Result<(SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                // The first request: headers, then the body its content-length announces.
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                while got.len() < body_at + len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
                // The next request on this connection: read it, then close unanswered.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    Ok((addr, conns))
}

/// The inbound sidecar sends a bodyless idempotent request once more on a fresh connection
/// when the app closes a reused one before answering; a POST is not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_closing_a_reused_connection_is_replayed_for_idempotent_requests() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start().await?;
    let (app, conns) = app_closing_reused_connections().await?;
    mesh.sidecar(SidecarOpts {
        env: &[],
        namespace: None,
        service: Some("legacy"),
        version: Some("v1"),
        service_account: "legacy",
        app: Some(app),
        node_id: None,
        workers: 0,
        extra: &[],
    })
    .await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("legacy", 1).await?;
    let http = h1_client(c.outbound);
    for i in 0..5 {
        let r = get(&http, "http://legacy/").await?;
        assert_eq!((r.status.as_u16(), r.text.as_str()), (200, "ok"), "GET {i}");
    }
    // Each GET after the first met a connection the app then closed, and went again.
    let opened = conns.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened >= 5, "the app saw {opened} connections for 5 GETs");

    let post = |body: &'static [u8]| {
        http::Request::post("http://legacy/orders").body(Full::new(Bytes::from_static(body)))
    };
    // The pooled connection holds one answered request: the POST on it must not be replayed.
    let first = http.request(post(b"{\"order\":1}")?).await?;
    assert_eq!(
        first.status(),
        502,
        "a POST the app may have read is not sent twice"
    );
    assert_eq!(
        first.headers().get("x-mesh-error").map(|v| v.as_bytes()),
        Some(&b"app-unavailable"[..])
    );
    Ok(())
}

/// Issue 24 item 4: a gRPC endpoint that fails every call with UNAVAILABLE, as real gRPC
/// servers do (HTTP 200; the status in the trailers after the items of a stream, or in the
/// head of a trailers-only answer), is ejected like one answering 5xx, and `meshctl top`
/// counts those calls as failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failures_in_trailers_eject_and_count() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (sick, _) = mesh.workload_app("backend", "v1").await?;
    mesh.workload_app("backend", "v1").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.outbound))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    let mut echo = EchoClient::new(channel);
    // The first call makes the client sidecar learn the service.
    echo.unary(EchoRequest::default()).await?;
    mesh.set_policy(
        c.admin,
        "backend",
        &[
            "--circuit-breaker",
            "consecutive=3,eject=60s,max-ejected=50%",
            "--lb",
            "round-robin",
            "--grpc-failures",
            "internal",
        ],
        &["consecutive_failures: 3", "GrpcFailures(8192)"],
    )
    .await?;
    admin_get(sick, "/admin/sick/100").await?;
    let stream_call = |mut echo: EchoClient<tonic::transport::Channel>| async move {
        let mut s = echo
            .server_stream(EchoRequest {
                message: "m".into(),
                count: 2,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut n = 0;
        while let Some(item) = s.message().await? {
            anyhow::ensure!(item.message.starts_with("m "));
            n += 1;
        }
        anyhow::ensure!(n == 2, "{n} items");
        Ok(())
    };
    // With only INTERNAL counting as a failure, the sick endpoint's UNAVAILABLE is an
    // answer of the application: it stays in.
    let mut calls = 0;
    let mut unavailable = 0;
    for _ in 0..6 {
        calls += 1;
        if stream_call(echo.clone()).await.is_err() {
            unavailable += 1;
        }
    }
    assert_eq!(
        unavailable, 3,
        "round robin: every other call reached the sick endpoint"
    );
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    assert!(
        balancer_entries(&dump)
            .iter()
            .all(|e| e["ejected"] == false),
        "{dump}"
    );
    mesh.set_policy(
        c.admin,
        "backend",
        &["--grpc-failures", "default"],
        &["GrpcFailures(57364)"],
    )
    .await?;
    // Streams: the sick endpoint's calls end with UNAVAILABLE in the trailers.
    let mut failed = 0;
    let mut ejected = false;
    for _ in 0..20 {
        calls += 1;
        if let Err(e) = stream_call(echo.clone()).await {
            assert!(format!("{e:?}").contains("sick on purpose"), "{e:?}");
            failed += 1;
        }
        let dump = admin_get(c.admin, "/config_dump").await?.json;
        ejected = balancer_entries(&dump).iter().any(|e| e["ejected"] == true);
        if ejected {
            break;
        }
    }
    assert!(
        ejected,
        "ejected after {failed} streams failed in their trailers"
    );
    assert_eq!(failed, 3, "ejected at the third consecutive failure");
    // From now on every call, unary and streaming, reaches the healthy endpoint.
    for _ in 0..20 {
        stream_call(echo.clone()).await?;
        echo.unary(EchoRequest::default()).await?;
    }
    // The telemetry the control plane shows counts those three calls as failures, and not
    // the three UNAVAILABLE answers while only INTERNAL counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = mesh
            .meshctl(&["-o", "json", "top", "--window", "60s"])
            .await?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let rows: Vec<&serde_json::Value> = v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["service"] == "backend.default")
            .collect();
        let total: f64 = rows.iter().filter_map(|r| r["requests"].as_f64()).sum();
        let failures: f64 = rows
            .iter()
            .map(|r| {
                r["requests"].as_f64().unwrap_or(0.0)
                    * (100.0 - r["success_percent"].as_f64().unwrap_or(0.0))
                    / 100.0
            })
            .sum();
        let want = f64::from(calls + 41);
        if total >= want {
            assert_eq!(total, want, "every call counted once: {v}");
            assert_eq!(failures.round() as u64, 3, "{v}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "top never showed the calls: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
