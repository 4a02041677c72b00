//! linkerd2-proxy as a third peer, run as Linkerd runs it: sidecars that find their traffic by
//! iptables redirection, and a controller that serves what they ask for.
//!
//! The controller is the smallest one the proxy starts against: the identity API (each proxy's
//! CSR signed by the mesh's own CA, so all three meshes trust one root), the destination API
//! (the backend's one endpoint, with its identity and the HTTP/2 hint, as Linkerd's destination
//! controller answers for a meshed pod) and the policy APIs (an outbound policy with Linkerd's
//! default route and peak-EWMA balancer; inbound servers that allow authenticated callers only,
//! or anyone). It speaks plaintext gRPC on loopback, as the proxy allows for a loopback
//! controller; the control traffic is not what is measured.
//!
//! The pods are addresses of the benchmarking range (RFC 2544) on a veth interface the run
//! makes and removes (Linkerd's outbound proxy refuses to connect to a loopback address); the
//! kernel carries their traffic as loopback's:
//! - `198.18.0.4:APP` is the backend's service address: redirected to the `web` proxy's
//!   outbound listener (the pair's entry);
//! - `198.18.0.2:APP` is the backend pod behind a proxy that takes mTLS only (STRICT);
//! - `198.18.0.3:APP` is the same app behind a proxy that takes plaintext (the one-proxy entry).
//!
//! Connections to a pod address are redirected to its proxy's inbound listener, except the
//! proxy's own (matched by its user id, as linkerd-init matches the proxy's), which are sent on
//! to the app's listener on 127.0.0.1.

use crate::mesh::free_port;
use anyhow::Context;
use futures_util::StreamExt as _;
use linkerd2_proxy_api as api;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

/// The identity suffix of Linkerd's default trust domain.
const ID_SUFFIX: &str = "default.serviceaccount.identity.linkerd.cluster.local";
/// What the `web` proxy's outbound policy sends to: Linkerd's destination path of the service.
const BACKEND_DST: &str = "backend.default.svc.cluster.local";
/// The token each proxy presents with its CSR (Linkerd's is the pod's service-account token).
const TOKEN: &str = "bench-token";
/// The nat chain the redirections live in (removed when the run ends).
const CHAIN: &str = "MESHBENCH_L5D";
/// The service address, the STRICT pod, the plaintext pod.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const POD_STRICT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const POD_PLAIN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The `web` pod's address (its inbound side is not used).
const POD_WEB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
/// The interface the pod addresses are on (one end of a veth pair: these machines have no
/// dummy interfaces), and its peer.
const LINK: &str = "mbl5d0";
const PEER: &str = "mbl5d1";
/// User ids of the two inbound proxies, so their connections to the app are told apart from
/// the callers' (linkerd-init's `--proxy-uid`).
const UID_STRICT: u32 = 2102;
const UID_PLAIN: u32 = 2103;

/// A service account's Linkerd identity.
pub fn identity(sa: &str) -> String {
    format!("{sa}.{ID_SUFFIX}")
}

/// The running Linkerd sidecars, their controller and their redirections.
pub struct Linkerd {
    /// The pair's entry: the backend's service address, redirected to the `web` proxy.
    pub pair: SocketAddr,
    /// The one-proxy entry: the plaintext pod's address.
    pub single: SocketAddr,
    /// The pair's proxies, outbound (`web`) first.
    pub pair_pids: Vec<u32>,
    pub single_pid: u32,
    /// Admin listeners of `web` and of the STRICT backend proxy (their metrics).
    web_admin: SocketAddr,
    backend_admin: SocketAddr,
    _proxies: Vec<Child>,
    _nat: Redirects,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for Linkerd {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

impl Linkerd {
    /// Starts the controller (signing with the CA under the control plane's data directory
    /// `cp_dir`, whose bundle is `ca_pem`), the three proxies (`bin`, each on `workers`
    /// threads, 0: its default) and the redirections to them, for the app on 127.0.0.1:`app`.
    /// State and logs go under `dir`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        cp_dir: &Path,
        ca_pem: &str,
        app: u16,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let ctl = listener.local_addr()?;
        let state = Controller {
            signer: Arc::new(Signer::from_cp_dir(cp_dir)?),
            vip: SocketAddr::from((VIP, app)),
            endpoint: SocketAddr::from((POD_STRICT, app)),
        };
        let controller = tokio::spawn(async move {
            use api::{destination, identity, inbound, outbound};
            let r = tonic::transport::Server::builder()
                .add_service(identity::identity_server::IdentityServer::new(
                    state.clone(),
                ))
                .add_service(destination::destination_server::DestinationServer::new(
                    state.clone(),
                ))
                .add_service(
                    inbound::inbound_server_policies_server::InboundServerPoliciesServer::new(
                        state.clone(),
                    ),
                )
                .add_service(outbound::outbound_policies_server::OutboundPoliciesServer::new(state))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(e) = r {
                eprintln!("linkerd controller: {e}");
            }
        });

        // Each proxy's files must be readable by its own user.
        let base = dir.join("linkerd");
        std::fs::create_dir_all(&base)?;
        use std::os::unix::fs::PermissionsExt as _;
        for d in [dir, base.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        let ports = [free_port()?, free_port()?, free_port()?];
        let specs = [
            // (service account, workload, uid, the listener the redirection goes to)
            ("web", "web", None, ProxyRole::Outbound(ports[0])),
            (
                "backend",
                "backend",
                Some(UID_STRICT),
                ProxyRole::Inbound(ports[1], POD_STRICT),
            ),
            (
                "backend",
                "backend-plain",
                Some(UID_PLAIN),
                ProxyRole::Inbound(ports[2], POD_PLAIN),
            ),
        ];
        let nat = Redirects::install(&[
            // The inbound proxies' own connections go on to the app.
            rule(POD_STRICT, app, Some(UID_STRICT), Target::Dnat(app)),
            rule(POD_PLAIN, app, Some(UID_PLAIN), Target::Dnat(app)),
            // Everyone else's to a pod goes to its proxy, and to the service to `web`'s.
            rule(POD_STRICT, app, None, Target::Redirect(ports[1])),
            rule(POD_PLAIN, app, None, Target::Redirect(ports[2])),
            rule(VIP, app, None, Target::Redirect(ports[0])),
        ])?;
        let mut proxies = Vec::new();
        let mut admins = Vec::new();
        let mut pids = Vec::new();
        for (sa, workload, uid, role) in specs {
            let p = ProxyFiles::write(&base, sa, workload, ca_pem)?;
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut cmd = Command::new(bin);
            p.env(&mut cmd, ctl, admin, app, role)?;
            if workers > 0 {
                cmd.env("LINKERD2_PROXY_CORES", workers.to_string());
            }
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
            let log = std::fs::File::create(dir.join(format!("linkerd-{workload}.log")))?;
            let child = cmd
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            pids.push(child.id().context("linkerd2-proxy pid")?);
            proxies.push(child);
            admins.push(admin);
        }
        // Ready once each has its certificate (its admin `/ready` answers 200).
        for (admin, name) in admins.iter().zip(["web", "backend", "backend-plain"]) {
            let deadline = tokio::time::Instant::now() + crate::mesh::READY;
            loop {
                if matches!(http_get(*admin, "/ready").await, Ok((200, _))) {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "linkerd2-proxy {name} not ready; see {}",
                    dir.join(format!("linkerd-{name}.log")).display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Self {
            pair: SocketAddr::from((VIP, app)),
            single: SocketAddr::from((POD_PLAIN, app)),
            pair_pids: vec![pids[0], pids[1]],
            single_pid: pids[2],
            web_admin: admins[0],
            backend_admin: admins[1],
            _proxies: proxies,
            _nat: nat,
            controller,
        })
    }

    /// Requests the pair has carried over its mTLS, by the proxies' own metrics: the backend's
    /// inbound requests from `web`'s identity over TLS, and `web`'s outbound ones to the
    /// backend's. An error unless both sides count the same traffic as mTLS.
    pub async fn mtls_requests(&self) -> anyhow::Result<u64> {
        let inbound = tls_requests(self.backend_admin, "inbound", "client_id", "web").await?;
        let outbound = tls_requests(self.web_admin, "outbound", "server_id", "backend").await?;
        anyhow::ensure!(
            inbound > 0 && outbound > 0,
            "linkerd2-proxy pair: {outbound} request(s) sent and {inbound} received over mTLS"
        );
        Ok(inbound.min(outbound))
    }
}

/// A proxy's `request_total` over TLS in `direction` whose `peer_label` is service account
/// `sa`'s identity, from its admin listener at `admin`.
async fn tls_requests(
    admin: SocketAddr,
    direction: &str,
    peer_label: &str,
    sa: &str,
) -> anyhow::Result<u64> {
    let (status, body) = http_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "{admin}/metrics answered {status}");
    let labels = [
        format!(r#"direction="{direction}""#),
        r#"tls="true""#.to_string(),
        format!(r#"{peer_label}="{}""#, identity(sa)),
    ];
    Ok(body
        .lines()
        .filter(|l| l.starts_with("request_total{") && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// One HTTP/1.1 GET to `addr`: the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    // The admin server may answer chunked; the metrics lines survive the chunk sizes.
    Ok((status, body.to_string()))
}

/// What a proxy does in the run: the outbound side of the pair (its outbound listener), or an
/// inbound side (its inbound listener and its pod's address).
#[derive(Clone, Copy)]
enum ProxyRole {
    Outbound(u16),
    Inbound(u16, Ipv4Addr),
}

/// A proxy's identity documents: its key and CSR (Linkerd's injector has the proxy make them
/// at start; here they are written first), its token.
struct ProxyFiles {
    dir: PathBuf,
    name: String,
    workload: String,
    ca_pem: String,
}

impl ProxyFiles {
    fn write(base: &Path, sa: &str, workload: &str, ca_pem: &str) -> anyhow::Result<Self> {
        let dir = base.join(workload);
        std::fs::create_dir_all(&dir)?;
        let name = identity(sa);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = rcgen::CertificateParams::new(vec![name.clone()])?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        std::fs::write(dir.join("csr.der"), p.serialize_request(&key)?.der())?;
        std::fs::write(dir.join("key.p8"), key.serialize_der())?;
        std::fs::write(dir.join("token"), TOKEN)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        for f in ["csr.der", "key.p8", "token"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(Self {
            dir,
            name,
            workload: workload.into(),
            ca_pem: ca_pem.into(),
        })
    }

    /// The environment Linkerd's injector gives a sidecar, for this run's addresses.
    fn env(
        &self,
        cmd: &mut Command,
        ctl: SocketAddr,
        admin: SocketAddr,
        app: u16,
        role: ProxyRole,
    ) -> anyhow::Result<()> {
        let (inbound, outbound, pod) = match role {
            ProxyRole::Outbound(p) => (free_port()?, p, POD_WEB),
            ProxyRole::Inbound(p, pod) => (p, free_port()?, pod),
        };
        let local = |p: u16| format!("127.0.0.1:{p}");
        cmd.env_clear()
            .env("LINKERD2_PROXY_LOG", "warn,linkerd=warn")
            .env("LINKERD2_PROXY_LOG_FORMAT", "plain")
            .env("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", local(inbound))
            .env("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR", local(outbound))
            .env("LINKERD2_PROXY_CONTROL_LISTEN_ADDR", local(free_port()?))
            .env("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", admin.to_string())
            .env("LINKERD2_PROXY_DESTINATION_SVC_ADDR", ctl.to_string())
            .env("LINKERD2_PROXY_POLICY_SVC_ADDR", ctl.to_string())
            .env("LINKERD2_PROXY_IDENTITY_SVC_ADDR", ctl.to_string())
            .env(
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                format!(r#"{{"ns":"default","pod":"{}"}}"#, self.workload),
            )
            .env("LINKERD2_PROXY_INBOUND_PORTS", app.to_string())
            // What the controller serves for the app's port, for any other port.
            .env(
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                if self.workload == "backend" {
                    "all-authenticated"
                } else {
                    "all-unauthenticated"
                },
            )
            .env("LINKERD2_PROXY_INBOUND_IPS", pod.to_string())
            .env("LINKERD2_PROXY_IDENTITY_DIR", &self.dir)
            .env("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", self.dir.join("token"))
            .env("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", &self.ca_pem)
            .env("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", &self.name);
        Ok(())
    }
}

/// The mesh CA's signing root, read from the control plane's data directory.
struct Signer {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Signer {
    fn from_cp_dir(cp_dir: &Path) -> anyhow::Result<Self> {
        let ca = cp_dir.join("ca");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ca.join("state.json"))?)?;
        let fp = state["signer"].as_str().context("the CA's signer")?;
        let read = |ext: &str| {
            let p = ca.join("roots").join(format!("{fp}.{ext}"));
            std::fs::read_to_string(&p).with_context(|| p.display().to_string())
        };
        let key = rcgen::KeyPair::from_pem(&read("key")?)?;
        Ok(Self {
            issuer: rcgen::Issuer::from_ca_cert_pem(&read("pem")?, key)?,
        })
    }

    /// A leaf for the CSR's key whose one name is `name`, for serving and calling, valid a day.
    fn sign(&self, csr: &[u8], name: &str) -> anyhow::Result<(Vec<u8>, std::time::SystemTime)> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr);
        let mut req = rcgen::CertificateSigningRequestParams::from_der(&der)?;
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(1);
        p.use_authority_key_identifier_extension = true;
        let until = p.not_after.into();
        req.params = p;
        Ok((req.signed_by(&self.issuer)?.der().to_vec(), until))
    }
}

/// The controller's state: whom it signs for and the one service it knows.
#[derive(Clone)]
struct Controller {
    signer: Arc<Signer>,
    vip: SocketAddr,
    endpoint: SocketAddr,
}

type Watch<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// One answer, then the stream stays open, as a controller's watch does while nothing changes.
fn once_then_idle<T: Send + 'static>(v: T) -> Watch<T> {
    Box::pin(
        futures_util::stream::once(async move { Ok(v) }).chain(futures_util::stream::pending()),
    )
}

fn default_meta(name: &str) -> Option<api::meta::Metadata> {
    Some(api::meta::Metadata {
        kind: Some(api::meta::metadata::Kind::Default(name.into())),
    })
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

#[tonic::async_trait]
impl api::identity::identity_server::Identity for Controller {
    async fn certify(
        &self,
        req: tonic::Request<api::identity::CertifyRequest>,
    ) -> Result<tonic::Response<api::identity::CertifyResponse>, tonic::Status> {
        let r = req.into_inner();
        if r.token != TOKEN.as_bytes() || !r.identity.ends_with(ID_SUFFIX) {
            return Err(tonic::Status::permission_denied(
                "unknown token or identity",
            ));
        }
        let (leaf, until) = self
            .signer
            .sign(&r.certificate_signing_request, &r.identity)
            .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
        Ok(tonic::Response::new(api::identity::CertifyResponse {
            leaf_certificate: leaf,
            intermediate_certificates: Vec::new(),
            valid_until: Some(until.into()),
        }))
    }
}

#[tonic::async_trait]
impl api::destination::destination_server::Destination for Controller {
    type GetStream = Watch<api::destination::Update>;
    type GetProfileStream = Watch<api::destination::DestinationProfile>;

    /// The backend's endpoint, meshed: its identity and the HTTP/2 hint.
    async fn get(
        &self,
        req: tonic::Request<api::destination::GetDestination>,
    ) -> Result<tonic::Response<Self::GetStream>, tonic::Status> {
        use api::destination as d;
        let path = req.into_inner().path;
        let update = if path == format!("{BACKEND_DST}:{}", self.vip.port()) {
            let name = identity("backend");
            d::update::Update::Add(d::WeightedAddrSet {
                addrs: vec![d::WeightedAddr {
                    addr: Some(self.endpoint.into()),
                    weight: 10_000,
                    tls_identity: Some(d::TlsIdentity {
                        strategy: Some(d::tls_identity::Strategy::DnsLikeIdentity(
                            d::tls_identity::DnsLikeIdentity { name: name.clone() },
                        )),
                        server_name: Some(d::tls_identity::DnsLikeIdentity { name }),
                    }),
                    protocol_hint: Some(d::ProtocolHint {
                        protocol: Some(d::protocol_hint::Protocol::H2(d::protocol_hint::H2 {})),
                        opaque_transport: None,
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
        } else {
            d::update::Update::NoEndpoints(d::NoEndpoints { exists: false })
        };
        Ok(tonic::Response::new(once_then_idle(d::Update {
            update: Some(update),
        })))
    }

    async fn get_profile(
        &self,
        _: tonic::Request<api::destination::GetDestination>,
    ) -> Result<tonic::Response<Self::GetProfileStream>, tonic::Status> {
        Err(tonic::Status::not_found("no service profiles here"))
    }
}

impl Controller {
    /// The backend pod's port takes mTLS callers only; any other port, anyone (Linkerd's
    /// `all-authenticated` and `all-unauthenticated` defaults).
    fn server(&self, spec: &api::inbound::PortSpec) -> api::inbound::Server {
        use api::inbound as i;
        let strict = spec.workload.contains(r#""pod":"backend""#);
        let (name, permit) = if strict {
            (
                "all-authenticated",
                i::authn::Permit::MeshTls(i::authn::PermitMeshTls {
                    clients: Some(i::authn::permit_mesh_tls::Clients::Identities(
                        i::authn::permit_mesh_tls::PermitClientIdentities {
                            identities: Vec::new(),
                            suffixes: vec![i::IdentitySuffix { parts: Vec::new() }],
                        },
                    )),
                }),
            )
        } else {
            (
                "all-unauthenticated",
                i::authn::Permit::Unauthenticated(i::authn::PermitUnauthenticated {}),
            )
        };
        let any = |ip: std::net::IpAddr| i::Network {
            net: Some(api::net::IpNetwork {
                ip: Some(ip.into()),
                prefix_len: 0,
            }),
            except: Vec::new(),
        };
        i::Server {
            protocol: Some(i::ProxyProtocol {
                kind: Some(i::proxy_protocol::Kind::Detect(i::proxy_protocol::Detect {
                    timeout: duration(Duration::from_secs(10)),
                    http_routes: Vec::new(),
                    http_local_rate_limit: None,
                })),
            }),
            authorizations: vec![i::Authz {
                networks: vec![
                    any(Ipv4Addr::UNSPECIFIED.into()),
                    any(std::net::Ipv6Addr::UNSPECIFIED.into()),
                ],
                authentication: Some(i::Authn {
                    permit: Some(permit),
                }),
                labels: Default::default(),
                metadata: default_meta(name),
            }],
            server_ips: Vec::new(),
            labels: [
                ("name".to_string(), name.to_string()),
                ("kind".to_string(), "default".to_string()),
            ]
            .into(),
        }
    }

    /// Linkerd's default outbound policy for the service address: detect the protocol, one
    /// route for every request, to a peak-EWMA balancer over the destination's endpoints.
    fn outbound(&self, spec: &api::outbound::TrafficSpec) -> Option<api::outbound::OutboundPolicy> {
        use api::outbound as o;
        use api::outbound::traffic_spec::Target;
        let Some(Target::Addr(a)) = &spec.target else {
            return None;
        };
        if *a != api::net::TcpAddress::from(self.vip) {
            return None;
        }
        let backend = o::Backend {
            metadata: default_meta("default"),
            queue: Some(o::Queue {
                capacity: 100,
                failfast_timeout: duration(Duration::from_secs(3)),
            }),
            kind: Some(o::backend::Kind::Balancer(o::backend::BalanceP2c {
                discovery: Some(o::backend::EndpointDiscovery {
                    kind: Some(o::backend::endpoint_discovery::Kind::Dst(
                        o::backend::endpoint_discovery::DestinationGet {
                            path: format!("{BACKEND_DST}:{}", self.vip.port()),
                        },
                    )),
                }),
                load: Some(o::backend::balance_p2c::Load::PeakEwma(
                    o::backend::balance_p2c::PeakEwma {
                        default_rtt: duration(Duration::from_millis(30)),
                        decay: duration(Duration::from_secs(10)),
                    },
                )),
            })),
        };
        let route = o::HttpRoute {
            metadata: default_meta("default"),
            hosts: Vec::new(),
            rules: vec![o::http_route::Rule {
                matches: vec![api::http_route::HttpRouteMatch {
                    path: Some(api::http_route::PathMatch {
                        kind: Some(api::http_route::path_match::Kind::Prefix("/".into())),
                    }),
                    ..Default::default()
                }],
                filters: Vec::new(),
                backends: Some(o::http_route::Distribution {
                    kind: Some(o::http_route::distribution::Kind::FirstAvailable(
                        o::http_route::distribution::FirstAvailable {
                            backends: vec![o::http_route::RouteBackend {
                                backend: Some(backend.clone()),
                                ..Default::default()
                            }],
                        },
                    )),
                }),
                ..Default::default()
            }],
        };
        let opaque = o::OpaqueRoute {
            metadata: default_meta("default"),
            rules: vec![o::opaque_route::Rule {
                backends: Some(o::opaque_route::Distribution {
                    kind: Some(o::opaque_route::distribution::Kind::FirstAvailable(
                        o::opaque_route::distribution::FirstAvailable {
                            backends: vec![o::opaque_route::RouteBackend {
                                backend: Some(backend),
                                filters: Vec::new(),
                            }],
                        },
                    )),
                }),
                filters: Vec::new(),
            }],
        };
        use o::proxy_protocol as p;
        Some(o::OutboundPolicy {
            metadata: default_meta("default"),
            protocol: Some(o::ProxyProtocol {
                kind: Some(p::Kind::Detect(p::Detect {
                    timeout: duration(Duration::from_secs(10)),
                    http1: Some(p::Http1 {
                        routes: vec![route.clone()],
                        ..Default::default()
                    }),
                    http2: Some(p::Http2 {
                        routes: vec![route],
                        ..Default::default()
                    }),
                    opaque: Some(p::Opaque {
                        routes: vec![opaque],
                    }),
                })),
            }),
        })
    }
}

#[tonic::async_trait]
impl api::inbound::inbound_server_policies_server::InboundServerPolicies for Controller {
    type WatchPortStream = Watch<api::inbound::Server>;

    async fn get_port(
        &self,
        req: tonic::Request<api::inbound::PortSpec>,
    ) -> Result<tonic::Response<api::inbound::Server>, tonic::Status> {
        Ok(tonic::Response::new(self.server(req.get_ref())))
    }

    async fn watch_port(
        &self,
        req: tonic::Request<api::inbound::PortSpec>,
    ) -> Result<tonic::Response<Self::WatchPortStream>, tonic::Status> {
        Ok(tonic::Response::new(once_then_idle(
            self.server(req.get_ref()),
        )))
    }
}

#[tonic::async_trait]
impl api::outbound::outbound_policies_server::OutboundPolicies for Controller {
    type WatchStream = Watch<api::outbound::OutboundPolicy>;

    async fn get(
        &self,
        req: tonic::Request<api::outbound::TrafficSpec>,
    ) -> Result<tonic::Response<api::outbound::OutboundPolicy>, tonic::Status> {
        self.outbound(req.get_ref())
            .map(tonic::Response::new)
            .ok_or_else(|| tonic::Status::not_found("not a service here"))
    }

    /// Any address but the service's is not found: the proxy then forwards to it as it is.
    async fn watch(
        &self,
        req: tonic::Request<api::outbound::TrafficSpec>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.outbound(req.get_ref())
            .map(|p| tonic::Response::new(once_then_idle(p)))
            .ok_or_else(|| tonic::Status::not_found("not a service here"))
    }
}

/// Where a redirected connection goes: the app's listener on 127.0.0.1, or a proxy's listener.
enum Target {
    Dnat(u16),
    Redirect(u16),
}

/// One nat rule: TCP to `ip:port`, from the user `uid` only if given.
fn rule(ip: Ipv4Addr, port: u16, uid: Option<u32>, target: Target) -> Vec<String> {
    let mut r: Vec<String> = ["-p", "tcp", "-d"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("{ip}/32"), "--dport".into(), port.to_string()])
        .collect();
    if let Some(uid) = uid {
        r.extend(["-m", "owner", "--uid-owner"].map(String::from));
        r.push(uid.to_string());
    }
    match target {
        Target::Dnat(p) => r.extend([
            "-j".into(),
            "DNAT".into(),
            "--to-destination".into(),
            format!("127.0.0.1:{p}"),
        ]),
        Target::Redirect(p) => r.extend([
            "-j".into(),
            "REDIRECT".into(),
            "--to-ports".into(),
            p.to_string(),
        ]),
    }
    r
}

/// Runs `cmd args`; an error with what it printed unless it succeeds.
fn run(cmd: &str, args: &[String]) -> anyhow::Result<()> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The pods' addresses and the run's nat rules, in a chain of their own that OUTPUT jumps to;
/// both removed on drop.
struct Redirects;

impl Redirects {
    fn install(rules: &[Vec<String>]) -> anyhow::Result<Self> {
        Self::remove();
        let ipt = |args: &[String]| {
            let mut a: Vec<String> = ["-w", "-t", "nat"].map(String::from).to_vec();
            a.extend(args.iter().cloned());
            run("iptables", &a)
        };
        let ip = |args: &[&str]| {
            run(
                "ip",
                &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        ip(&["link", "add", LINK, "type", "veth", "peer", "name", PEER])?;
        let guard = Self;
        for a in [POD_STRICT, POD_PLAIN, VIP, POD_WEB] {
            ip(&["addr", "add", &format!("{a}/32"), "dev", LINK])?;
        }
        ip(&["link", "set", LINK, "up"])?;
        ip(&["link", "set", PEER, "up"])?;
        ipt(&["-N".into(), CHAIN.into()])?;
        for r in rules {
            let mut a = vec!["-A".to_string(), CHAIN.into()];
            a.extend(r.iter().cloned());
            ipt(&a)?;
        }
        ipt(&["-I".into(), "OUTPUT".into(), "-j".into(), CHAIN.into()])?;
        Ok(guard)
    }

    /// Removes the interface, the chain and the jump to it, if there (a run that was killed
    /// leaves them).
    fn remove() {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", LINK])
            .stderr(std::process::Stdio::null())
            .status();
        for args in [
            vec!["-D", "OUTPUT", "-j", CHAIN],
            vec!["-F", CHAIN],
            vec!["-X", CHAIN],
        ] {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-t", "nat"])
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Redirects {
    fn drop(&mut self) {
        Self::remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::identity::identity_server::Identity as _;
    use x509_parser::prelude::FromDer as _;

    /// A control plane's CA directory as `mesh-control-plane` lays it out, with a new root.
    fn cp_dir() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = p.self_signed(&key).expect("root");
        let roots = dir.path().join("ca/roots");
        std::fs::create_dir_all(&roots).expect("roots dir");
        std::fs::write(roots.join("fp.pem"), root.pem()).expect("pem");
        std::fs::write(roots.join("fp.key"), key.serialize_pem()).expect("key file");
        std::fs::write(
            dir.path().join("ca/state.json"),
            r#"{"signer":"fp","bundle":["fp"]}"#,
        )
        .expect("state");
        (dir, root.pem())
    }

    fn controller(cp: &Path) -> Controller {
        Controller {
            signer: Arc::new(Signer::from_cp_dir(cp).expect("signer")),
            vip: SocketAddr::from((VIP, 8080)),
            endpoint: SocketAddr::from((POD_STRICT, 8080)),
        }
    }

    #[tokio::test]
    async fn certify_signs_the_csr_key_for_the_linkerd_name_with_the_mesh_root() {
        let (cp, ca_pem) = cp_dir();
        let c = controller(cp.path());
        let files = tempfile::tempdir().expect("tempdir");
        let p = ProxyFiles::write(files.path(), "web", "web", &ca_pem).expect("files");
        let csr = std::fs::read(p.dir.join("csr.der")).expect("csr");
        let req = |token: &str, identity: &str| {
            tonic::Request::new(api::identity::CertifyRequest {
                identity: identity.into(),
                token: token.as_bytes().to_vec(),
                certificate_signing_request: csr.clone(),
            })
        };
        let r = c
            .certify(req(TOKEN, &identity("web")))
            .await
            .expect("signed")
            .into_inner();
        let (_, leaf) =
            x509_parser::parse_x509_certificate(&r.leaf_certificate).expect("a certificate");
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .expect("extension")
            .expect("SANs")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, [format!("DNSName({})", identity("web"))]);
        let (_, root) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("pem");
        let root = root.parse_x509().expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the mesh root");
        let (_, parsed_csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                .expect("csr parses");
        assert_eq!(
            leaf.public_key().raw,
            parsed_csr.certification_request_info.subject_pki.raw,
            "the certificate is for the proxy's own key"
        );
        // A wrong token, or a name outside Linkerd's identity domain, is refused.
        for (token, id) in [("nope", identity("web")), (TOKEN, "web.example.com".into())] {
            let e = c.certify(req(token, &id)).await.expect_err("refused");
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
        }
    }

    #[test]
    fn only_the_service_address_has_an_outbound_policy_and_only_the_backend_pod_is_strict() {
        let (cp, _) = cp_dir();
        let c = controller(cp.path());
        let spec = |a: SocketAddr| api::outbound::TrafficSpec {
            source_workload: String::new(),
            target: Some(api::outbound::traffic_spec::Target::Addr(a.into())),
        };
        assert!(c.outbound(&spec(c.vip)).is_some());
        assert!(c.outbound(&spec(c.endpoint)).is_none());
        let permit = |pod: &str| {
            let s = c.server(&api::inbound::PortSpec {
                workload: format!(r#"{{"ns":"default","pod":"{pod}"}}"#),
                port: 8080,
            });
            s.authorizations[0]
                .authentication
                .clone()
                .and_then(|a| a.permit)
        };
        assert!(matches!(
            permit("backend"),
            Some(api::inbound::authn::Permit::MeshTls(_))
        ));
        assert!(matches!(
            permit("backend-plain"),
            Some(api::inbound::authn::Permit::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_proxy_s_own_connections_to_its_pod_go_to_the_app_and_everyone_else_s_to_the_proxy() {
        assert_eq!(
            rule(POD_STRICT, 8080, Some(UID_STRICT), Target::Dnat(8080)).join(" "),
            "-p tcp -d 198.18.0.2/32 --dport 8080 -m owner --uid-owner 2102 -j DNAT --to-destination 127.0.0.1:8080"
        );
        assert_eq!(
            rule(VIP, 8080, None, Target::Redirect(4140)).join(" "),
            "-p tcp -d 198.18.0.4/32 --dport 8080 -j REDIRECT --to-ports 4140"
        );
    }
}
