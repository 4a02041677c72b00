//! A real etcd (Debian's `etcd-server`, installed by scripts/install-test-deps.sh) with a
//! temporary data directory, on loopback or inside a network namespace made by the test.

use crate::netns::{Netns, in_netns};
use crate::process::Process;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why etcd tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").exists()));
    (!found).then(|| "etcd is missing (scripts/install-test-deps.sh installs it)".to_string())
}

pub struct Etcd {
    proc: Option<Process>,
    /// `ip:port` clients use.
    pub client: String,
    peer: String,
    dir: PathBuf,
    ns: Option<String>,
    log: PathBuf,
}

impl Etcd {
    /// Starts etcd serving clients on `ip` (inside `ns` when given; else `ip` is loopback),
    /// with its data under `dir`, and waits until it reports healthy.
    pub async fn start(ns: Option<&Netns>, ip: &str, dir: &Path) -> anyhow::Result<Self> {
        let (client, peer) = match ns {
            Some(_) => (format!("{ip}:2379"), "127.0.0.1:2380".to_string()),
            None => (
                format!("{ip}:{}", crate::free_port()),
                format!("127.0.0.1:{}", crate::free_port()),
            ),
        };
        let mut e = Self {
            proc: None,
            client,
            peer,
            dir: dir.join("etcd"),
            ns: ns.map(|n| n.0.clone()),
            log: dir.join("etcd.log"),
        };
        e.run().await?;
        Ok(e)
    }

    /// `etcd://<client>` for `--store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => tokio::process::Command::new("etcd"),
        };
        cmd.args(["--name", "test"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &format!("http://{}", self.client),
                "--advertise-client-urls",
                &format!("http://{}", self.client),
                "--listen-peer-urls",
                &format!("http://{}", self.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", self.peer),
                "--initial-cluster",
                &format!("test=http://{}", self.peer),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            );
        self.proc = Some(Process::spawn("etcd", cmd)?);
        self.wait_healthy(Duration::from_secs(20)).await
    }

    /// Polls `/health` until etcd says it is healthy (bounded).
    async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let (client, ns) = (self.client.clone(), self.ns.clone());
            let body = tokio::task::spawn_blocking(move || {
                let get = move || crate::netns::http_get(&client, "/health");
                match ns {
                    Some(ns) => in_netns(&ns, get),
                    None => get(),
                }
            })
            .await?;
            if let Ok(b) = &body
                && b.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd not healthy within {within:?}: {body:?}; log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs etcd (its data stays).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
            let _ = p.wait().await;
        }
    }

    /// Starts it again on the same data and address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.run().await
    }
}
