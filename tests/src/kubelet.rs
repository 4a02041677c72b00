//! The kubelet's part for a Deployment the control plane made, on one machine: runs its pod
//! template's one container (the mesh's proxy binary standing for its image) with the
//! environment the kubelet would give it, field references resolved for a pod
//! `<deployment>-0` at 127.0.0.1 and `$(VAR)` expanded, and its volumes written where it mounts
//! them: the trust-bundle ConfigMap, the projected ServiceAccount token, and the Secrets the
//! test hands in. A pod has a network namespace of its own; these share the machine's, so its
//! addresses move to loopback, its fixed in-pod ports (admin, outbound) to free ones, and the
//! control plane's in-cluster name resolves to the test's control plane.

use crate::{Mesh, READY_TIMEOUT, bin_dir};
use anyhow::Context;
use meshctl::process::Process;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::process::Command;

/// Secrets by name: each key's bytes, as the kubelet writes them into a mounted Secret.
pub type Secrets = BTreeMap<String, Vec<(String, Vec<u8>)>>;

/// Runs the container of `deployment` (its JSON); returns the proxy's readiness line.
pub async fn run_deployment(
    mesh: &mut Mesh,
    deployment: &Value,
    secrets: &Secrets,
) -> anyhow::Result<Value> {
    let meta = &deployment["metadata"];
    let ns = meta["namespace"].as_str().unwrap_or("default").to_string();
    let pod_name = format!("{}-0", meta["name"].as_str().context("no name")?);
    let spec = &deployment["spec"]["template"]["spec"];
    let account = spec["serviceAccountName"]
        .as_str()
        .context("no serviceAccountName")?
        .to_string();
    let containers = spec["containers"].as_array().context("no containers")?;
    anyhow::ensure!(containers.len() == 1, "one container expected");
    let c = &containers[0];
    let root = mesh.data_dir().join(format!("pod-{pod_name}"));

    let ca = std::fs::read(mesh.data_dir().join("ca/bundle.pem"))?;
    let token =
        meshctl::client::bootstrap_token(&mut mesh.admin, &format!("{ns}/{account}"), 0).await?;
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().context("a mount without a name")?;
        let path = m["mountPath"].as_str().context("a mount without a path")?;
        let v = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume {name}"))?;
        let local = root.join(name);
        std::fs::create_dir_all(&local)?;
        let files: Vec<(String, Vec<u8>)> = if v["configMap"].is_object() {
            // The trust bundle the control plane publishes in every namespace.
            v["configMap"]["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["path"].as_str())
                .map(|p| (p.to_string(), ca.clone()))
                .collect()
        } else if v["projected"].is_object() {
            v["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["serviceAccountToken"]["path"].as_str())
                .map(|p| (p.to_string(), token.clone().into_bytes()))
                .collect()
        } else if let Some(secret) = v["secret"]["secretName"].as_str() {
            secrets
                .get(secret)
                .with_context(|| format!("Secret {secret} not handed in"))?
                .clone()
        } else {
            anyhow::bail!("volume {name}: a kind this kubelet does not mount: {v}");
        };
        for (f, bytes) in files {
            std::fs::write(local.join(f), bytes)?;
        }
        mounts.push((path.to_string(), local));
    }

    let mut vars: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("an env var without a name")?;
        let raw = match e["value"].as_str() {
            Some(v) => v.to_string(),
            None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod_name.clone(),
                Some("metadata.namespace") => ns.clone(),
                Some("spec.serviceAccountName") => account.clone(),
                Some("status.podIP") => "127.0.0.1".into(),
                other => anyhow::bail!("{name}: a field this kubelet does not give: {other:?}"),
            },
        };
        let mut v = raw;
        for (k, val) in &vars {
            v = v.replace(&format!("$({k})"), val);
        }
        for (path, local) in &mounts {
            v = v.replace(path.as_str(), &local.display().to_string());
        }
        v = match name {
            "MESH_ADMIN_ADDR" | "MESH_OUTBOUND_ADDR" => "127.0.0.1:0".into(),
            "MESH_CONTROL_PLANE" => format!("https://{}", mesh.grpc),
            _ => v.replace("0.0.0.0:", "127.0.0.1:"),
        };
        vars.push((name.to_string(), v));
    }
    let mut cmd = Command::new(bin_dir().join("mesh-proxy"));
    cmd.env_clear()
        .envs(vars)
        .env("RUST_LOG", "info")
        .stderr(mesh.log(&pod_name)?);
    let (p, ready) = Process::spawn_ready(&pod_name, cmd, READY_TIMEOUT).await?;
    mesh.procs.push(p);
    Ok(ready)
}
