//! Several control-plane replicas sharing state through a real etcd (Debian's `etcd-server`,
//! started by the test with a temporary data directory; skipped with a message when it is not
//! installed): a write on one replica reaches proxies connected to another within a second,
//! exactly one replica leads the singleton work, and an etcd outage leaves traffic flowing and
//! writes refused with a clear error until etcd is back.

use mesh_tests::etcd::{Etcd, shared_ca};
use mesh_tests::*;
use std::time::Duration;

/// Replica `id` of a control plane on `etcd`, signing with the shared CA.
async fn replica(
    etcd: &Etcd,
    ca: &(std::path::PathBuf, std::path::PathBuf),
    id: &str,
) -> anyhow::Result<Mesh> {
    let (cert, key) = (ca.0.display().to_string(), ca.1.display().to_string());
    Mesh::start_with(&[
        "--store",
        &etcd.url(),
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--replica-id",
        id,
        "--leader-lease-secs",
        "3",
    ])
    .await
}

/// `mesh_cp_<name>` on a control plane's /metrics.
async fn cp_gauge(mesh: &Mesh, name: &str) -> anyhow::Result<i64> {
    let m = admin_get(mesh.http, "/metrics").await?;
    m.text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("mesh_cp_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no mesh_cp_{name} in /metrics"))
}

/// Waits until exactly one of `replicas` leads; returns its index.
async fn one_leader(replicas: &[&Mesh], within: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut leading = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if cp_gauge(r, "leader").await? == 1 {
                leading.push(i);
            }
        }
        anyhow::ensure!(leading.len() <= 1, "two leaders at once: {leading:?}");
        if let [i] = leading[..] {
            return Ok(i);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no leader within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tests 2 and 5 of the VM/etcd issue, on loopback: two replicas on one etcd; backend's
/// endpoints register through replica A, the client's proxy is connected to replica B. A
/// route set on A reaches the client in under a second; one replica leads. With etcd stopped,
/// traffic keeps flowing, reads are served, and a write is refused naming the store; after
/// etcd returns, writes work again and reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_writes_and_ride_out_an_etcd_outage() -> anyhow::Result<()> {
    if let Some(why) = mesh_tests::etcd::missing() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut etcd = Etcd::start(None, "127.0.0.1", dir.path()).await?;
    let ca = shared_ca(dir.path())?;
    let mut a = replica(&etcd, &ca, "a").await?;
    let mut b = replica(&etcd, &ca, "b").await?;
    a.workload("backend", "v1").await?;
    a.workload("backend", "v2").await?;
    let c = b.client("web").await?;
    // B sees what registered through A.
    b.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    let r = get(&http, "http://backend/").await?;
    assert_eq!(r.status, 200, "{}", r.text);

    for (v1, v2) in [(100, 0), (0, 100), (30, 70)] {
        let took = set_weights(&a, c.admin, v1, v2, Duration::from_secs(1)).await?;
        assert!(took < Duration::from_secs(1), "{v1}/{v2} took {took:?}");
    }
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await?;
    eprintln!("replica {} leads", ["a", "b"][leader]);

    etcd.stop().await;
    // Traffic does not need the store.
    let (counts, failed) = split(&http, "http://backend/", 50).await?;
    assert_eq!(failed, 0, "{counts:?}");
    // Reads are served from memory; a write is refused with the reason.
    let got = a.meshctl(&["route", "get", "backend"]).await?;
    assert!(got.contains("v2"), "{got}");
    let err = a
        .meshctl(&["route", "set", "backend", "--weights", "v1=50,v2=50"])
        .await
        .expect_err("a write with etcd down must be refused");
    assert!(
        err.to_string().contains("store unavailable") && err.to_string().contains("etcd"),
        "{err}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cp_gauge(&b, "store_up").await? != 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "store_up stayed 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The refused write changed nothing anywhere.
    let want = vec![("v1".to_string(), 30), ("v2".to_string(), 70)];
    let dump = admin_get(c.admin, "/config_dump").await?;
    assert_eq!(route_in_dump(&dump.json, "backend"), want);

    etcd.restart().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match set_weights(&a, c.admin, 50, 50, Duration::from_secs(5)).await {
            Ok(_) => break,
            Err(e) => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "writes did not resume after etcd came back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(cp_gauge(&b, "store_up").await?, 1);
    let (counts, failed) = split(&http, "http://backend/", 50).await?;
    assert_eq!(failed, 0, "{counts:?}");
    Ok(())
}
