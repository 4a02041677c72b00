//! A CFS CPU quota on running processes, as Kubernetes enforces a container's `limits.cpu`.
//!
//! On a machine with few cores the load tool and the app compete with the proxy, so an
//! unlimited "saturation" run measures the machine as much as the proxy. Held to a fraction of
//! a core, the proxy is what saturates, and requests/s is its own throughput per CPU.
//!
//! Works with the cgroup v1 `cpu` controller (`cpu.cfs_quota_us`) or cgroup v2 (`cpu.max`);
//! needs root. Processes go back to the cgroup they came from when the limit is dropped.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Kubernetes' CFS period, µs.
const PERIOD_US: u64 = 100_000;

/// Where the cgroup hierarchy with the `cpu` controller is mounted, and whether it is v1.
fn hierarchy() -> anyhow::Result<(PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        return Ok((v1.to_path_buf(), true));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    anyhow::ensure!(
        controllers.split_whitespace().any(|c| c == "cpu"),
        "no cgroup hierarchy with the cpu controller under /sys/fs/cgroup"
    );
    Ok((v2.to_path_buf(), false))
}

/// The cgroup (relative to the hierarchy's root) a process is in now.
fn current_cgroup(pid: u32, v1: bool) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            Some((f.next()?, f.next()?, f.next()?))
        })
        .find(|(id, ctrl, _)| {
            if v1 {
                ctrl.split(',').any(|c| c == "cpu")
            } else {
                *id == "0"
            }
        })
        .map(|(_, _, path)| path.trim_start_matches('/').to_string())
        .with_context(|| format!("pid {pid}'s cgroup"))
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Processes held to `cores` of CPU until dropped; each process gets a cgroup of its own, so
/// that a sidecar pair is two sidecars each held to the limit.
pub struct CpuLimit {
    /// Each process's cgroup under the limit, and the one it came from.
    held: Vec<(PathBuf, PathBuf, u32)>,
}

impl CpuLimit {
    /// Holds each of `pids` to `cores` (e.g. 0.5: 50 ms per 100 ms).
    pub fn new(tag: &str, pids: &[u32], cores: f64) -> anyhow::Result<CpuLimit> {
        anyhow::ensure!(cores > 0.0, "a CPU limit must be positive");
        let (root, v1) = hierarchy()?;
        let mut limit = CpuLimit { held: Vec::new() };
        let quota = (cores * PERIOD_US as f64).round() as u64;
        if !v1 {
            // The root's children get the cpu controller only if the root hands it down.
            write(&root.join("cgroup.subtree_control"), "+cpu")?;
        }
        for &pid in pids {
            let from = root.join(current_cgroup(pid, v1)?);
            let cg = root.join(format!("mesh-bench-{}-{tag}-{pid}", std::process::id()));
            std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
            // Recorded at once, so that a failure below still removes the directory.
            limit.held.push((cg.clone(), from, pid));
            if v1 {
                write(&cg.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cg.join("cpu.cfs_quota_us"), &quota.to_string())?;
            } else {
                write(&cg.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            }
            write(&cg.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(limit)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        for (cg, from, pid) in self.held.drain(..) {
            // A process that has exited (or never moved) needs no move; the directory goes
            // either way.
            let _ = std::fs::write(from.join("cgroup.procs"), pid.to_string());
            if let Err(e) = std::fs::remove_dir(&cg) {
                eprintln!("could not remove {}: {e}", cg.display());
            }
        }
    }
}
