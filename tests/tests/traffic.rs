//! End-to-end tests of traffic management: route rules and their precedence, header edits,
//! redirects, rollback and diff, and weight shifts / blue-green under constant load.

use http_body_util::BodyExt;
use mesh_tests::*;
use std::time::Duration;
use tokio::time::Instant;

async fn get_with(
    http: &HttpClient,
    url: &str,
    headers: &[(&'static str, &'static str)],
) -> anyhow::Result<Reply> {
    let mut r = get_req(url);
    for (n, v) in headers {
        r.headers_mut()
            .insert(*n, http::HeaderValue::from_static(v));
    }
    let resp = http.request(r).await?;
    let (parts, body) = resp.into_parts();
    let text = String::from_utf8_lossy(&body.collect().await?.to_bytes()).to_string();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_str(&text).unwrap_or_default(),
        text,
    })
}

/// Test 1 (end to end; the table-driven matcher tests are in proxy/src/http/router/tests.rs):
/// a header match beats a prefix, a longer prefix beats a shorter one, unmatched requests take
/// the default split. Rules also edit headers and redirect; rollback and diff work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rules_follow_precedence() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    for v in ["v1", "v2", "v3"] {
        mesh.workload("backend", v).await?;
    }
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 3).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    let set = |args: &'static [&'static str]| {
        let mut all = vec!["route", "set", "backend"];
        all.extend_from_slice(args);
        all
    };
    mesh.meshctl(&set(&["--weights", "v1=100"])).await?;
    mesh.meshctl(&set(&[
        "--match",
        "prefix:/api",
        "--to",
        "v2",
        "--name",
        "api",
        "--set-request-header",
        "x-route=api",
        "--set-response-header",
        "x-served-route=api",
    ]))
    .await?;
    mesh.meshctl(&set(&[
        "--match",
        "prefix:/api/v3",
        "--to",
        "v3",
        "--name",
        "api-v3",
    ]))
    .await?;
    mesh.meshctl(&set(&[
        "--match",
        "header:x-canary=true",
        "--to",
        "v3",
        "--name",
        "canary",
    ]))
    .await?;
    mesh.meshctl(&set(&[
        "--match",
        "path:/old",
        "--redirect",
        "/new",
        "--redirect-status",
        "301",
        "--name",
        "moved",
    ]))
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "backend").len() == 4
    })
    .await?;

    for (path, headers, want) in [
        ("/", &[][..], "v1"),
        ("/api/items", &[][..], "v2"),
        ("/api/v3/items", &[][..], "v3"),
        ("/apix", &[][..], "v1"),
        ("/api/items", &[("x-canary", "true")][..], "v3"),
        ("/", &[("x-canary", "false")][..], "v1"),
    ] {
        for _ in 0..5 {
            let r = get_with(&http, &format!("http://backend{path}"), headers).await?;
            assert_eq!(r.status, 200, "{path} {headers:?}: {}", r.text);
            assert_eq!(r.json["version"], want, "{path} {headers:?}");
        }
    }
    let r = get(&http, "http://backend/api/items").await?;
    assert_eq!(r.json["x_headers"]["x-route"], "api", "{}", r.text);
    assert_eq!(r.headers["x-served-route"], "api");
    let r = get(&http, "http://backend/old?q=1").await?;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "http://backend/new?q=1");

    // Invalid rules are refused and change nothing.
    for bad in [
        &["--match", "regex:([", "--to", "v2"][..],
        &["--match", "header:x-a=1", "--to", "v9"][..],
        &["--match", "cookie:a=b", "--to", "v2"][..],
    ] {
        let mut args = vec!["route", "set", "backend"];
        args.extend_from_slice(bad);
        assert!(mesh.meshctl(&args).await.is_err(), "{bad:?} refused");
    }
    let diff = mesh.meshctl(&["route", "diff", "backend"]).await?;
    assert!(diff.contains("+ rule moved"), "{diff}");
    let out = mesh.meshctl(&["route", "rollback", "backend"]).await?;
    assert!(out.contains("rolled back"), "{out}");
    wait_config(c.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "backend").len() == 3
    })
    .await?;
    let r = get(&http, "http://backend/old").await?;
    assert_eq!(
        (r.status.as_u16(), &r.json["version"]),
        (200, &serde_json::json!("v1"))
    );
    Ok(())
}

/// Waits until the sidecar at `admin` routes backend by these default weights.
async fn wait_weights(admin: std::net::SocketAddr, v1: u64, v2: u64) -> anyhow::Result<()> {
    let want = vec![("v1".to_string(), v1), ("v2".to_string(), v2)];
    wait_config(admin, Duration::from_secs(5), |d| {
        route_in_dump(d, "backend") == want
    })
    .await
    .map(|_| ())
}

/// Test 2: under a constant 250 rps, weights stepped 100/0 → 50/50 → 0/100, then blue-green
/// flips to 100/0 and back to 0/100: no request fails, and each phase's split is within ±3
/// points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_steps_and_blue_green_under_load_lose_nothing() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    set_weights(&mesh, c.admin, 100, 0, Duration::from_secs(10)).await?;
    let load = Load::start(http.clone(), 250);
    let phase_len = Duration::from_millis(2500);
    let mut phases = Vec::new();
    tokio::time::sleep(phase_len).await;
    phases.push((Instant::now() - phase_len, Instant::now(), 100.0));
    for (v1, v2) in [(50, 50), (0, 100), (100, 0), (0, 100)] {
        set_weights(&mesh, c.admin, v1, v2, Duration::from_secs(5)).await?;
        let start = Instant::now();
        tokio::time::sleep(phase_len).await;
        phases.push((start, Instant::now(), v1 as f64));
    }
    let samples = load.finish().await?;
    let failed = samples.iter().filter(|(_, v)| v.is_none()).count();
    assert!(
        samples.len() >= 250 * 11,
        "constant load ran: {} requests",
        samples.len()
    );
    assert_eq!(failed, 0, "no request failed during the shifts");
    for (from, to, want_v1) in phases {
        let in_phase: Vec<_> = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .collect();
        let v1 = in_phase
            .iter()
            .filter(|(_, v)| v.as_deref() == Some("v1"))
            .count();
        let share = v1 as f64 * 100.0 / in_phase.len().max(1) as f64;
        eprintln!("phase {want_v1}% v1: {share:.1}% of {}", in_phase.len());
        assert!(
            in_phase.len() >= 400,
            "{} requests in phase",
            in_phase.len()
        );
        assert!(
            (share - want_v1).abs() <= 3.0,
            "phase {want_v1}% v1: got {share:.1}% of {}",
            in_phase.len()
        );
    }
    Ok(())
}

/// Test 3: a rolling update of 3 endpoints under a constant 200 rps: each old endpoint is
/// replaced by a new one (start new, register, SIGTERM old: deregister, keep serving briefly,
/// drain), and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_of_three_endpoints_loses_nothing() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(mesh.workload_app("backend", "v1").await?.1);
    }
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 3).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    wait_config(c.admin, Duration::from_secs(10), |d| {
        endpoints_in_dump(d, "backend") == 3
    })
    .await?;

    let load = Load::start(http.clone(), 200);
    let load_started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for sidecar in old {
        mesh.workload_app("backend", "v1").await?;
        wait_config(c.admin, Duration::from_secs(10), |d| {
            endpoints_in_dump(d, "backend") == 4
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = mesh.procs[sidecar.proc_index]
            .terminate(Duration::from_secs(10))
            .await;
        assert!(
            status.is_some_and(|s| s.success()),
            "old sidecar drained and exited: {status:?}"
        );
        // Its app goes after it (the process started just before the sidecar).
        mesh.procs[sidecar.proc_index - 1].kill();
        wait_config(c.admin, Duration::from_secs(10), |d| {
            endpoints_in_dump(d, "backend") == 3
        })
        .await?;
    }
    // The load goes on 500 ms past the last step, and for at least 3.2 s in all, so that it
    // covers the update however fast sidecars start.
    let tail = tokio::time::Instant::now() + Duration::from_millis(500);
    tokio::time::sleep_until(tail.max(load_started + Duration::from_millis(3200))).await;
    let samples = load.finish().await?;
    let failed = samples.iter().filter(|(_, v)| v.is_none()).count();
    assert!(
        samples.len() >= 200 * 3,
        "constant load ran: {} requests",
        samples.len()
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the rollout",
        samples.len()
    );
    Ok(())
}

/// Test 4: mirroring 100% to a shadow that is slow (2 s) and failing leaves the client's
/// latency and success as they were, and the shadow receives the copies (bodies included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_to_a_slow_failing_shadow_changes_nothing_for_clients() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload_app("backend", "v1").await?;
    let (shadow, _) = mesh.workload_app("backend", "v2").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    set_weights(&mesh, c.admin, 100, 0, Duration::from_secs(10)).await?;
    admin_get(shadow, "/admin/sick/100").await?;
    admin_get(shadow, "/admin/delay/2000").await?;

    let n = 100;
    let slowest = |rs: &[Result<(u16, String, Duration), String>]| {
        rs.iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.2)
            .max()
            .unwrap_or_default()
    };
    let base = load(&http, n, 4, |_| get_req("http://backend/")).await;
    assert!(base.iter().all(|r| matches!(r, Ok((200, _, _)))));

    mesh.meshctl(&["route", "set", "backend", "--mirror", "v2@100%"])
        .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "backend" && s["mirror"] == "v2")
    })
    .await?;
    let before = app_requests(shadow).await?;
    let rs = load(&http, n, 4, |i| {
        if i % 2 == 0 {
            get_req("http://backend/")
        } else {
            let mut r = get_req("http://backend/orders");
            *r.method_mut() = http::Method::POST;
            *r.body_mut() = http_body_util::Full::new(bytes::Bytes::from_static(b"{\"order\":1}"));
            r
        }
    })
    .await;
    assert!(
        rs.iter().all(|r| matches!(r, Ok((200, _, _)))),
        "client saw only v1's answers: {rs:?}"
    );
    let (with, without) = (slowest(&rs), slowest(&base));
    assert!(
        with < Duration::from_millis(500),
        "slowest request with mirroring {with:?} (without: {without:?}); the shadow takes 2 s"
    );
    // The shadow counts a request when it arrives (before its 2 s delay).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = app_requests(shadow).await? - before;
        if got >= n as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shadow got {got} of {n} copies"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `meshctl canary status backend -o json` (exit status 3 once rolled back or aborted).
async fn canary(mesh: &Mesh) -> anyhow::Result<serde_json::Value> {
    let (code, out, err) = mesh
        .meshctl_exit(&["-o", "json", "canary", "status", "backend"])
        .await?;
    let s: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{e}: {err}"))?;
    let ended_badly = s["state"] == "rolled-back" || s["state"] == "aborted";
    anyhow::ensure!(
        code == if ended_badly { 3 } else { 0 },
        "exit {code} for {s}: {err}"
    );
    Ok(s)
}

/// Polls the canary until `pred` holds (bounded); returns the last status.
async fn wait_canary<F>(mesh: &Mesh, within: Duration, pred: F) -> anyhow::Result<serde_json::Value>
where
    F: Fn(&serde_json::Value) -> bool,
{
    let deadline = Instant::now() + within;
    loop {
        let s = canary(mesh).await?;
        if pred(&s) {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "canary never got there: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// v1 and v2 of backend, a client, all traffic on v1, and a constant 100 rps running.
async fn canary_setup(mesh: &mut Mesh) -> anyhow::Result<(Sidecar, std::net::SocketAddr, Load)> {
    mesh.workload_app("backend", "v1").await?;
    let (v2, _) = mesh.workload_app("backend", "v2").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    set_weights(mesh, c.admin, 100, 0, Duration::from_secs(10)).await?;
    Ok((c, v2, Load::start(http, 100)))
}

const START: &[&str] = &[
    "canary",
    "start",
    "backend",
    "--to",
    "v2",
    "--max-error-rate",
    "5%",
];

/// Test 5a: a healthy v2 is promoted to 100% after its steps, with no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, _, load) = canary_setup(&mut mesh).await?;
    let mut args = START.to_vec();
    args.extend([
        "--steps",
        "25,50,100",
        "--interval",
        "1s",
        "--min-requests",
        "10",
    ]);
    mesh.meshctl(&args).await?;
    let s = wait_canary(&mesh, Duration::from_secs(20), |s| s["state"] != "running").await?;
    assert_eq!(s["state"], "promoted", "{s}");
    wait_weights(c.admin, 0, 100).await?;
    let samples = load.finish().await?;
    assert!(
        samples.iter().all(|(_, v)| v.is_some()),
        "no request failed"
    );
    Ok(())
}

/// Test 5b: a v2 failing 20% of its requests is rolled back to 0% within one interval of the
/// breach, and `meshctl canary status` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_with_the_reason() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, v2, load) = canary_setup(&mut mesh).await?;
    admin_get(v2, "/admin/sick/20").await?;
    let mut args = START.to_vec();
    args.extend([
        "--steps",
        "25,50,100",
        "--interval",
        "3s",
        "--min-requests",
        "10",
    ]);
    let started = Instant::now();
    mesh.meshctl(&args).await?;
    let s = wait_canary(&mesh, Duration::from_secs(20), |s| s["state"] != "running").await?;
    let took = started.elapsed();
    eprintln!("rolled back {took:?} after the start: {}", s["reason"]);
    assert_eq!(s["state"], "rolled-back", "{s}");
    assert_eq!(s["step_index"], 0, "rolled back in the first step: {s}");
    assert!(
        took < Duration::from_secs(3),
        "within one interval: {took:?}"
    );
    let (code, out, _) = mesh.meshctl_exit(&["canary", "status", "backend"]).await?;
    assert!(
        out.contains("rolled-back") && out.contains("error rate"),
        "{out}"
    );
    assert_eq!(code, 3, "a rolled-back canary exits 3");
    wait_weights(c.admin, 100, 0).await?;
    load.finish().await?;
    Ok(())
}

/// Test 5c: the control plane restarts in the middle of a rollout; the rollout continues from
/// its step (state is in the store) and is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_survives_a_control_plane_restart() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_c, _, load) = canary_setup(&mut mesh).await?;
    let mut args = START.to_vec();
    args.extend([
        "--steps",
        "20,40,60,80,100",
        "--interval",
        "1s",
        "--min-requests",
        "5",
    ]);
    mesh.meshctl(&args).await?;
    let before = wait_canary(&mesh, Duration::from_secs(15), |s| {
        s["step_index"].as_u64().unwrap_or(0) >= 1
    })
    .await?;
    mesh.restart_control_plane().await?;
    let after = canary(&mesh).await?;
    assert!(
        after["step_index"].as_u64() >= before["step_index"].as_u64(),
        "resumed, not restarted: before {before}, after {after}"
    );
    let s = wait_canary(&mesh, Duration::from_secs(30), |s| s["state"] != "running").await?;
    assert_eq!(s["state"], "promoted", "{s}");
    load.finish().await?;
    Ok(())
}

/// `meshctl canary pause|resume|abort`: pausing holds the weight, resuming continues, aborting
/// sends everything back to the stable version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_can_be_paused_resumed_and_aborted() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, _, load) = canary_setup(&mut mesh).await?;
    let mut args = START.to_vec();
    args.extend(["--steps", "50,100", "--interval", "60s"]);
    mesh.meshctl(&args).await?;
    let s = canary(&mesh).await?;
    assert_eq!(
        (&s["state"], &s["weight"]),
        (&"running".into(), &50.into()),
        "{s}"
    );
    assert!(
        mesh.meshctl(&args).await.is_err(),
        "a second canary is refused"
    );
    for (action, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("abort", "aborted"),
    ] {
        mesh.meshctl(&["canary", action, "backend"]).await?;
        assert_eq!(canary(&mesh).await?["state"], state, "after {action}");
    }
    assert!(
        mesh.meshctl(&["canary", "resume", "backend"])
            .await
            .is_err(),
        "nothing to resume"
    );
    wait_weights(c.admin, 100, 0).await?;
    let samples = load.finish().await?;
    assert!(
        samples.iter().all(|(_, v)| v.is_some()),
        "no request failed"
    );
    Ok(())
}

/// Issue 27 item 5, service backends on the wire: a route of `podinfo` that splits between
/// two other services (`meshctl route set podinfo --weights svc/podinfo-primary=…`, what a
/// Gateway API backendRef becomes) sends requests to those services' workloads, each verified
/// by its own identity, at the weights set, and follows a shift to the canary with no failed
/// request; the services' own endpoints changing reaches the routed service's callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_split_between_services_as_gateway_backend_refs_do() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("podinfo", "v1").await?;
    mesh.workload("podinfo-primary", "v1").await?;
    mesh.workload("podinfo-canary", "v1").await?;
    let c = mesh.client("web").await?;
    for s in ["podinfo", "podinfo-primary", "podinfo-canary"] {
        mesh.wait_endpoints(s, 1).await?;
    }
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://podinfo/").await?.status, 200);
    let split = |primary: u64, canary: u64| {
        vec![
            ("podinfo-primary.default".to_string(), primary),
            ("podinfo-canary.default".to_string(), canary),
        ]
    };
    let served_by = |http: HttpClient, n: usize| async move {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let r = get(&http, "http://podinfo/").await?;
            anyhow::ensure!(r.status == 200, "{} {}", r.status, r.text);
            *counts
                .entry(r.json["service"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        anyhow::Ok(counts)
    };

    for (p, cn) in [(100, 0), (50, 50), (0, 100)] {
        let out = mesh
            .meshctl(&[
                "route",
                "set",
                "podinfo",
                "--weights",
                &format!("svc/podinfo-primary={p},svc/podinfo-canary={cn}"),
            ])
            .await?;
        assert!(out.contains("svc/podinfo-primary"), "{out}");
        wait_config(c.admin, Duration::from_secs(10), |d| {
            route_in_dump(d, "podinfo") == split(p, cn)
        })
        .await?;
        let counts = served_by(http.clone(), 60).await?;
        let primary = counts.get("podinfo-primary").copied().unwrap_or(0);
        let canary = counts.get("podinfo-canary").copied().unwrap_or(0);
        assert_eq!(
            primary + canary,
            60,
            "only the two backend services: {counts:?}"
        );
        match (p, cn) {
            (100, 0) => assert_eq!(canary, 0, "{counts:?}"),
            (0, 100) => assert_eq!(primary, 0, "{counts:?}"),
            _ => assert!((15..=45).contains(&primary), "{counts:?}"),
        }
    }
    // A second canary endpoint joins: podinfo's callers get it without a route change.
    mesh.workload("podinfo-canary", "v1").await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "podinfo")
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["version"] == "podinfo-canary.default")
            .count()
            == 2
    })
    .await?;
    // A backend service that does not exist is refused, naming it.
    let err = mesh
        .meshctl(&["route", "set", "podinfo", "--weights", "svc/nosuch=100"])
        .await
        .expect_err("an unknown backend service");
    assert!(err.to_string().contains("nosuch.default"), "{err}");
    Ok(())
}
