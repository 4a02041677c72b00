//! End-to-end tests of what the mesh lets operators see.

use mesh_tests::*;
use std::time::Duration;
use tokio::time::Instant;

/// `meshctl top` shows the test's own traffic per version, from the proxies' telemetry: the
/// exact request count, the failures among them, and latencies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_top_shows_the_traffic_per_version() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?; // 1 request
    set_weights(&mesh, c.admin, 50, 50, Duration::from_secs(10)).await?;
    let ok = load(&http, 100, 4, |_| get_req("http://backend/")).await;
    let failed = load(&http, 10, 2, |_| get_req("http://backend/status/500")).await;
    assert!(ok.iter().all(|r| matches!(r, Ok((200, _, _)))));
    assert!(failed.iter().all(|r| matches!(r, Ok((500, _, _)))));

    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let out = mesh
            .meshctl(&["-o", "json", "top", "--window", "60s"])
            .await?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let rows: Vec<serde_json::Value> = v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["service"] == "backend")
            .cloned()
            .collect();
        let total: u64 = rows.iter().filter_map(|r| r["requests"].as_u64()).sum();
        if total >= 111 {
            assert_eq!(total, 111, "every request counted once: {v}");
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed all 111 requests: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut failures = 0.0;
    for r in &rows {
        let n = r["requests"].as_f64().unwrap_or(0.0);
        assert!(n >= 50.0, "50/50 split: {r}");
        failures += n * (100.0 - r["success_percent"].as_f64().unwrap_or(0.0)) / 100.0;
        assert!(r["p99_ms"].as_u64().unwrap_or(0) >= 1, "{r}");
    }
    assert_eq!(failures.round() as u64, 10, "the ten 500s: {rows:?}");
    let table = mesh.meshctl(&["top", "--count", "1"]).await?;
    assert!(table.contains("backend") && table.contains("v2"), "{table}");
    Ok(())
}

/// With `x-mesh-debug`, a response says how the proxy handled the request: the route rule, the
/// backend version, the endpoint and the number of attempts (retries included). Without it,
/// none of that is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_header_explains_the_routing_decision() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    mesh.meshctl(&[
        "route",
        "set",
        "backend",
        "--match",
        "prefix:/fail",
        "--to",
        "v2",
        "--name",
        "flaky",
    ])
    .await?;
    mesh.meshctl(&[
        "policy",
        "set",
        "backend",
        "--route",
        "flaky",
        "--retries",
        "2",
        "--retry-on",
        "5xx",
    ])
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        policy_in_dump(d, "backend").is_some()
            && rules_in_dump(d, "backend").iter().any(|r| r == "flaky")
    })
    .await?;
    let debug = |path: &str| {
        let mut r = get_req(&format!("http://backend{path}"));
        r.headers_mut()
            .insert("x-mesh-debug", http::HeaderValue::from_static("1"));
        r
    };
    // /fail/50 on v2 fails every other request it sees: 1st ok, 2nd fails and is retried.
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let resp = http.request(debug("/fail/50")).await?;
        let h = resp.headers().clone();
        assert_eq!(resp.status(), 200);
        assert_eq!(h["x-mesh-route"], "flaky");
        assert_eq!(h["x-mesh-backend"], "v2");
        assert!(
            h["x-mesh-endpoint"].to_str()?.starts_with("backend-v2-"),
            "{h:?}"
        );
        attempts.push(h["x-mesh-attempts"].to_str()?.to_string());
    }
    assert_eq!(attempts, ["1", "2"]);
    let r = http.request(debug("/")).await?;
    assert_eq!(r.headers()["x-mesh-route"], "default");
    let plain = get(&http, "http://backend/fail/0").await?;
    assert!(!plain.headers.contains_key("x-mesh-route"));
    Ok(())
}
