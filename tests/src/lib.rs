//! Harness for the end-to-end tests: builds and starts the real binaries (control plane, sidecars,
//! example apps) on loopback with ports they pick themselves, and gives tests real clients.
//!
//! Every process prints a JSON readiness line; the harness waits on that, never on a sleep.
//! Logs go to the test's temporary directory and are printed when a test fails.
//!
//! By what it starts: `mesh` (the control plane and its replicas, meshctl, logs), `workloads`
//! (sidecars and example apps), `clients` (HTTP clients and load), `config` (what a sidecar
//! applied), `identity` (certificates by CSR); third-party peers in `peers`, Kubernetes' API
//! stand-in in `kube_api` and the kubelet's part in `kubelet`, real pods in `pods`, network
//! namespaces in `netns`, etcd, an OTLP collector and Chromium in their own modules.

pub mod browser;
mod clients;
mod config;
pub mod etcd;
mod identity;
pub mod kube_api;
pub mod kubelet;
mod mesh;
pub mod netns;
pub mod otlp;
pub mod peers;
pub mod pki;
pub mod pods;
mod workloads;

pub use clients::*;
pub use config::*;
pub use identity::*;
pub use mesh::*;
pub use workloads::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub use meshctl::process;

/// How long any one process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the binaries once per test process; returns their directory.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // target/<profile>/deps/<test-exe> → target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        // The same package selection as `cargo test --workspace`, so features resolve the same
        // way and this finds everything already built instead of recompiling it.
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        // Variables cargo sets for this test process (CARGO_PKG_*, CARGO_MANIFEST_DIR, …) would
        // change build-script fingerprints and rebuild half the tree; pass only the user's.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            let keep = matches!(k.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR")
                || k.starts_with("CARGO_BUILD_")
                || k.starts_with("CARGO_PROFILE_");
            if (k.starts_with("CARGO_") && !keep) || k == "OUT_DIR" {
                cmd.env_remove(&k);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the mesh binaries failed");
        dir
    })
}

/// A free loopback port (bound then released; used where a fixed port must survive a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `probe` until it answers true (bounded); returns how long it took.
pub async fn until<F, Fut>(within: Duration, what: &str, mut probe: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if matches!(probe().await, Ok(true)) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
