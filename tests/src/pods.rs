//! Pods in a real container runtime: podman (installed and configured by
//! scripts/install-test-deps.sh, as ../shared/notes/containers.md describes), the images of
//! scripts/build-images.sh, and a network of the test's own. A pod spec the injector produced
//! is run as Kubernetes would run it: a pod (one network namespace), its init containers in
//! order (`mesh-init` with NET_ADMIN programs the pod's iptables), the native sidecar with its
//! environment resolved (field references, `$(VAR)`), its volumes as files, then the app
//! containers once the sidecar's startup probe passes. The kubelet's part (probes) is played
//! by the test over the pod's address.

use anyhow::Context;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// Why pod tests cannot run here (they must run in CI: a missing tool fails them).
pub fn missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("podman pods need root".into());
    }
    for tool in ["podman", "nsenter", "curl", "tcpdump"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        if !found {
            return Some(format!(
                "{tool} is missing (scripts/install-test-deps.sh installs it)"
            ));
        }
    }
    None
}

/// Runs podman; its stdout, or an error with its stderr.
pub async fn podman(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("podman").args(args).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The workspace version: the images' tag.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Builds the images from the binaries under test (scripts/build-images.sh).
pub async fn build_images() -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-images.sh");
    let out = Command::new(script).arg(crate::bin_dir()).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "build-images: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A podman network of the test's own (removed on drop, with every pod and container on it).
pub struct Net {
    pub name: String,
    pub gateway: Ipv4Addr,
    pods: Vec<String>,
    containers: Vec<String>,
}

impl Net {
    pub async fn create(tag: &str) -> anyhow::Result<Self> {
        let n = std::process::id() % 200 + 20;
        let name = format!("mesh-{tag}-{}", std::process::id());
        let subnet = format!("10.213.{n}.0/24");
        let _ = podman(&["network", "rm", "-f", &name]).await;
        podman(&["network", "create", "--subnet", &subnet, &name]).await?;
        Ok(Self {
            name,
            gateway: Ipv4Addr::new(10, 213, n as u8, 1),
            pods: Vec::new(),
            containers: Vec::new(),
        })
    }

    /// Runs a container on the network (outside any pod): its name and address.
    pub async fn container(
        &mut self,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<(String, Ipv4Addr)> {
        let full = format!("{}-{name}", self.name);
        let _ = podman(&["rm", "-f", &full]).await;
        let mut a = vec!["run", "-d", "--name", &full, "--network", &self.name];
        a.extend_from_slice(args);
        podman(&a).await?;
        self.containers.push(full.clone());
        let ip = podman(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &full,
        ])
        .await?
        .parse()
        .context("container address")?;
        Ok((full, ip))
    }

    /// Starts an empty pod: its infra container holds the network namespace.
    pub async fn pod(&mut self, name: &str) -> anyhow::Result<PodRef> {
        let full = format!("{}-{name}", self.name);
        let _ = podman(&["pod", "rm", "-f", &full]).await;
        podman(&["pod", "create", "--name", &full, "--network", &self.name]).await?;
        podman(&["pod", "start", &full]).await?;
        self.pods.push(full.clone());
        let infra = podman(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &full]).await?;
        let ip = podman(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &infra,
        ])
        .await?
        .parse()
        .context("pod address")?;
        let pid = podman(&["inspect", "-f", "{{.State.Pid}}", &infra])
            .await?
            .parse()
            .context("pod pid")?;
        Ok(PodRef {
            name: full,
            ip,
            pid,
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &self.pods {
            let _ = std::process::Command::new("podman")
                .args(["pod", "rm", "-f", "-t", "0", p])
                .output();
        }
        for c in &self.containers {
            let _ = std::process::Command::new("podman")
                .args(["rm", "-f", "-t", "0", c])
                .output();
        }
        let _ = std::process::Command::new("podman")
            .args(["network", "rm", "-f", &self.name])
            .output();
    }
}

/// A running pod: its name, address, and a process in its network namespace.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pid: u32,
}

impl PodRef {
    /// A command run in the pod's network namespace as a process of the pod's app would be
    /// (not the proxy's uid, so the redirect applies).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-n", program]);
        c
    }
}

/// Files the pod's volumes are made of: the trust bundle (a ConfigMap on Kubernetes) and the
/// proxy's credential (a projected ServiceAccount token there; a bootstrap token here, as no
/// API server can review one).
pub struct Volumes {
    pub ca_dir: PathBuf,
    pub token_dir: PathBuf,
}

/// GETs `url` until it answers 200 (bounded): the kubelet's probe.
pub async fn probe_until_ok(url: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "2",
                url,
            ])
            .output()
            .await?;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        if code == "200" {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} answered {code:?} for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resolves `$(VAR)` references against the variables defined before (Kubernetes' rule).
fn expand(v: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = v.to_string();
    for (k, val) in vars {
        out = out.replace(&format!("$({k})"), val);
    }
    out
}

/// Runs the injected pod spec `pod` (a Pod object) as a podman pod on `net`.
pub async fn run_injected(net: &mut Net, pod: &Value, volumes: &Volumes) -> anyhow::Result<PodRef> {
    let meta = &pod["metadata"];
    let spec = &pod["spec"];
    let name = meta["name"].as_str().context("pod name")?;
    let ns = meta["namespace"].as_str().unwrap_or("default");
    let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
    let p = net.pod(name).await?;
    let ip = p.ip.to_string();
    let field = |path: &str| -> Option<String> {
        Some(match path {
            "metadata.name" => name.to_string(),
            "metadata.namespace" => ns.to_string(),
            "spec.serviceAccountName" => sa.to_string(),
            "status.podIP" => ip.clone(),
            _ => return None,
        })
    };
    let mount_of = |volume: &str| -> Option<&Path> {
        match volume {
            "mesh-ca" => Some(&volumes.ca_dir),
            "mesh-token" => Some(&volumes.token_dir),
            _ => None,
        }
    };
    let run = |c: &Value, detach: bool| -> anyhow::Result<Vec<String>> {
        let mut a: Vec<String> = vec!["run".into(), "--pod".into(), p.name.clone()];
        a.push(if detach { "-d".into() } else { "--rm".into() });
        let cname = c["name"].as_str().unwrap_or("c");
        a.extend(["--name".into(), format!("{}-{cname}", p.name)]);
        let sc = &c["securityContext"];
        if let Some(uid) = sc["runAsUser"].as_i64() {
            let gid = sc["runAsGroup"].as_i64().unwrap_or(uid);
            a.extend(["--user".into(), format!("{uid}:{gid}")]);
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            a.extend(["--cap-add".into(), cap.as_str().unwrap_or("").to_string()]);
        }
        if sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "ALL"))
        {
            a.extend(["--cap-drop".into(), "ALL".into()]);
        }
        let mut vars = BTreeMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().unwrap_or_default().to_string();
            let v = match e["value"].as_str() {
                Some(v) => expand(v, &vars),
                None => e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .and_then(field)
                    .with_context(|| format!("env {k}: unsupported valueFrom"))?,
            };
            a.extend(["-e".into(), format!("{k}={v}")]);
            vars.insert(k, v);
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = m["name"].as_str().unwrap_or_default();
            let host = mount_of(vol).with_context(|| format!("volume {vol}"))?;
            let at = m["mountPath"].as_str().context("mountPath")?;
            a.extend(["-v".into(), format!("{}:{at}:ro", host.display())]);
        }
        a.push(c["image"].as_str().context("image")?.to_string());
        for x in c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
        {
            a.push(x.as_str().unwrap_or_default().to_string());
        }
        Ok(a)
    };
    // Init containers in order; a native sidecar (restartPolicy Always) runs on, and the next
    // starts once its startup probe passes.
    for c in spec["initContainers"].as_array().into_iter().flatten() {
        let sidecar = c["restartPolicy"] == "Always";
        let args = run(c, sidecar)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman(&args).await?;
        if sidecar {
            let probe = &c["startupProbe"]["httpGet"];
            let url = format!(
                "http://{}:{}{}",
                p.ip,
                probe["port"].as_i64().context("startup probe port")?,
                probe["path"].as_str().unwrap_or("/")
            );
            probe_until_ok(&url, Duration::from_secs(60))
                .await
                .with_context(|| format!("{} sidecar startup", p.name))?;
        }
    }
    for c in spec["containers"].as_array().into_iter().flatten() {
        let args = run(c, true)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman(&args).await?;
    }
    Ok(p)
}

/// The readiness probe of container `c` of `pod` as the kubelet would send it, as a URL.
pub fn readiness_url(pod: &Value, c: usize, ip: Ipv4Addr) -> anyhow::Result<String> {
    let h = &pod["spec"]["containers"][c]["readinessProbe"]["httpGet"];
    Ok(format!(
        "http://{ip}:{}{}",
        h["port"]
            .as_i64()
            .context("readiness probe port (a number)")?,
        h["path"].as_str().unwrap_or("/")
    ))
}
