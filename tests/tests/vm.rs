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
    mesh.procs[doomed.proc_index].kill();
    mesh.procs[doomed.proc_index - 1].kill();
    let killed = Instant::now();
    let (mut sent, mut failed) = (0, Vec::new());
    let removed_after = loop {
        let r = get(&http, "http://backend/").await?;
        sent += 1;
        if r.status != 200 {
            failed.push(format!("{} {}", r.status, r.text));
        }
        let eps = mesh
            .meshctl(&["-o", "json", "endpoints", "--service", "backend"])
            .await?;
        let n = serde_json::from_str::<serde_json::Value>(&eps)?["endpoints"]
            .as_array()
            .map_or(0, Vec::len);
        if n == 1 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < lease + Duration::from_secs(5),
            "endpoint still there: {eps}"
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
        let eps = mesh
            .meshctl(&["-o", "json", "endpoints", "--service", "backend"])
            .await?;
        let n = serde_json::from_str::<serde_json::Value>(&eps)?["endpoints"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(n, 1, "{eps}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
