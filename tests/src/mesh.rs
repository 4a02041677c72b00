//! The control plane a test starts (one or several replicas), its admin client, meshctl, and
//! the logs of everything the test ran.

use crate::*;
use anyhow::Context;
use meshctl::client::{Admin, bootstrap_token, connect_with};
use meshctl::process::Process;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// One mesh: a control plane and whatever workloads a test adds.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub grpc: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The control plane's plain-HTTP port (`/metrics`, dashboard).
    pub http: SocketAddr,
    /// The injection webhook's HTTPS port, when started with `--webhook-addr`.
    pub webhook: Option<SocketAddr>,
    pub cp: Option<Process>,
    pub procs: Vec<Process>,
    pub admin: Admin,
    pub(crate) cp_args: Vec<String>,
    pub(crate) logs: Vec<PathBuf>,
}

pub(crate) fn json_addr(v: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    v[key]
        .as_str()
        .context(key.to_string())?
        .parse()
        .context("address")
}

impl Mesh {
    /// Starts a control plane on fixed free ports (so it can be restarted on the same ones).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let base = vec![
            "--data-dir".to_string(),
            dir.path().join("cp").display().to_string(),
        ];
        // Port 0: the control plane binds and reports its ports, so concurrent tests never
        // race for a port; a restart reuses the reported ones.
        // A flag in `extra` replaces the default (e.g. `--http-addr 0.0.0.0:0`).
        let given = |flag: &str| extra.contains(&flag);
        let mut first = base.clone();
        for flag in ["--grpc-addr", "--admin-addr", "--http-addr"] {
            if !given(flag) {
                first.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
            }
        }
        first.extend(extra.iter().map(|s| s.to_string()));
        let mut logs = Vec::new();
        let (cp, ready) = Self::spawn_cp(dir.path(), &first, &mut logs).await?;
        let grpc = json_addr(&ready, "grpc")?;
        let admin_addr = json_addr(&ready, "admin")?;
        let http = json_addr(&ready, "http")?;
        let webhook = json_addr(&ready, "webhook").ok();
        // A restart binds the reported ports again.
        let mut cp_args = base;
        for (flag, addr) in [
            ("--grpc-addr", grpc),
            ("--admin-addr", admin_addr),
            ("--http-addr", http),
        ] {
            cp_args.extend([flag.to_string(), addr.to_string()]);
        }
        let mut rest = extra.iter();
        while let Some(a) = rest.next() {
            if ["--grpc-addr", "--admin-addr", "--http-addr"].contains(a) {
                rest.next();
            } else {
                cp_args.push(a.to_string());
            }
        }
        let token = std::fs::read_to_string(dir.path().join("cp/admin-token"))?;
        let ca = std::fs::read_to_string(dir.path().join("cp/ca/bundle.pem"))?;
        let admin = connect_with(&format!("https://{admin_addr}"), token.trim(), &ca).await?;
        Ok(Self {
            dir,
            grpc,
            admin_addr,
            http,
            webhook,
            cp: Some(cp),
            procs: Vec::new(),
            admin,
            cp_args,
            logs,
        })
    }

    async fn spawn_cp(
        dir: &Path,
        args: &[String],
        logs: &mut Vec<PathBuf>,
    ) -> anyhow::Result<(Process, serde_json::Value)> {
        let log = dir.join(format!("control-plane-{}.log", logs.len()));
        let mut cmd = Command::new(bin_dir().join("mesh-control-plane"));
        cmd.args(args).stderr(std::fs::File::create(&log)?);
        logs.push(log.clone());
        match Process::spawn_ready("control plane", cmd, READY_TIMEOUT).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(e.context(format!("control plane log:\n{}", tail.join("\n"))))
            }
        }
    }

    /// Replica `id` of a control plane on the shared store `store` (`--store`), signing with
    /// the shared CA `ca` (see [`shared_ca`]), with a 3 s leader lease; `extra` flags after.
    pub async fn replica(
        store: &str,
        ca: &(PathBuf, PathBuf),
        id: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (cert, key) = (ca.0.display().to_string(), ca.1.display().to_string());
        let mut args = vec![
            "--store",
            store,
            "--ca-cert",
            &cert,
            "--ca-key",
            &key,
            "--replica-id",
            id,
            "--leader-lease-secs",
            "3",
        ];
        args.extend_from_slice(extra);
        Self::start_with(&args).await
    }

    /// A `mesh_cp_<name>` gauge on the control plane's /metrics.
    pub async fn cp_gauge(&self, name: &str) -> anyhow::Result<i64> {
        let m = admin_get(self.http, "/metrics").await?;
        m.text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("mesh_cp_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no mesh_cp_{name} in /metrics"))
    }

    /// SIGKILLs the control plane (no cleanup, like a crash).
    pub async fn kill_control_plane(&mut self) {
        if let Some(mut cp) = self.cp.take() {
            cp.kill();
            cp.wait().await;
        }
    }

    /// Starts the control plane again on the same data dir and ports.
    pub async fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        self.kill_control_plane().await;
        let (cp, _) =
            Self::spawn_cp(self.dir.path(), &self.cp_args.clone(), &mut self.logs).await?;
        self.cp = Some(cp);
        let token = std::fs::read_to_string(self.dir.path().join("cp/admin-token"))?;
        self.admin = connect_with(
            &format!("https://{}", self.admin_addr),
            token.trim(),
            &self.ca_pem()?,
        )
        .await?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cp")
    }

    pub fn ca_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(
            self.data_dir().join("ca/bundle.pem"),
        )?)
    }

    /// A bootstrap token for `default/<sa>`.
    pub async fn token(&mut self, sa: &str) -> anyhow::Result<String> {
        bootstrap_token(&mut self.admin, &format!("default/{sa}"), 0).await
    }

    /// A scoped admin credential made with `meshctl token create --scope <scopes> --name
    /// <name>`: (the secret, its id).
    pub async fn admin_credential(
        &self,
        scopes: &str,
        name: &str,
    ) -> anyhow::Result<(String, String)> {
        let out = self
            .meshctl(&[
                "-o", "json", "token", "create", "--scope", scopes, "--name", name, "--ttl", "1h",
            ])
            .await?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let field = |k: &str| v[k].as_str().map(String::from).context(out.clone());
        Ok((field("token")?, field("id")?))
    }

    /// Everything the processes whose log names start with `prefix` have logged so far.
    pub fn logs_of(&self, prefix: &str) -> anyhow::Result<String> {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let path = e?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.starts_with(prefix) && name.ends_with(".log") {
                out.push_str(&std::fs::read_to_string(&path)?);
            }
        }
        Ok(out)
    }

    pub fn log(&mut self, name: &str) -> anyhow::Result<std::fs::File> {
        let p = self
            .dir
            .path()
            .join(format!("{name}-{}.log", self.logs.len()));
        let f = std::fs::File::create(&p)?;
        self.logs.push(p);
        Ok(f)
    }

    /// Runs meshctl against this mesh; returns stdout, or an error with stderr.
    pub async fn meshctl(&self, args: &[&str]) -> anyhow::Result<String> {
        match self.meshctl_exit(args).await? {
            (0, stdout, _) => Ok(stdout),
            (_, _, stderr) => anyhow::bail!("meshctl {args:?} failed: {stderr}"),
        }
    }

    /// Runs meshctl against this mesh; returns (exit code, stdout, stderr) whatever the code
    /// (meshctl exits 3 for a negative answer: an authorization DENY, a rolled-back canary).
    pub async fn meshctl_exit(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        self.meshctl_env(args, &[]).await
    }

    /// As [`Mesh::meshctl_exit`], with environment variables set (e.g. `KUBECONFIG`).
    pub async fn meshctl_env(
        &self,
        args: &[&str],
        env: &[(&str, &std::path::Path)],
    ) -> anyhow::Result<(i32, String, String)> {
        let out = Command::new(bin_dir().join("meshctl"))
            .args(["--server", &format!("https://{}", self.admin_addr)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .await?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    }

    /// `meshctl <args>` started in the background, its stdout piped (for streaming commands).
    pub fn meshctl_spawn(&self, args: &[&str]) -> anyhow::Result<tokio::process::Child> {
        Ok(Command::new(bin_dir().join("meshctl"))
            .args(["--server", &format!("https://{}", self.admin_addr)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?)
    }

    /// Prints every process log (called when a test fails).
    /// Everything the control plane logged so far (all its runs).
    pub fn cp_log(&self) -> String {
        self.logs
            .iter()
            .filter(|l| {
                l.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("control-plane"))
            })
            .filter_map(|l| std::fs::read_to_string(l).ok())
            .collect()
    }

    pub fn dump_logs(&self) {
        for l in &self.logs {
            if let Ok(s) = std::fs::read_to_string(l) {
                let tail: Vec<&str> = s.lines().rev().take(40).collect();
                eprintln!("===== {} (last 40 lines)", l.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

/// Waits until exactly one of `replicas` leads; returns its index.
pub async fn one_leader(replicas: &[&Mesh], within: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut leading = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if r.cp_gauge("leader").await? == 1 {
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

/// A CA certificate and key (PEM files under `dir`) for `--ca-cert`/`--ca-key`: the one CA
/// every replica of a shared store signs with.
pub fn shared_ca(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "mesh test shared root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key)?;
    let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}
