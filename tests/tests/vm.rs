//! Services as processes on machines: what happens when a machine is lost.

use mesh_tests::*;
use std::time::Duration;
use tokio::time::Instant;

/// Test 4 of the VM issue, on one machine: a workload's proxy and app are SIGKILLed (no
/// deregistration, like a lost machine). Meanwhile callers' requests that meet the dead
/// endpoint fail to connect and go to the other one; the endpoint is removed once its lease
/// ends (not before), and the caller's config drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_endpoint_is_removed_after_its_lease() -> anyhow::Result<()> {
    let lease = Duration::from_secs(2);
    let mut mesh = Mesh::start_with(&["--endpoint-lease-secs", "2"]).await?;
    mesh.workload("backend", "v1").await?;
    let doomed = mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    for _ in 0..10 {
        assert_eq!(get(&http, "http://backend/").await?.status, 200);
    }

    // The machine goes: proxy and app killed, nothing deregistered.
    for i in [doomed.proc_index, doomed.proc_index - 1] {
        mesh.procs[i].kill();
        mesh.procs[i].wait().await;
    }
    let killed = Instant::now();
    // The caller sees its connection to the dead sidecar close (a request already written to
    // it when the machine died would fail: that is not what this test is about).
    wait_config(c.admin, Duration::from_secs(5), |d| {
        d["peer_connections"].as_u64().is_some_and(|n| n <= 1)
    })
    .await?;
    let (mut sent, mut failed) = (0, Vec::new());
    let removed_after = loop {
        let r = get(&http, "http://backend/").await?;
        sent += 1;
        if r.status != 200 {
            failed.push(format!("{} {}", r.status, r.text));
        }
        let eps = readiness(&mesh).await?;
        if eps.len() == 1 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < lease + Duration::from_secs(5),
            "endpoint still there: {eps:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        removed_after >= lease,
        "removed after {removed_after:?}, before the lease"
    );
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(sent > 5, "only {sent} requests during the lease");
    // The caller's config follows; its requests all go to the live endpoint.
    wait_config(c.admin, Duration::from_secs(5), |d| {
        d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "backend")
            .all(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 1))
    })
    .await?;
    for _ in 0..20 {
        assert_eq!(get(&http, "http://backend/").await?.status, 200);
    }
    Ok(())
}

/// A proxy that reconnects within the lease (here: the control plane restarts) keeps its
/// endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_survive_a_control_plane_restart_within_the_lease() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with(&["--endpoint-lease-secs", "3"]).await?;
    mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 1).await?;
    mesh.kill_control_plane().await;
    mesh.restart_control_plane().await?;
    // Past the lease, counted from the restart: the proxy reconnected, the endpoint stayed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let eps = readiness(&mesh).await?;
        assert_eq!(eps.len(), 1, "{eps:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Each backend endpoint's id and ready flag, from `meshctl endpoints`.
async fn readiness(mesh: &Mesh) -> anyhow::Result<Vec<(String, bool)>> {
    let eps = mesh
        .meshctl(&["-o", "json", "endpoints", "--service", "backend"])
        .await?;
    let v: serde_json::Value = serde_json::from_str(&eps)?;
    Ok(v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["ready"] == true,
            )
        })
        .collect())
}

/// The standalone proxy checks its app itself (HTTP here): an app answering 500 is
/// registered as not ready and callers stop sending to it; when it recovers it is ready
/// again and gets traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_check_drives_endpoint_readiness() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    // The checked workload is v2, so each answer says which app gave it (its health probes
    // reach the app too, so the app's own request count cannot tell).
    let app = mesh.app("backend", "v2").await?;
    mesh.sidecar(SidecarOpts {
        service: Some("backend"),
        version: Some("v2"),
        service_account: "backend",
        app: Some(app),
        node_id: Some("checked"),
        extra: &[
            "--app-health-check",
            "http:/",
            "--app-health-interval-ms",
            "100",
        ],
        ..Default::default()
    })
    .await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    let checked_ready =
        |r: &[(String, bool)]| r.iter().find(|(id, _)| id == "checked").map(|e| e.1);

    let wait_ready = |want: bool| {
        let mesh = &mesh;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let r = readiness(mesh).await?;
                if checked_ready(&r) == Some(want) {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "checked endpoint not ready={want}: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_ready(true).await?;
    // The caller subscribes to backend with its first request.
    assert_eq!(get(&http, "http://backend/").await?.status, 200);

    // The app fails every request: its proxy's check sees it, the endpoint is not ready.
    get(&h1_client(app), "http://backend/admin/sick/100").await?;
    wait_ready(false).await?;
    wait_config(c.admin, Duration::from_secs(5), |d| {
        d["services"].as_array().into_iter().flatten().any(|s| {
            s["endpoints"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e["id"] == "checked" && e["ready"] == false)
            })
        })
    })
    .await?;
    for _ in 0..30 {
        let r = get(&http, "http://backend/").await?;
        assert_eq!(r.status, 200, "the healthy endpoint answers: {}", r.text);
        assert_eq!(r.json["version"], "v1", "the unhealthy app got a request");
    }

    // Recovered: ready again, and traffic comes back.
    get(&h1_client(app), "http://backend/admin/sick/0").await?;
    wait_ready(true).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&http, "http://backend/").await?;
        assert_eq!(r.status, 200);
        if r.json["version"] == "v2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recovered app gets no traffic"
        );
    }
    Ok(())
}

/// The standalone proxy runs from the settings file shipped in deploy/systemd/ (every key of
/// it kept; the machine-specific values replaced by this test's), with nothing on its command
/// line but `--config-file`, and no MESH_* environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_proxy_runs_from_the_shipped_config_file() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let app = mesh.app("catalog", "v1").await?;
    let dir = mesh.dir.path().to_path_buf();
    let token_file = dir.join("catalog.token");
    std::fs::write(&token_file, mesh.token("catalog").await?)?;
    let inbound = format!("127.0.0.1:{}", free_port());
    let ours = [
        ("MESH_CONTROL_PLANE", format!("https://{}", mesh.grpc)),
        (
            "MESH_CA_FILE",
            mesh.data_dir().join("ca/bundle.pem").display().to_string(),
        ),
        ("MESH_TOKEN_FILE", token_file.display().to_string()),
        ("MESH_APP_PORT", app.port().to_string()),
        ("MESH_INBOUND_ADDR", inbound.clone()),
        ("MESH_ADVERTISE_ADDR", inbound),
        ("MESH_OUTBOUND_ADDR", "127.0.0.1:0".into()),
        ("MESH_ADMIN_ADDR", "127.0.0.1:0".into()),
    ];
    let text = shipped_config("proxy-catalog.env", &ours)?;
    let file = dir.join("proxy-catalog.env");
    std::fs::write(&file, text)?;

    let mut cmd = tokio::process::Command::new(bin_dir().join("mesh-proxy"));
    cmd.arg("--config-file")
        .arg(&file)
        .env_clear()
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.join("catalog-file-proxy.log"))?);
    let (p, ready) = process::Process::spawn_ready("catalog proxy", cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    assert!(ready["inbound"].is_string(), "{ready}");
    mesh.wait_endpoints("catalog", 1).await?;
    let eps = mesh
        .meshctl(&["-o", "json", "endpoints", "--service", "catalog"])
        .await?;
    let eps: serde_json::Value = serde_json::from_str(&eps)?;
    assert_eq!(eps["endpoints"][0]["labels"]["version"], "v1", "{eps}");
    assert_eq!(
        eps["endpoints"][0]["ready"], true,
        "health check passed: {eps}"
    );
    let c = mesh.client("web").await?;
    let r = get(&h1_client(c.outbound), "http://catalog/items").await?;
    assert_eq!(r.status, 200, "{}", r.text);
    Ok(())
}
