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

/// PEM files for an etcd serving TLS: its CA, and a client certificate signed by it.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    /// A fresh CA, a serving certificate for 127.0.0.1 and a client certificate, under `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, SanType,
        };
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "test etcd CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key)?;
        let issuer = Issuer::new(p, ca_key);
        let leaf = |cn: &str, eku: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse()?)];
            p.extended_key_usages = vec![eku];
            Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (server, server_key) = leaf("etcd", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client, client_key) = leaf("mesh-control-plane", ExtendedKeyUsagePurpose::ClientAuth)?;
        let t = Self {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&t.ca, ca.pem())?;
        std::fs::write(&t.server_cert, server)?;
        std::fs::write(&t.server_key, server_key)?;
        std::fs::write(&t.client_cert, client)?;
        std::fs::write(&t.client_key, client_key)?;
        Ok(t)
    }

    /// The control plane's flags for this etcd's CA and client certificate.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--etcd-ca".into(),
            self.ca.display().to_string(),
            "--etcd-cert".into(),
            self.client_cert.display().to_string(),
            "--etcd-key".into(),
            self.client_key.display().to_string(),
        ]
    }
}

pub struct Etcd {
    proc: Option<Process>,
    /// `ip:port` clients use.
    pub client: String,
    /// Where `/health` is served in plain HTTP: the client address, or with TLS a metrics port.
    health: String,
    /// TLS with client certificates on the client port, when started by [`Etcd::start_tls`].
    pub tls: Option<EtcdTls>,
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
            health: client.clone(),
            client,
            tls: None,
            peer,
            dir: dir.join("etcd"),
            ns: ns.map(|n| n.0.clone()),
            log: dir.join("etcd.log"),
        };
        e.run().await?;
        Ok(e)
    }

    /// Starts etcd on loopback serving clients only over TLS, and only those with a
    /// certificate from its CA (`--client-cert-auth`).
    pub async fn start_tls(dir: &Path) -> anyhow::Result<Self> {
        let mut e = Self {
            proc: None,
            client: format!("127.0.0.1:{}", crate::free_port()),
            health: format!("127.0.0.1:{}", crate::free_port()),
            tls: Some(EtcdTls::generate(&dir.join("etcd-tls"))?),
            peer: format!("127.0.0.1:{}", crate::free_port()),
            dir: dir.join("etcd"),
            ns: None,
            log: dir.join("etcd.log"),
        };
        e.run().await?;
        Ok(e)
    }

    /// `etcd://<client>` (`etcd+https://` with TLS) for `--store`.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("etcd+https://{}", self.client),
            None => format!("etcd://{}", self.client),
        }
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth")
                .arg("--listen-metrics-urls")
                .arg(format!("http://{}", self.health));
        }
        cmd.args(["--name", "test"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{}", self.client),
                "--advertise-client-urls",
                &format!("{scheme}://{}", self.client),
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
            let (client, ns) = (self.health.clone(), self.ns.clone());
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
