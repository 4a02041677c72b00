//! Harness for the end-to-end tests: builds and starts the real binaries (control plane, sidecars,
//! example apps) on loopback with ports they pick themselves, and gives tests real clients.
//!
//! Every process prints a JSON readiness line; the harness waits on that, never on a sleep.
//! Logs go to the test's temporary directory and are printed when a test fails.

pub mod browser;
pub mod etcd;
pub mod kube_api;
pub mod netns;
pub mod otlp;
pub mod peers;
pub mod pods;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_proto::v1 as pb;
use meshctl::client::{Admin, bootstrap_token, connect_with};
use meshctl::process::{Process, proxy_command_in};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::process::Command;

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

/// Addresses a sidecar reported when ready.
#[derive(Debug, Clone, Copy)]
pub struct Sidecar {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// Index into `Mesh::procs`, to stop it.
    pub proc_index: usize,
}

/// Options for a sidecar.
#[derive(Debug, Clone, Default)]
pub struct SidecarOpts<'a> {
    /// The proxy's namespace (None: default); its token is for `<namespace>/<account>`.
    pub namespace: Option<&'a str>,
    pub service: Option<&'a str>,
    pub version: Option<&'a str>,
    pub service_account: &'a str,
    pub app: Option<SocketAddr>,
    pub node_id: Option<&'a str>,
    /// Worker threads (0: the proxy's default).
    pub workers: usize,
    /// More flags.
    pub extra: &'a [&'a str],
    /// Environment variables of the proxy (e.g. the standard `OTEL_*` ones).
    pub env: &'a [(&'a str, &'a str)],
}

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
    cp_args: Vec<String>,
    logs: Vec<PathBuf>,
}

fn json_addr(v: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
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

    /// Starts an example app; returns its address.
    pub async fn app(&mut self, service: &str, version: &str) -> anyhow::Result<SocketAddr> {
        let mut cmd = Command::new(bin_dir().join("mesh-example"));
        cmd.args([
            "serve",
            "--service",
            service,
            "--version",
            version,
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(self.log(&format!("{service}-{version}-app"))?);
        let (p, ready) =
            Process::spawn_ready(&format!("{service} {version} app"), cmd, READY_TIMEOUT).await?;
        self.procs.push(p);
        json_addr(&ready, "addr")
    }

    /// Starts a sidecar with a fresh token for its service account.
    pub async fn sidecar(&mut self, o: SidecarOpts<'_>) -> anyhow::Result<Sidecar> {
        let ca_file = self.data_dir().join("ca/bundle.pem");
        let mut cmd = proxy_command_in(
            &bin_dir().join("mesh-proxy"),
            &self.grpc.to_string(),
            &ca_file,
            &mut self.admin,
            o.namespace.unwrap_or("default"),
            o.service_account,
        )
        .await?;
        cmd.args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--drain-timeout-secs", "5", "--drain-grace-ms", "300"])
        .args(["--telemetry-interval-ms", "200"])
        .env("RUST_LOG", "info,mesh_proxy=debug");
        if let Some(s) = o.service {
            cmd.args(["--service", s]);
        }
        if let Some(v) = o.version {
            cmd.args(["--service-version", v]);
        }
        if let Some(app) = o.app {
            cmd.args(["--app-port", &app.port().to_string()]);
        }
        if let Some(n) = o.node_id {
            cmd.args(["--node-id", n]);
        }
        if o.workers > 0 {
            cmd.args(["--workers", &o.workers.to_string()]);
        }
        cmd.args(o.extra);
        cmd.envs(o.env.iter().copied());
        let name = format!(
            "{}-{}-proxy",
            o.service.unwrap_or(o.service_account),
            o.version.unwrap_or("")
        );
        cmd.stderr(self.log(&name)?);
        let (p, ready) = Process::spawn_ready(&name, cmd, READY_TIMEOUT).await?;
        self.procs.push(p);
        Ok(Sidecar {
            outbound: json_addr(&ready, "outbound")?,
            inbound: json_addr(&ready, "inbound").ok(),
            admin: json_addr(&ready, "admin")?,
            proc_index: self.procs.len() - 1,
        })
    }

    /// An app plus its sidecar, registered as an endpoint of `service` with label `version`.
    pub async fn workload(&mut self, service: &str, version: &str) -> anyhow::Result<Sidecar> {
        Ok(self.workload_app(service, version).await?.1)
    }

    /// As [`Mesh::workload`], also returning the app's own address (for its `/admin/` controls).
    pub async fn workload_app(
        &mut self,
        service: &str,
        version: &str,
    ) -> anyhow::Result<(SocketAddr, Sidecar)> {
        let app = self.app(service, version).await?;
        let node = format!("{service}-{version}-{}", self.procs.len());
        let sidecar = self
            .sidecar(SidecarOpts {
                env: &[],
                namespace: None,
                service: Some(service),
                version: Some(version),
                service_account: service,
                app: Some(app),
                node_id: Some(&node),
                workers: 0,
                extra: &[],
            })
            .await?;
        Ok((app, sidecar))
    }

    /// `meshctl policy set <service> <args…>`, then waits until the sidecar at `admin` runs a
    /// policy whose debug form contains every one of `applied`.
    pub async fn set_policy(
        &self,
        admin: SocketAddr,
        service: &str,
        args: &[&str],
        applied: &[&str],
    ) -> anyhow::Result<()> {
        let mut all = vec!["policy", "set", service];
        all.extend_from_slice(args);
        let out = self.meshctl(&all).await?;
        anyhow::ensure!(out.contains("policy of"), "{out}");
        let r = wait_config(admin, Duration::from_secs(10), |d| {
            policy_in_dump(d, service).is_some_and(|p| applied.iter().all(|a| p.contains(a)))
        })
        .await;
        if r.is_err()
            && let Ok(d) = admin_get(admin, "/config_dump").await
        {
            anyhow::bail!(
                "policy {applied:?} not applied; the sidecar runs {:?}",
                policy_in_dump(&d.json, service)
            );
        }
        r.map(|_| ())
    }

    /// A client-only sidecar (no inbound), identity `default/<sa>`. It runs one worker (the
    /// current-thread runtime) while server sidecars run two, so tests cover both.
    pub async fn client(&mut self, sa: &str) -> anyhow::Result<Sidecar> {
        self.sidecar(SidecarOpts {
            service_account: sa,
            workers: 1,
            ..Default::default()
        })
        .await
    }

    /// A sidecar (version v1) in front of an app the test started itself (a third-party
    /// server), with more flags.
    pub async fn front(
        &mut self,
        service: &str,
        app: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Sidecar> {
        let node = format!("{service}-{}", self.procs.len());
        self.sidecar(SidecarOpts {
            env: &[],
            namespace: None,
            service: Some(service),
            version: Some("v1"),
            service_account: service,
            app: Some(app),
            node_id: Some(&node),
            workers: 0,
            extra,
        })
        .await
    }

    /// A client sidecar (`caller`) that also serves `service` on a fixed loopback port
    /// (`--upstream`); returns it and that port once it listens.
    pub async fn client_with_upstream(
        &mut self,
        service: &str,
    ) -> anyhow::Result<(Sidecar, SocketAddr)> {
        let port = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let up = format!("{service}={port}");
        let c = self
            .sidecar(SidecarOpts {
                service_account: "caller",
                workers: 1,
                extra: &["--upstream", &up],
                ..Default::default()
            })
            .await?;
        peers::wait_listening(port).await?;
        Ok((c, port))
    }

    /// Waits until `service` has `n` ready endpoints in the registry (bounded).
    pub async fn wait_endpoints(&mut self, service: &str, n: usize) -> anyhow::Result<()> {
        let key = mesh_model::service::absolute(service, "default");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let eps = self
                .admin
                .list_endpoints(pb::ListEndpointsRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            let count = eps
                .endpoints
                .iter()
                .filter(|e| e.service == key && e.endpoint.as_ref().is_some_and(|x| x.ready))
                .count();
            if count == n {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{service} has {count} endpoints, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs meshctl against this mesh; returns stdout, or an error with stderr.
    pub async fn meshctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin_dir().join("meshctl"))
            .args(["--server", &format!("https://{}", self.admin_addr)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            Ok(stdout)
        } else {
            anyhow::bail!(
                "meshctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }
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

/// Always dials one address (a sidecar's outbound port), whatever the URI's host: an HTTP proxy
/// client. The proxy's own connector to its local app does exactly this.
/// Connects every request to one address (a sidecar's port), whatever the URI says; from
/// inside a network namespace the test made when `ns` is set.
#[derive(Clone)]
pub struct Dial {
    addr: SocketAddr,
    ns: Option<Arc<str>>,
}

impl Dial {
    /// Dials `addr` from this process's namespace.
    pub fn to(addr: SocketAddr) -> Self {
        Self { addr, ns: None }
    }

    /// Dials `addr` from inside namespace `ns`.
    pub fn in_netns(ns: &str, addr: SocketAddr) -> Self {
        Self {
            addr,
            ns: Some(ns.into()),
        }
    }
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, ns) = (self.addr, self.ns.clone());
        Box::pin(async move {
            let s = match ns {
                None => tokio::net::TcpStream::connect(addr).await?,
                Some(ns) => {
                    // The socket is made by a thread inside the namespace and stays there.
                    let std = tokio::task::spawn_blocking(move || {
                        netns::in_netns(&ns, move || {
                            let s = std::net::TcpStream::connect_timeout(
                                &addr,
                                Duration::from_secs(3),
                            )?;
                            s.set_nonblocking(true)?;
                            Ok(s)
                        })
                    })
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
                    tokio::net::TcpStream::from_std(std)?
                }
            };
            let _ = s.set_nodelay(true);
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

pub type HttpClient = Client<Dial, Full<Bytes>>;

/// An HTTP/1.1 client that sends everything through `proxy`.
pub fn h1_client(proxy: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new()).build(Dial::to(proxy))
}

/// An h2c (prior knowledge) client that sends everything through `proxy`.
pub fn h2c_client(proxy: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(Dial::to(proxy))
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub json: serde_json::Value,
    pub text: String,
}

/// GET `url` with `client`; the body is parsed as JSON when it is.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<Reply> {
    let resp = client
        .request(http::Request::get(url).body(Full::new(Bytes::new()))?)
        .await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_str(&text).unwrap_or_default(),
        text,
    })
}

/// GET `url` on a sidecar's admin port over plain HTTP/1.1.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(Dial::to(addr));
    get(&client, &format!("http://{addr}{path}")).await
}

/// Sends `n` requests; returns how many each version served and how many failed.
pub async fn split(
    client: &HttpClient,
    url: &str,
    n: usize,
) -> anyhow::Result<(std::collections::BTreeMap<String, usize>, usize)> {
    let mut by_version = std::collections::BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match get(client, url).await {
            Ok(r) if r.status.is_success() => {
                *by_version
                    .entry(r.json["version"].as_str().unwrap_or("?").to_string())
                    .or_insert(0) += 1;
            }
            _ => failed += 1,
        }
    }
    Ok((by_version, failed))
}

/// The debug form of a service's policy in a /config_dump.
pub fn policy_in_dump(dump: &serde_json::Value, service: &str) -> Option<String> {
    dump["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)
        .and_then(|s| s["policy"].as_str())
        .map(str::to_string)
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

/// Requests an example app served so far (its `/admin/stats`, straight to the app).
pub async fn app_requests(app: SocketAddr) -> anyhow::Result<u64> {
    let r = admin_get(app, "/admin/stats").await?;
    r.json["requests"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("bad stats: {}", r.text))
}

/// Sends `req()` `n` times, at most `concurrency` at once; returns each result in order of
/// completion (status, `x-mesh-error`, latency), or the error as text.
pub async fn load<F>(
    client: &HttpClient,
    n: usize,
    concurrency: usize,
    req: F,
) -> Vec<Result<(u16, String, Duration), String>>
where
    F: Fn(usize) -> http::Request<Full<Bytes>>,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (client, r) = (client.clone(), req(i));
        tasks.spawn(async move {
            let _permit = permit;
            one(&client, r).await
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.map_err(|e| e.to_string()).and_then(|r| r));
    }
    out
}

/// Sends one request and reads the response whole.
async fn one(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, String, Duration), String> {
    let start = tokio::time::Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("x-mesh-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, reason, start.elapsed()))
}

/// Sends `req()` at `rps` for `n` requests whatever the responses take (an open-loop load);
/// returns the statuses.
pub async fn paced<F>(client: &HttpClient, rps: u32, n: usize, req: F) -> Vec<u16>
where
    F: Fn(usize) -> http::Request<Full<Bytes>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tick.tick().await;
        let (client, r) = (client.clone(), req(i));
        tasks.spawn(async move { one(&client, r).await.map_or(0, |r| r.0) });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap_or(0));
    }
    out
}

/// A GET of `url` with an empty body.
pub fn get_req(url: &str) -> http::Request<Full<Bytes>> {
    let mut r = http::Request::new(Full::new(Bytes::new()));
    *r.uri_mut() = url.parse().unwrap_or_default();
    r
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

/// A key and a PEM CSR asking for `identity` (a SPIFFE URI).
pub fn csr(identity: &str) -> anyhow::Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(identity.to_string().try_into()?)];
    let pem = p.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

/// A client of the control plane's Identity service (certificate signing), as a proxy dials it.
pub async fn identity_client(
    mesh: &Mesh,
) -> anyhow::Result<mesh_proto::v1::identity_client::IdentityClient<tonic::transport::Channel>> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(mesh.ca_pem()?))
        .domain_name("mesh-control-plane");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", mesh.grpc))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(mesh_proto::v1::identity_client::IdentityClient::new(ch))
}

/// One request of the constant load: when it was sent, and the version that answered (None
/// for a failure).
pub type Sample = (tokio::time::Instant, Option<String>);

/// Sends GETs at `rps` until `stop` turns true (bounded by `max`); returns every sample.
pub async fn constant_load(
    http: HttpClient,
    rps: u32,
    max: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..max {
        tick.tick().await;
        if *stop.borrow() {
            break;
        }
        let http = http.clone();
        tasks.spawn(async move {
            let sent = tokio::time::Instant::now();
            let v = match get(&http, "http://backend/").await {
                Ok(r) if r.status == 200 => r.json["version"].as_str().map(str::to_string),
                _ => None,
            };
            (sent, v)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(s) = r {
            out.push(s);
        }
    }
    out
}

/// A constant load running in the background.
pub struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Load {
    /// GETs of `http://backend/` at `rps`, for at most a minute.
    pub fn start(http: HttpClient, rps: u32) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(constant_load(http, rps, rps as usize * 60, rx));
        Self { stop, task }
    }

    /// Stops the load; returns every sample.
    pub async fn finish(self) -> anyhow::Result<Vec<Sample>> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
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
