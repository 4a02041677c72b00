//! Starting the mesh's binaries as child processes and waiting until they say they are ready.
//! Used by `meshctl demo` and by the end-to-end tests, so both start things the same way.
//!
//! Every mesh binary prints one JSON line on stdout when it listens, e.g.
//! `{"event":"listening","grpc":"127.0.0.1:15010",...}`; that line is the readiness signal.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child process, killed when dropped.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    /// Starts `cmd` and waits up to `timeout` for its JSON readiness line, which is returned.
    /// stdout past that line is drained and discarded; stderr goes where `cmd` says.
    pub async fn spawn_ready(
        name: &str,
        mut cmd: Command,
        timeout: Duration,
    ) -> anyhow::Result<(Self, serde_json::Value)> {
        cmd.stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v.get("event").is_some()
                {
                    return Ok::<_, std::io::Error>(Some(v));
                }
            }
            Ok(None)
        })
        .await;
        let mut proc = Self {
            name: name.to_string(),
            child,
        };
        match ready {
            Ok(Ok(Some(v))) => {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok((proc, v))
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = proc.child.wait().await.ok();
                anyhow::bail!("{name} exited before it was ready ({status:?})")
            }
            Err(_) => {
                proc.kill();
                anyhow::bail!("{name} was not ready within {timeout:?}")
            }
        }
    }

    /// Starts `cmd` without waiting for a readiness line (third-party programs: the caller
    /// checks readiness its own way). Killed when dropped.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, no cleanup (simulates a crash).
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit status.
    pub async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                self.kill();
                self.child.wait().await.ok()
            }
        }
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.wait().await.ok()
    }
}

/// A `mesh-proxy` command joined to the control plane at `grpc` (host:port) as
/// `default/<service_account>`, with a fresh bootstrap token for exactly that identity, so the
/// token and the identity the proxy asks for cannot disagree. The token goes in the
/// environment, not on the command line where `ps` shows it. Callers add ports and role.
pub async fn proxy_command(
    bin: &Path,
    grpc: &str,
    ca_file: &Path,
    admin: &mut crate::client::Admin,
    service_account: &str,
) -> anyhow::Result<Command> {
    proxy_command_in(bin, grpc, ca_file, admin, "default", service_account).await
}

/// As [`proxy_command`], for a proxy of namespace `namespace`.
pub async fn proxy_command_in(
    bin: &Path,
    grpc: &str,
    ca_file: &Path,
    admin: &mut crate::client::Admin,
    namespace: &str,
    service_account: &str,
) -> anyhow::Result<Command> {
    let token =
        crate::client::bootstrap_token(admin, &format!("{namespace}/{service_account}"), 0).await?;
    let mut c = Command::new(bin);
    c.args([
        "--control-plane",
        &format!("https://{grpc}"),
        "--namespace",
        namespace,
        "--service-account",
        service_account,
    ])
    .arg("--ca-file")
    .arg(ca_file)
    .env("MESH_TOKEN", token);
    Ok(c)
}

/// The directory of the running executable, where sibling mesh binaries are built.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("executable has no parent directory")
}

/// A sibling binary, checked to exist.
pub fn sibling(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        anyhow::bail!(
            "{} not found: build all binaries first (cargo build --release --workspace)",
            p.display()
        )
    }
}
