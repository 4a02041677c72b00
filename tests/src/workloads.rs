//! Sidecars and the example apps behind them, as a test adds them to a [`Mesh`].

use crate::*;
use mesh_proto::v1 as pb;
use meshctl::process::{Process, proxy_command_in};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::process::Command;

/// Addresses a sidecar reported when ready.
#[derive(Debug, Clone, Copy)]
pub struct Sidecar {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// A gateway's HTTPS and HTTP listeners.
    pub gateway_https: Option<SocketAddr>,
    pub gateway_http: Option<SocketAddr>,
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

impl Mesh {
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
            gateway_https: json_addr(&ready, "gateway_https").ok(),
            gateway_http: json_addr(&ready, "gateway_http").ok(),
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

    /// Waits until the registry has `service` (in namespace default), with or without
    /// endpoints: a gateway declares its own once ready, after its ready line (bounded).
    pub async fn wait_service(&self, service: &str) -> anyhow::Result<()> {
        let what = format!("{service} registered");
        until(Duration::from_secs(10), &what, || {
            let mut admin = self.admin.clone();
            async move {
                let all = admin
                    .list_services(pb::ListServicesRequest {})
                    .await?
                    .into_inner();
                Ok(all
                    .services
                    .iter()
                    .any(|s| s.name == service && s.namespace == "default"))
            }
        })
        .await
        .map(|_| ())
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
}
