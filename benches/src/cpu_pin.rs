//! CPU affinity for a saturation cell: the proxies on a core of their own, the app and the
//! load tool on the others, as one benchmarks a proxy on a machine where its neighbours do
//! not share its core.
//!
//! Every thread of each process is pinned (`sched_setaffinity` works per thread); threads
//! started later inherit their creator's set. The benchmark pins itself with the app, so the
//! load tool it starts inherits the app's side. Dropping the pin gives every thread of every
//! pinned process back the set its process had before.

use anyhow::Context;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The threads of `pid`, from `/proc/<pid>/task`.
fn threads(pid: u32) -> anyhow::Result<Vec<Pid>> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .map(|e| {
            let name = e?.file_name();
            let tid: i32 = name
                .to_str()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("thread {name:?} of pid {pid}"))?;
            Ok(Pid::from_raw(tid))
        })
        .collect()
}

/// Puts every thread of `pid` on `set`. A thread that exits meanwhile is skipped.
fn pin_all(pid: u32, set: &CpuSet) -> anyhow::Result<()> {
    for tid in threads(pid)? {
        match sched_setaffinity(tid, set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("pinning thread {tid} of {pid}")),
        }
    }
    Ok(())
}

/// Processes pinned until dropped.
pub struct CpuPin {
    /// Each pinned process and the set its threads had before.
    held: Vec<(u32, CpuSet)>,
}

/// The split of the CPUs this process may use: the last one for the proxies, the rest for
/// everything else.
pub struct CpuSplit {
    /// The proxies' CPU.
    pub proxy_cpu: usize,
    proxies: CpuSet,
    others: CpuSet,
}

impl CpuSplit {
    /// From the CPUs this process may use now; needs two at least.
    pub fn of_this_process() -> anyhow::Result<CpuSplit> {
        let all = sched_getaffinity(Pid::from_raw(0))?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| all.is_set(c).unwrap_or(false))
            .collect();
        let Some((&proxy_cpu, rest)) = cpus.split_last().filter(|(_, r)| !r.is_empty()) else {
            anyhow::bail!("pinning needs two CPUs at least; this process may use {cpus:?}");
        };
        let mut proxies = CpuSet::new();
        proxies.set(proxy_cpu)?;
        let mut others = CpuSet::new();
        for &c in rest {
            others.set(c)?;
        }
        Ok(CpuSplit {
            proxy_cpu,
            proxies,
            others,
        })
    }

    /// Pins every thread of `proxies` to the proxies' CPU and every thread of `others` to
    /// the rest, until the pin is dropped.
    pub fn pin(&self, proxies: &[u32], others: &[u32]) -> anyhow::Result<CpuPin> {
        let mut pin = CpuPin { held: Vec::new() };
        for (pids, set) in [(proxies, &self.proxies), (others, &self.others)] {
            for &pid in pids {
                let before = sched_getaffinity(Pid::from_raw(pid as i32))
                    .with_context(|| format!("CPU set of pid {pid}"))?;
                // Recorded first, so that a failure below still restores it.
                pin.held.push((pid, before));
                pin_all(pid, set)?;
            }
        }
        Ok(pin)
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        for (pid, before) in self.held.drain(..) {
            // A process that has exited needs nothing back.
            if let Err(e) = pin_all(pid, &before)
                && std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                eprintln!("could not give pid {pid} its CPUs back: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs a process may run on, as `/proc` tells them (e.g. "0-1", "1").
    fn allowed(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string()
    }

    #[test]
    fn pins_proxies_to_the_last_cpu_and_the_rest_elsewhere_until_dropped() {
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep")
        };
        let (mut proxy, mut app) = (spawn(), spawn());
        let (p, a) = (proxy.id(), app.id());
        let before = (allowed(p), allowed(a));
        match CpuSplit::of_this_process() {
            Ok(split) => {
                let last = split.proxy_cpu;
                let pin = split.pin(&[p], &[a]).expect("pin");
                assert_eq!(allowed(p), last.to_string());
                let app_cpus = allowed(a);
                assert!(
                    !app_cpus.split([',', '-']).any(|c| c == last.to_string()),
                    "the app may still run on the proxies' CPU {last}: {app_cpus}"
                );
                drop(pin);
                assert_eq!((allowed(p), allowed(a)), before);
            }
            // One CPU: nothing to split, and the split says so.
            Err(e) => assert!(e.to_string().contains("two CPUs"), "{e:#}"),
        }
        for c in [&mut proxy, &mut app] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
