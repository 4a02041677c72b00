//! A service is (namespace, name) everywhere: two teams each have an `api`; a bare name
//! resolves in the caller's own namespace and `name.ns`, `name.ns.svc` and
//! `name.ns.svc.cluster.local` in the one named, as Kubernetes DNS does; routes and policies
//! of one namespace's service leave the other's alone; meshctl's `-n` and `-A` choose; and a
//! data directory written before namespaces upgrades in place.

use mesh_tests::*;
use std::time::Duration;

/// An example app of `service` (reporting `version`) with its sidecar in namespace `ns`.
async fn workload_in(
    mesh: &mut Mesh,
    ns: &str,
    service: &str,
    version: &str,
) -> anyhow::Result<Sidecar> {
    let app = mesh.app(service, version).await?;
    let node = format!("{service}-{ns}");
    mesh.sidecar(SidecarOpts {
        namespace: Some(ns),
        service: Some(service),
        version: Some(version),
        service_account: service,
        app: Some(app),
        node_id: Some(&node),
        ..Default::default()
    })
    .await
}

/// The version of the app that answered `url` through `client`.
async fn answered_by(client: &HttpClient, url: &str) -> anyhow::Result<String> {
    let r = get(client, url).await?;
    anyhow::ensure!(r.status == 200, "{url}: {} {}", r.status, r.text);
    Ok(r.json["version"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_each_have_their_own_api() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    // Same service name and account in two namespaces: neither is refused.
    workload_in(&mut mesh, "team-a", "api", "a1").await?;
    workload_in(&mut mesh, "team-b", "api", "b1").await?;
    let web_a = mesh
        .sidecar(SidecarOpts {
            namespace: Some("team-a"),
            service_account: "web",
            workers: 1,
            ..Default::default()
        })
        .await?;
    let web_b = mesh
        .sidecar(SidecarOpts {
            namespace: Some("team-b"),
            service_account: "web",
            workers: 1,
            ..Default::default()
        })
        .await?;
    let (a, b) = (h1_client(web_a.outbound), h1_client(web_b.outbound));

    // Resolution as Kubernetes DNS does it, from each caller's namespace.
    for (client, url, want) in [
        (&a, "http://api/", "a1"),
        (&a, "http://api.team-a/", "a1"),
        (&a, "http://api.team-b/", "b1"),
        (&a, "http://api.team-b.svc/", "b1"),
        (&a, "http://api.team-b.svc.cluster.local/", "b1"),
        (&b, "http://api/", "b1"),
        (&b, "http://api.team-a.svc.cluster.local/", "a1"),
    ] {
        assert_eq!(answered_by(client, url).await?, want, "{url}");
    }
    // The server sees the caller's own namespace in its identity.
    let r = get(&a, "http://api.team-b/").await?;
    assert_eq!(r.json["peer"], "spiffe://mesh.local/ns/team-a/sa/web");

    // A policy on team-b's api leaves team-a's alone.
    mesh.meshctl(&[
        "-n",
        "team-b",
        "policy",
        "set",
        "api",
        "--fault-abort",
        "503@100%",
    ])
    .await?;
    wait_config(web_a.admin, Duration::from_secs(5), |d| {
        d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "api.team-b" && s["policy"].to_string().contains("503"))
    })
    .await?;
    assert_eq!(get(&a, "http://api.team-b/").await?.status, 503);
    assert_eq!(answered_by(&a, "http://api/").await?, "a1");
    assert_eq!(get(&b, "http://api/").await?.status, 503);

    // meshctl: -n picks the namespace, -A shows all, the default namespace has neither.
    let one = mesh
        .meshctl(&["-n", "team-a", "-o", "json", "services"])
        .await?;
    let v: serde_json::Value = serde_json::from_str(&one)?;
    let names: Vec<(String, String)> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["namespace"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(names, [("api".to_string(), "team-a".to_string())]);
    let all = mesh.meshctl(&["-A", "services"]).await?;
    assert!(all.contains("team-a") && all.contains("team-b"), "{all}");
    let default = mesh.meshctl(&["services"]).await?;
    assert!(!default.contains("team-"), "{default}");
    let got = mesh
        .meshctl(&["policy", "get", "api.team-b", "-o", "json"])
        .await?;
    assert!(got.contains("503"), "{got}");
    Ok(())
}

/// A data directory written before services had namespaces (bare store keys) is upgraded in
/// place: each service becomes `name.<its namespace>` with its route, policy and endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_namespaces_upgrades_in_place() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    mesh.workload("backend", "v2").await?;
    mesh.wait_endpoints("backend", 2).await?;
    mesh.meshctl(&["route", "set", "backend", "--weights", "v1=30,v2=70"])
        .await?;
    mesh.meshctl(&["policy", "set", "backend", "--timeout", "3s"])
        .await?;
    mesh.kill_control_plane().await;
    // Rewrite the store as the previous release wrote it: bare service names in the keys.
    let path = mesh.data_dir().join("state.json");
    let text = std::fs::read_to_string(&path)?;
    let old = text.replace("backend.default", "backend");
    anyhow::ensure!(
        old != text,
        "the store names backend.default nowhere: {text}"
    );
    std::fs::write(&path, &old)?;
    mesh.restart_control_plane().await?;
    let services = mesh.meshctl(&["-o", "json", "services"]).await?;
    assert!(services.contains("\"backend\""), "{services}");
    let route = mesh
        .meshctl(&["route", "get", "backend", "-o", "json"])
        .await?;
    assert!(
        route.contains("70") && route.contains("backend.default"),
        "{route}"
    );
    let policy = mesh.meshctl(&["policy", "get", "backend"]).await?;
    assert!(policy.contains("timeouts.request_ms  3000"), "{policy}");
    let upgraded = std::fs::read_to_string(&path)?;
    assert!(upgraded.contains("routes/backend.default"), "{upgraded}");
    assert!(!upgraded.contains("\"routes/backend\""), "{upgraded}");
    Ok(())
}
