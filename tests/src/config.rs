//! Reading what a sidecar applied (`/config_dump`) and its metrics, and setting routes a
//! test then waits on.

use crate::*;
use std::net::SocketAddr;
use std::time::Duration;

/// The debug form of a service's policy in a /config_dump.
pub fn policy_in_dump(dump: &serde_json::Value, service: &str) -> Option<String> {
    dump["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| s["policy"].as_str())
        .map(str::to_string)
}

/// How many endpoints a service has in a /config_dump.
pub fn endpoints_in_dump(dump: &serde_json::Value, service: &str) -> usize {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
        .sum()
}

/// The names of a service's route rules in a /config_dump.
pub fn rules_in_dump(dump: &serde_json::Value, service: &str) -> Vec<String> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect()
}

/// Polls a sidecar's /config_dump until `pred` holds (bounded); returns the elapsed time.
pub async fn wait_config<F>(
    admin: SocketAddr,
    timeout: Duration,
    pred: F,
) -> anyhow::Result<Duration>
where
    F: Fn(&serde_json::Value) -> bool,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(r) = admin_get(admin, "/config_dump").await
            && pred(&r.json)
        {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "config condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The route weights a sidecar has for `service`, as `version=weight` pairs.
pub fn route_in_dump(dump: &serde_json::Value, service: &str) -> Vec<(String, u64)> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["route"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["version"].as_str().unwrap_or("").to_string(),
                b["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `backend` v1 and v2 behind sidecars, and a client sidecar `web` that has called `backend`
/// once (so it is subscribed). Returns the client sidecar and an HTTP/1.1 client through it.
pub async fn backend_v1_v2(mesh: &mut Mesh) -> anyhow::Result<(Sidecar, HttpClient)> {
    mesh.workload("backend", "v1").await?;
    mesh.workload("backend", "v2").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    let r = get(&http, "http://backend/").await?;
    anyhow::ensure!(r.status == 200, "first request: {} {}", r.status, r.text);
    Ok((c, http))
}

/// `meshctl route set backend --weights v1=…,v2=…`, then waits until the sidecar whose admin
/// port is `admin` has applied it; returns how long that took (error past `timeout`).
pub async fn set_weights(
    mesh: &Mesh,
    admin: SocketAddr,
    v1: u64,
    v2: u64,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let out = mesh
        .meshctl(&[
            "route",
            "set",
            "backend",
            "--weights",
            &format!("v1={v1},v2={v2}"),
        ])
        .await?;
    anyhow::ensure!(out.contains("route of backend set to"), "{out}");
    let want = vec![("v1".to_string(), v1), ("v2".to_string(), v2)];
    wait_config(admin, timeout, |d| route_in_dump(d, "backend") == want).await
}

/// Samples of one metric family in a `/metrics` page, by their labels (the `labels` listed),
/// parsed with a Prometheus text parser.
pub fn samples(
    text: &str,
    metric: &str,
    labels: &[&str],
    filter: &[(&str, &str)],
) -> anyhow::Result<std::collections::BTreeMap<Vec<String>, f64>> {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok::<_, std::io::Error>(l.into())))?;
    let mut out = std::collections::BTreeMap::new();
    for s in scrape.samples.iter().filter(|s| s.metric == metric) {
        if filter.iter().any(|(k, v)| s.labels.get(k) != Some(*v)) {
            continue;
        }
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let key = labels
            .iter()
            .map(|l| s.labels.get(l).unwrap_or("").to_string())
            .collect();
        *out.entry(key).or_insert(0.0) += v;
    }
    Ok(out)
}

/// An expected `samples` result from rows of (label values, value).
pub fn expect(rows: &[(&[&str], f64)]) -> std::collections::BTreeMap<Vec<String>, f64> {
    rows.iter()
        .map(|(k, v)| (k.iter().map(|s| s.to_string()).collect(), *v))
        .collect()
}

/// `meshctl <args>` on a manifest file, offline (`inject -f`, `inject --uninject -f`): the one
/// document it prints, parsed; `extra` flags after the file.
pub async fn meshctl_manifest(
    args: &[&str],
    path: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(crate::bin_dir().join("meshctl"))
        .args(args)
        .arg(path)
        .args(extra)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_saphyr::from_str(&String::from_utf8(out.stdout)?)?)
}

/// A settings file shipped in deploy/systemd/ (`name`), each `KEY=` line in `ours` given this
/// test's value, every other line kept. Errs if a key of `ours` is not in the shipped file (it
/// would have lost a setting users copy).
pub fn shipped_config(name: &str, ours: &[(&str, String)]) -> anyhow::Result<String> {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/systemd/{name}")),
    )?;
    let mut replaced = 0;
    let text: String = shipped
        .lines()
        .map(|l| match l.split_once('=') {
            Some((k, _)) if !l.starts_with('#') => match ours.iter().find(|(o, _)| *o == k) {
                Some((_, v)) => {
                    replaced += 1;
                    format!("{k}={v}\n")
                }
                None => format!("{l}\n"),
            },
            _ => format!("{l}\n"),
        })
        .collect();
    anyhow::ensure!(
        replaced == ours.len(),
        "the shipped {name} lost a key:\n{shipped}"
    );
    Ok(text)
}
