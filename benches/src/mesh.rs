//! The mesh under load, as the load benchmarks and the profile-guided build's training run
//! both start it: a control plane, the example app, and three sidecars: `web` outbound and
//! `backend` inbound in front of the app, the mTLS pair, its service in STRICT mode as users
//! run it; and a second inbound sidecar in front of the same app, service `backend-plain` in
//! PERMISSIVE mode, so that it takes plaintext as the one-proxy topology.

use anyhow::Context;
use mesh_proto::v1 as pb;
use meshctl::client::{Admin, connect_with};
use meshctl::process::{Process, proxy_command, sibling};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// How long each process has to say it is ready.
pub const READY: Duration = Duration::from_secs(30);

/// The mesh's trust domain in the benchmarks.
pub const TRUST_DOMAIN: &str = "mesh.local";
/// Time a sidecar has to drain and exit on SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a listener on 127.0.0.1:`port` accepts, at most [`READY`]; `what` names it in
/// the error.
pub async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The running mesh. Dropping it kills every process; [`Mesh::stop_sidecars`] stops the
/// sidecars cleanly first.
pub struct Mesh {
    pub admin: Admin,
    /// The control plane's gRPC address (discovery, CSRs).
    pub grpc: SocketAddr,
    pub ca_pem: String,
    pub app_port: u16,
    pub app_pid: u32,
    /// The `web` sidecar's outbound listener: the mTLS pair's entry.
    pub pair_port: u16,
    /// The `backend-plain` sidecar's inbound listener, taking plaintext: the one-proxy entry.
    pub single_port: u16,
    /// The `backend` sidecar's inbound listener (STRICT mTLS): where gateways send.
    pub backend_inbound: u16,
    /// The `backend` sidecar.
    pub backend_pid: u32,
    /// The pair's sidecars, outbound first.
    pub pair_pids: Vec<u32>,
    /// The one-proxy topology's sidecar (PERMISSIVE, plaintext from the load tool).
    pub single_pid: u32,
    /// Inbound (backend) first.
    sidecars: Vec<Process>,
    /// Control plane and app.
    others: Vec<Process>,
}

impl Mesh {
    /// Starts everything under `dir` (state, logs), with `proxy` as the sidecar binary and the
    /// control plane and app taken from `bins`, the app on `app_threads` runtime threads (or
    /// its default, one per core), each sidecar on `workers` threads (0: its default).
    pub async fn start(
        dir: &Path,
        bins: &Path,
        proxy: &Path,
        app_threads: Option<std::num::NonZeroUsize>,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let log = |n: &str| std::fs::File::create(dir.join(format!("{n}.log")));
        let mut others = Vec::new();
        let (grpc, admin_addr) = (
            SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        );
        let mut cmd = Command::new(sibling(bins, "mesh-control-plane")?);
        cmd.arg("--data-dir")
            .arg(dir.join("cp"))
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &admin_addr.to_string(),
                "--http-addr",
                "127.0.0.1:0",
            ])
            .stderr(log("cp")?);
        others.push(Process::spawn_ready("control plane", cmd, READY).await?.0);
        let ca_pem = std::fs::read_to_string(dir.join("cp/ca/bundle.pem"))?;
        std::fs::write(dir.join("ca.pem"), &ca_pem)?;
        let token = std::fs::read_to_string(dir.join("cp/admin-token"))?;
        let mut admin =
            connect_with(&format!("https://{admin_addr}"), token.trim(), &ca_pem).await?;

        let app_port = free_port()?;
        let mut cmd = Command::new(sibling(bins, "mesh-example")?);
        cmd.args([
            "serve",
            "--service",
            "backend",
            "--version",
            "v1",
            "--listen",
            &format!("127.0.0.1:{app_port}"),
        ])
        .args(app_threads.map(|n| format!("--threads={n}")))
        .stderr(log("app")?);
        let app = Process::spawn_ready("app", cmd, READY).await?.0;
        let app_pid = app.pid().context("app pid")?;
        others.push(app);

        let mut sidecars = Vec::new();
        let mut ready = Vec::new();
        for (sa, extra) in [
            (
                "backend",
                vec![
                    "--service".to_string(),
                    "backend".into(),
                    "--app-port".into(),
                    app_port.to_string(),
                ],
            ),
            (
                "backend",
                vec![
                    "--service".to_string(),
                    "backend-plain".into(),
                    "--app-port".into(),
                    app_port.to_string(),
                ],
            ),
            ("web", vec![]),
        ] {
            let mut c = proxy_command(
                proxy,
                &grpc.to_string(),
                &dir.join("ca.pem"),
                &mut admin,
                sa,
            )
            .await?;
            if workers > 0 {
                c.args(["--workers", &workers.to_string()]);
            }
            c.args([
                "--outbound-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--inbound-addr",
                "127.0.0.1:0",
            ]);
            // Named by its service (the two inbound sidecars share an account).
            let name = extra.get(1).map_or(sa, String::as_str).to_string();
            c.args(extra)
                .env("RUST_LOG", "warn")
                .stderr(log(&format!("proxy-{name}"))?);
            let (p, r) = Process::spawn_ready(&format!("mesh sidecar {name}"), c, READY).await?;
            sidecars.push(p);
            ready.push(r);
        }
        let port_of = |ready: &serde_json::Value, side: &str| -> anyhow::Result<u16> {
            Ok(ready[side]
                .as_str()
                .context("ready line")?
                .parse::<SocketAddr>()?
                .port())
        };
        let pids = sidecars
            .iter()
            .map(|p| p.pid().context("sidecar pid"))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        // The backend's sidecar registers its service once ready; until then it is unknown.
        let deadline = tokio::time::Instant::now() + READY;
        while let Err(e) = admin
            .set_mtls_mode(pb::SetMtlsModeRequest {
                service: "backend-plain".into(),
                mode: "permissive".into(),
            })
            .await
        {
            anyhow::ensure!(
                e.code() == tonic::Code::NotFound && tokio::time::Instant::now() < deadline,
                "PERMISSIVE mode for backend-plain: {e}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            admin,
            grpc,
            ca_pem,
            app_port,
            app_pid,
            pair_port: port_of(&ready[2], "outbound")?,
            single_port: port_of(&ready[1], "inbound")?,
            backend_inbound: port_of(&ready[0], "inbound")?,
            backend_pid: pids[0],
            single_pid: pids[1],
            pair_pids: vec![pids[2], pids[0]],
            sidecars,
            others,
        })
    }

    /// SIGTERM to both sidecars; each must drain and exit with success (a profiling build
    /// writes its profile only on a clean exit).
    pub async fn stop_sidecars(&mut self) -> anyhow::Result<()> {
        for p in &mut self.sidecars {
            let status = p.terminate(DRAIN).await;
            anyhow::ensure!(
                status.is_some_and(|s| s.success()),
                "{} did not exit cleanly: {status:?}",
                p.name
            );
        }
        Ok(())
    }

    /// Kills the control plane and the app (the sidecars too, if still running).
    pub fn stop(self) {
        drop(self.sidecars);
        drop(self.others);
    }
}

/// The sidecar binary: `--proxy` if given, else `mesh-proxy` beside the running benchmark.
pub fn proxy_bin(arg: Option<PathBuf>, bins: &Path) -> anyhow::Result<PathBuf> {
    match arg {
        Some(p) => Ok(p),
        None => sibling(bins, "mesh-proxy"),
    }
}

/// The body of one gRPC `Echo/Unary` call: a length-prefixed message of `body` bytes.
pub fn grpc_request(body: usize) -> Vec<u8> {
    use prost::Message as _;
    let msg = echo_request(body).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

/// The `Echo/Unary` request the loads send: a message of `body` bytes.
pub fn echo_request(body: usize) -> mesh_proto::example::EchoRequest {
    mesh_proto::example::EchoRequest {
        message: "x".repeat(body),
        ..Default::default()
    }
}

/// A gRPC `Echo` client to `backend` through the listener at `addr`.
pub async fn echo_client(
    addr: SocketAddr,
) -> anyhow::Result<mesh_proto::example::echo_client::EchoClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    Ok(mesh_proto::example::echo_client::EchoClient::new(ch))
}

/// Checks that a real gRPC client gets an OK `Echo/Unary` answer with its message back through
/// the listener at `addr`: a gRPC error comes as an HTTP 200 with a grpc-status.
pub async fn grpc_check(addr: SocketAddr, body: usize) -> anyhow::Result<()> {
    let req = echo_request(body);
    let want = req.message.clone();
    let r = echo_client(addr).await?.unary(req).await?.into_inner();
    anyhow::ensure!(r.message == want, "gRPC echo came back changed");
    Ok(())
}

/// A GET for `path` of service `backend`, as a load tool sends it: origin form with a Host
/// field, or absolute for HTTP/2 (`:authority`).
pub fn get_request(
    path: &str,
    absolute: bool,
) -> anyhow::Result<http::Request<http_body_util::Empty<bytes::Bytes>>> {
    let uri = if absolute {
        format!("http://backend{path}")
    } else {
        path.to_string()
    };
    Ok(http::Request::get(uri)
        .header(http::header::HOST, "backend")
        .body(http_body_util::Empty::new())?)
}

/// One GET for `path` of service `backend` through the listener at `addr`, over HTTP/2 (prior
/// knowledge) or HTTP/1.1; the status and the whole body.
pub async fn get_once(
    addr: SocketAddr,
    h2: bool,
    path: &str,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await?);
    let req = get_request(path, h2)?;
    let resp = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        tx.send_request(req).await?
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        tx.send_request(req).await?
    };
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// Checks that every topology gives the app the same view, so that it does the same work under
/// the same load: the app behind `addr` is spoken to in its caller's protocol, HTTP/1.1 and
/// HTTP/2 alike (the mesh keeps it; the Envoy configs are set to do the same), and it is told
/// the caller's identity `caller` in `x-forwarded-client-cert` (`""`: no identity, as from a
/// plaintext caller).
pub async fn app_view_check(addr: SocketAddr, caller: &str) -> anyhow::Result<()> {
    for (h2, want) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let (status, body) = get_once(addr, h2, "/app-view").await?;
        anyhow::ensure!(status == http::StatusCode::OK, "answered {status}");
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(
            v["protocol"] == want,
            "a {want} caller's request reached the app as {}",
            v["protocol"]
        );
        anyhow::ensure!(
            v["peer"] == caller,
            "the app was told the caller is {}, not {caller:?}",
            v["peer"]
        );
    }
    Ok(())
}

/// A key and certificate from the mesh CA for `sa`, written as `<sa>.crt` / `<sa>.key`.
pub async fn certify_files(
    admin: &mut meshctl::client::Admin,
    grpc: SocketAddr,
    ca_pem: &str,
    dir: &Path,
    sa: &str,
) -> anyhow::Result<()> {
    let token = meshctl::client::bootstrap_token(admin, &format!("default/{sa}"), 0).await?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}").try_into()?,
    )];
    let csr_pem = p.serialize_request(&key)?.pem()?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("mesh-control-plane");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    let r = pb::identity_client::IdentityClient::new(ch)
        .certify(pb::CertifyRequest { csr_pem, token })
        .await?
        .into_inner();
    std::fs::write(dir.join(format!("{sa}.crt")), r.cert_chain_pem)?;
    std::fs::write(dir.join(format!("{sa}.key")), key.serialize_pem())?;
    Ok(())
}

/// Envoy's cluster `backend`: HTTP/2 over mTLS (TLS 1.3) to the backend's mesh sidecar at
/// `peer`, with the certificate `certify_files` wrote for `sa`, the backend's SPIFFE id
/// checked. The `clusters:` block of a static config.
pub fn envoy_mtls_cluster(dir: &Path, sa: &str, peer: u16) -> String {
    let f = |n: String| dir.join(n).display().to_string();
    let (crt, key, ca) = (
        f(format!("{sa}.crt")),
        f(format!("{sa}.key")),
        f("ca.pem".into()),
    );
    format!(
        r#"  clusters:
  - name: backend
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          alpn_protocols: [h2]
          tls_certificates: [{{certificate_chain: {{filename: "{crt}"}}, private_key: {{filename: "{key}"}}}}]
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "spiffe://{TRUST_DOMAIN}/ns/default/sa/backend"}}}}]
    load_assignment: {{cluster_name: backend, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {peer}}}}}}}}}]}}]}}
"#
    )
}
