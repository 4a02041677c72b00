//! End-to-end tests of the mesh foundation: real control plane, sidecars and apps on loopback.

use mesh_proto::example::{EchoRequest, echo_client::EchoClient};
use mesh_proto::v1 as pb;
use mesh_tests::*;
use std::time::{Duration, Instant};

const WEB: &str = "spiffe://mesh.local/ns/default/sa/web";

fn share(counts: &std::collections::BTreeMap<String, usize>, v: &str, n: usize) -> f64 {
    *counts.get(v).unwrap_or(&0) as f64 * 100.0 / n as f64
}

/// Test 1: HTTP/1.1, h2c and gRPC (unary and server streaming) through client sidecar → mTLS →
/// server sidecar → app; the app sees its original protocol and the caller's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_pass_through_two_sidecars() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    assert_eq!(admin_get(c.admin, "/ready").await?.status, 200);
    assert_eq!(admin_get(c.admin, "/live").await?.status, 200);

    let r = get(&h1_client(c.outbound), "http://backend/hello").await?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["service"], "backend");
    assert_eq!(r.json["protocol"], "HTTP/1.1");
    assert_eq!(r.json["host"], "backend");
    assert_eq!(r.json["peer"], WEB);

    let r = get(
        &h2c_client(c.outbound),
        "http://backend.default.svc.cluster.local/h2",
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["protocol"], "HTTP/2.0");
    assert_eq!(r.json["path"], "/h2");
    assert_eq!(r.json["peer"], WEB);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.outbound))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    let mut echo = EchoClient::new(channel);
    let r = echo
        .unary(EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        (
            r.message.as_str(),
            r.served_by.as_str(),
            r.peer_identity.as_str()
        ),
        ("hi", "backend/v1", WEB)
    );
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 5,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await? {
        got.push(m.message);
    }
    assert_eq!(got, ["s 0", "s 1", "s 2", "s 3", "s 4"]);

    let r = get(&h1_client(c.outbound), "http://nosuch/").await?;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["x-mesh-error"], "unknown-service");
    let status = echo_unknown(c.outbound).await;
    assert_eq!(
        status,
        tonic::Code::Unimplemented,
        "gRPC to an unknown service gets a gRPC status"
    );
    Ok(())
}

async fn echo_unknown(outbound: std::net::SocketAddr) -> tonic::Code {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .map(|e| e.origin("http://nosuch".parse().expect("uri")))
    else {
        return tonic::Code::Ok;
    };
    let Ok(ch) = ch.connect().await else {
        return tonic::Code::Ok;
    };
    match EchoClient::new(ch).unary(EchoRequest::default()).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Test 3: `meshctl route set` 100/0 → 0/100 → 90/10 applies in under a second without restarts,
/// and 1,000 requests split within ±3 points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_weights_shift_traffic_live() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    let pids_before: Vec<_> = mesh.procs.iter().map(|p| p.pid()).collect();

    for (v1, v2) in [(100u64, 0u64), (0, 100), (90, 10)] {
        let took = set_weights(&mesh, c.admin, v1, v2, Duration::from_secs(1)).await?;
        eprintln!(
            "weights v1={v1},v2={v2} applied by the client sidecar {took:?} after meshctl returned"
        );
        assert!(took < Duration::from_secs(1), "applied after {took:?}");
        let (counts, failed) = split(&http, "http://backend/", 1000).await?;
        assert_eq!(failed, 0);
        for (v, w) in [("v1", v1), ("v2", v2)] {
            let got = share(&counts, v, 1000);
            assert!(
                (got - w as f64).abs() <= 3.0,
                "{v}: {got}% of traffic, want {w}% ±3 ({counts:?})"
            );
        }
    }
    let pids_after: Vec<_> = mesh.procs.iter().map(|p| p.pid()).collect();
    assert_eq!(pids_before, pids_after, "no process was restarted");

    let json = mesh
        .meshctl(&["route", "history", "backend", "-o", "json"])
        .await?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(v["history"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["history"][0]["route"]["backends"][0]["weight"], 90);
    Ok(())
}

/// meshctl refuses invalid weights with a clear message and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_weights_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 1).await?;
    mesh.meshctl(&["route", "set", "backend", "--weights", "v1=100"])
        .await?;
    for (weights, msg) in [
        ("v1=-5", "negative"),
        ("v1=0", "weights sum to 0"),
        ("v1=1,v1=2", "listed twice"),
        ("v1=50,v9=50", "unknown version \"v9\""),
        ("v1=abc", "not a whole number"),
    ] {
        let err = mesh
            .meshctl(&["route", "set", "backend", "--weights", weights])
            .await
            .expect_err(weights);
        assert!(err.to_string().contains(msg), "{weights}: {err}");
    }
    let err = mesh
        .meshctl(&["route", "set", "nosuch", "--weights", "v1=1"])
        .await
        .expect_err("unknown service");
    assert!(err.to_string().contains("unknown service"), "{err}");
    let got: serde_json::Value = serde_json::from_str(
        &mesh
            .meshctl(&["route", "get", "backend", "-o", "json"])
            .await?,
    )?;
    assert_eq!(
        got["route"]["backends"],
        serde_json::json!([{"version": "v1", "weight": 100}])
    );
    Ok(())
}

/// Test 4: the control plane SIGKILLed → traffic keeps flowing on the last config; restarted on
/// the same data dir → routes and CA intact, proxies resubscribe, new changes propagate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_crash_keeps_traffic_and_state() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    set_weights(&mesh, c.admin, 50, 50, Duration::from_secs(2)).await?;
    let root_before = mesh.ca_pem()?;

    mesh.kill_control_plane().await;
    let (counts, failed) = split(&http, "http://backend/", 200).await?;
    assert_eq!(
        failed, 0,
        "requests failed while the control plane was down"
    );
    assert_eq!((counts["v1"], counts["v2"]), (100, 100));
    assert_eq!(
        admin_get(c.admin, "/ready").await?.status,
        200,
        "still ready on the last good config"
    );

    mesh.restart_control_plane().await?;
    assert_eq!(mesh.ca_pem()?, root_before, "CA root survived the restart");
    let got: serde_json::Value = serde_json::from_str(
        &mesh
            .meshctl(&["route", "get", "backend", "-o", "json"])
            .await?,
    )?;
    assert_eq!(
        got["route"]["backends"],
        serde_json::json!([{"version": "v1", "weight": 50}, {"version": "v2", "weight": 50}])
    );

    // All three proxies reconnect (backoff is at most ~7.5 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = mesh
            .admin
            .list_proxies(pb::ListProxiesRequest {})
            .await?
            .into_inner()
            .proxies;
        if p.len() == 3 && p.iter().all(|p| p.acked_version > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxies did not resubscribe: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_weights(&mesh, c.admin, 0, 100, Duration::from_secs(1)).await?;
    let (counts, failed) = split(&http, "http://backend/", 50).await?;
    assert_eq!((failed, counts.get("v2").copied()), (0, Some(50)));

    // A workload certified by the restarted control plane talks to one certified before it.
    let c2 = mesh.client("web2").await?;
    let r = get(&h1_client(c2.outbound), "http://backend/").await?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["peer"], "spiffe://mesh.local/ns/default/sa/web2");
    Ok(())
}

/// Test 5: a config the proxy cannot apply (weights summing to 0, written raw) is NACKed, the
/// proxy keeps its previous routes, and `meshctl proxies` shows the NACK and its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unappliable_config_is_nacked_and_last_good_kept() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    set_weights(&mesh, c.admin, 50, 50, Duration::from_secs(2)).await?;
    let good = vec![("v1".to_string(), 50), ("v2".to_string(), 50)];

    let bad = pb::Route {
        backends: vec![
            pb::WeightedBackend {
                version: "v1".into(),
                weight: 0,
                ..Default::default()
            },
            pb::WeightedBackend {
                version: "v2".into(),
                weight: 0,
                ..Default::default()
            },
        ],
        rules: Vec::new(),
        mirror: None,
    };
    let set = mesh
        .admin
        .set_route(pb::SetRouteRequest {
            service: "backend".into(),
            route: Some(bad),
            skip_validation: true,
            expected_revision: 0,
        })
        .await?
        .into_inner();

    let deadline = Instant::now() + Duration::from_secs(5);
    let nack = loop {
        let proxies = mesh
            .admin
            .list_proxies(pb::ListProxiesRequest {})
            .await?
            .into_inner()
            .proxies;
        // Wait for all three: each proxy answers the push on its own stream.
        let nacked: Vec<_> = proxies
            .into_iter()
            .filter(|p| p.nacked_version >= set.revision)
            .collect();
        if nacked.len() == 3
            && let Some(p) = nacked.into_iter().find(|p| p.identity == WEB)
        {
            break p;
        }
        assert!(Instant::now() < deadline, "not every proxy NACKed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        nack.nack_reason.contains("weights sum to 0"),
        "{}",
        nack.nack_reason
    );
    let table = mesh.meshctl(&["proxies"]).await?;
    assert!(
        table.contains("NACK REASON") && table.contains("weights sum to 0"),
        "{table}"
    );
    let m = admin_get(mesh.http, "/metrics").await?.text;
    // Every proxy subscribed to backend (its two sidecars and web's) refused it.
    assert_eq!(
        samples(&m, "mesh_cp_nacking_proxies", &[], &[])?,
        expect(&[(&[], 3.0)]),
        "{m}"
    );
    assert!(
        samples(&m, "mesh_cp_nacks_total", &[], &[])?[&vec![]] >= 1.0,
        "{m}"
    );

    assert_eq!(
        route_in_dump(&admin_get(c.admin, "/config_dump").await?.json, "backend"),
        good
    );
    let (counts, failed) = split(&http, "http://backend/", 100).await?;
    assert_eq!(
        (failed, counts["v1"], counts["v2"]),
        (0, 50, 50),
        "previous routes still serve"
    );

    // A valid route afterwards is applied and clears the NACK.
    set_weights(&mesh, c.admin, 100, 0, Duration::from_secs(1)).await?;
    Ok(())
}

/// SIGTERM on a sidecar: it deregisters, finishes the request in flight, and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_deregisters() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let app = mesh.app("backend", "v1").await?;
    let b = mesh
        .sidecar(SidecarOpts {
            env: &[],
            namespace: None,
            service: Some("backend"),
            version: Some("v1"),
            service_account: "backend",
            app: Some(app),
            node_id: Some("b1"),
            workers: 0,
            extra: &[],
        })
        .await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);

    let slow = tokio::spawn({
        let http = http.clone();
        async move { get(&http, "http://backend/delay/1500").await }
    });
    // Wait until the request is inside the app.
    let app_client = h1_client(app);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&app_client, &format!("http://{app}/inflight"))
        .await?
        .json["inflight"]
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "slow request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let status = mesh.procs[b.proc_index]
        .terminate(Duration::from_secs(10))
        .await;
    assert!(
        status.is_some_and(|s| s.success()),
        "sidecar exit: {status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        started.elapsed()
    );
    let r = slow.await??;
    assert_eq!(
        r.status, 200,
        "in-flight request finished during drain: {}",
        r.text
    );
    mesh.wait_endpoints("backend", 0).await?;
    let r = get(&http, "http://backend/").await?;
    assert_eq!(
        (
            r.status.as_u16(),
            r.headers
                .get("x-mesh-error")
                .map(|v| v.to_str().unwrap_or(""))
        ),
        (503, Some("no-healthy-endpoints"))
    );
    Ok(())
}

/// Certificates renew at ~70% of their lifetime while traffic flows, with no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_under_traffic() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with(&["--cert-ttl-secs", "6"]).await?;
    mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    let expiry = |d: &serde_json::Value| d["certificate"]["expires_at_unix"].as_i64();
    let first = expiry(&admin_get(c.admin, "/config_dump").await?.json).expect("certificate");
    let http = h1_client(c.outbound);
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut sent = 0;
    loop {
        let r = get(&http, "http://backend/").await?;
        assert_eq!(r.status, 200, "{}", r.text);
        sent += 1;
        if expiry(&admin_get(c.admin, "/config_dump").await?.json).is_some_and(|e| e > first) {
            break;
        }
        assert!(Instant::now() < deadline, "certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New connections after renewal still verify on both sides.
    let r = get(&h2c_client(c.outbound), "http://backend/after").await?;
    assert_eq!(r.status, 200);
    assert!(sent > 10);
    Ok(())
}

/// With the control plane gone, renewal fails; the proxies keep serving with their still-valid
/// certificates (and keep the ones they have rather than dropping them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_keeps_serving_while_renewal_fails() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with(&["--cert-ttl-secs", "10"]).await?;
    mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    let expiry = |d: &serde_json::Value| d["certificate"]["expires_at_unix"].as_i64();
    let issued = expiry(&admin_get(c.admin, "/config_dump").await?.json).expect("certificate");
    mesh.kill_control_plane().await;
    // Renewal is due at ~7 s of the 10 s lifetime; keep calling until 8.5 s after issuance.
    let until = issued - 10 + 8;
    let mut sent = 0;
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64)
        <= until
    {
        let r = get(&http, "http://backend/").await?;
        assert_eq!(r.status, 200, "{}", r.text);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dump = admin_get(c.admin, "/config_dump").await?.json;
    assert_eq!(expiry(&dump), Some(issued), "renewal cannot have succeeded");
    assert_eq!(admin_get(c.admin, "/ready").await?.status, 200);
    assert!(sent > 20);
    Ok(())
}

/// The quick start: `meshctl demo` starts everything, traffic flows through the mesh with no
/// failures, and SIGINT stops every process it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_stops_cleanly() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = tempfile::tempdir()?;
    let mut demo = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["demo", "--rps", "50", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut said = Vec::new();
    let report = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with("last 2s:") {
                return Ok::<_, std::io::Error>(l);
            }
            said.push(l);
        }
        Ok(String::new())
    })
    .await??;
    // It starts from a fixed split, every request on v1, which `route set` then moves.
    assert!(
        said.iter().any(|l| l.contains("backend v1=100,v2=0")),
        "{said:?}"
    );
    assert!(
        report.contains(" ok, 0 failed")
            && report.contains("backend v1")
            && !report.contains("backend v2"),
        "{report}"
    );
    let ok: u32 = report
        .trim_start_matches("last 2s: ")
        .split(' ')
        .next()
        .unwrap_or("0")
        .parse()?;
    assert!(ok >= 50, "{report}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.id().expect("pid"))?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait()).await??;
    assert!(status.success(), "{status:?}");
    // Everything it started is gone: its ports are free again.
    for port in [
        15010, 15011, 15001, 15106, 15206, 15306, 18080, 18081, 18082,
    ] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still in use"
        );
    }
    Ok(())
}

/// Issue 27 item 6, meshctl as scripts and shells use it: `-o yaml|json|wide` on read verbs,
/// completions that bash loads, `version` with the control plane's and its proxies' versions,
/// `route get` saying what "no split" does, and exit statuses: an authorization DENY and a
/// canary rolled back under `canary start --watch` (which shows each step on stderr) exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_fits_scripts_and_shells() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload_app("backend", "v1").await?;
    let (v2, _) = mesh.workload_app("backend", "v2").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);

    // Structured output: the same data as YAML and JSON.
    let yaml: serde_json::Value =
        serde_saphyr::from_str(&mesh.meshctl(&["-o", "yaml", "services"]).await?)?;
    let json: serde_json::Value =
        serde_json::from_str(&mesh.meshctl(&["-o", "json", "services"]).await?)?;
    assert_eq!(yaml, json);
    assert_eq!(json["services"][0]["name"], "backend", "{json}");
    // Wide tables: more columns, same rows.
    let narrow = mesh.meshctl(&["proxies"]).await?;
    let wide = mesh.meshctl(&["-o", "wide", "proxies"]).await?;
    assert!(!narrow.contains("CERT EXPIRES"), "{narrow}");
    assert!(
        wide.contains("CERT EXPIRES") && wide.contains("SUBSCRIPTIONS"),
        "{wide}"
    );
    assert_eq!(narrow.lines().count(), wide.lines().count());

    // Completions: bash loads the script and registers meshctl; zsh and fish scripts too.
    let script = mesh.meshctl(&["completion", "bash"]).await?;
    let path = mesh.dir.path().join("meshctl.bash");
    std::fs::write(&path, &script)?;
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p meshctl", path.display()))
        .output()
        .await?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("meshctl"), "{said}");
    assert!(
        mesh.meshctl(&["completion", "zsh"])
            .await?
            .starts_with("#compdef meshctl")
    );
    assert!(
        mesh.meshctl(&["completion", "fish"])
            .await?
            .contains("complete -c meshctl")
    );

    // version: client, control plane and the three proxies.
    let v: serde_json::Value =
        serde_json::from_str(&mesh.meshctl(&["-o", "json", "version"]).await?)?;
    let ours = env!("CARGO_PKG_VERSION");
    assert_eq!(v["client"], ours, "{v}");
    assert_eq!(v["control_plane"], ours, "{v}");
    assert_eq!(v["proxies"], serde_json::json!({ ours: 3 }), "{v}");

    // No split: not "equal", but the balancer's choice, said so.
    let got = mesh.meshctl(&["route", "get", "backend"]).await?;
    assert!(
        got.contains("(no split)") && got.contains("p2c-ewma") && got.contains("--weights"),
        "{got}"
    );

    // authz check: DENY exits 3, ALLOW 0.
    mesh.meshctl(&["authz", "default", "default", "deny-all"])
        .await?;
    let (code, out, _) = mesh
        .meshctl_exit(&["authz", "check", "--from", "default/web", "--to", "backend"])
        .await?;
    assert_eq!((code, out.starts_with("DENY")), (3, true), "{out}");
    mesh.meshctl(&["authz", "default", "default", "allow-all"])
        .await?;
    let (code, out, _) = mesh
        .meshctl_exit(&["authz", "check", "--from", "default/web", "--to", "backend"])
        .await?;
    assert_eq!((code, out.starts_with("ALLOW")), (0, true), "{out}");

    // canary start --watch: follows a failing v2 to its rollback, step by step on stderr,
    // and exits 3.
    set_weights(&mesh, c.admin, 100, 0, Duration::from_secs(10)).await?;
    admin_get(v2, "/admin/sick/50").await?;
    let load = Load::start(http, 100);
    let (code, out, progress) = mesh
        .meshctl_exit(&[
            "canary",
            "start",
            "backend",
            "--to",
            "v2",
            "--steps",
            "50,100",
            "--interval",
            "3s",
            "--max-error-rate",
            "5%",
            "--min-requests",
            "10",
            "--watch",
        ])
        .await?;
    load.finish().await?;
    assert_eq!(code, 3, "{out}\n{progress}");
    assert!(out.contains("rolled-back"), "{out}");
    assert!(
        progress.contains("running step 1/2: 50% to v2")
            && progress.contains("rolled-back step 1/2")
            && progress.contains("error rate"),
        "{progress}"
    );
    Ok(())
}
