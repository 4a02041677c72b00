//! mTLS on the inbound port and the CA's checks (tests 2 and 6 of the foundation).

use mesh_proto::v1 as pb;
use mesh_tests::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Accepts any server certificate: these tests check what the *server* accepts.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends one HTTP/1.1 request over TLS with `chain`/`key` as client certificate; returns what
/// came back (empty when the server refused the handshake).
async fn raw_tls_request(
    addr: std::net::SocketAddr,
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("backend")?.to_owned();
    let mut out = Vec::new();
    let io = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"GET /whoami HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n")
            .await?;
        tls.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), io).await;
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// Test 2: the inbound port refuses plaintext and certificates from another CA, and serves a
/// mesh certificate, passing the caller's SPIFFE identity to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_requires_mesh_mtls() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b = mesh.workload("backend", "v1").await?;
    let inbound = b.inbound.expect("inbound");

    // Plaintext HTTP: no HTTP response, the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plaintext got an answer"
    );

    // A valid mesh certificate for default/web, obtained by CSR: served, identity passed on.
    let mut id = identity_client(&mesh).await?;
    let token = mesh.token("web").await?;
    let (key, pem) = csr("spiffe://mesh.local/ns/default/sa/web")?;
    let cert = id
        .certify(pb::CertifyRequest {
            csr_pem: pem,
            token,
        })
        .await?
        .into_inner();
    let ok = raw_tls_request(inbound, &cert.cert_chain_pem, &key.serialize_pem()).await?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("spiffe://mesh.local/ns/default/sa/web"), "{ok}");

    // The same identity signed by another CA: refused.
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://mesh.local/ns/default/sa/web"
            .to_string()
            .try_into()?,
    )];
    let forged = leaf.signed_by(&leaf_key, &issuer)?;
    let refused = raw_tls_request(inbound, &forged.pem(), &leaf_key.serialize_pem()).await?;
    assert!(
        !refused.contains("HTTP/1.1"),
        "foreign CA got an answer: {refused}"
    );
    Ok(())
}

/// Test 6: the CA signs only the token's identity; unknown, expired or missing credentials and
/// malformed CSRs are refused with clear gRPC errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_checks_credentials_and_csrs() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let mut id = identity_client(&mesh).await?;
    let token = mesh.token("web").await?;

    let (_, other) = csr("spiffe://mesh.local/ns/default/sa/db")?;
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: other,
            token: token.clone(),
        })
        .await
        .expect_err("other identity");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("spiffe://mesh.local/ns/default/sa/db")
            && e.message().contains("sa/web"),
        "{}",
        e.message()
    );

    let (_, mine) = csr("spiffe://mesh.local/ns/default/sa/web")?;
    let unknown = format!("mesh1.{}", "ab".repeat(32));
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: mine.clone(),
            token: unknown,
        })
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("unknown"), "{}", e.message());

    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: mine.clone(),
            token: "garbage".into(),
        })
        .await
        .expect_err("malformed token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: mine.clone(),
            token: String::new(),
        })
        .await
        .expect_err("no credential");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let e = id
        .certify(pb::CertifyRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            token: token.clone(),
        })
        .await
        .expect_err("malformed CSR");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let ok = id
        .certify(pb::CertifyRequest {
            csr_pem: mine.clone(),
            token,
        })
        .await?
        .into_inner();
    assert!(ok.cert_chain_pem.contains("BEGIN CERTIFICATE"));
    let left = ok.expires_at_unix
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
    assert!(
        (23 * 3600..=24 * 3600).contains(&left),
        "24 h default lifetime, got {left} s"
    );

    // Expiry: a one-second token is refused once its second has passed (waiting out the clock).
    let short = meshctl::client::bootstrap_token(&mut mesh.admin, "default/web", 1).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: mine,
            token: short,
        })
        .await
        .expect_err("expired token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());

    // The admin API refuses calls without the admin token.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(mesh.ca_pem()?))
        .domain_name("mesh-control-plane");
    let ch = Endpoint::from_shared(format!("https://{}", mesh.admin_addr))?
        .tls_config(tls)?
        .connect()
        .await?;
    let e = pb::admin_client::AdminClient::new(ch)
        .list_services(pb::ListServicesRequest {})
        .await
        .expect_err("no admin token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // Replicas trust each other by the control plane's identity: no workload is issued it,
    // and the replicas' API on the proxies' port refuses workloads and anonymous callers.
    let cp_id = "spiffe://mesh.local/ns/mesh-system/sa/mesh-control-plane";
    let cp_token =
        meshctl::client::bootstrap_token(&mut mesh.admin, "mesh-system/mesh-control-plane", 0)
            .await?;
    let e = id
        .certify(pb::CertifyRequest {
            csr_pem: csr(cp_id)?.1,
            token: cp_token,
        })
        .await
        .expect_err("the control plane's identity");
    assert!(e.message().contains("reserved"), "{}", e.message());
    let (key, pem) = csr("spiffe://mesh.local/ns/default/sa/web")?;
    let web_token = mesh.token("web").await?;
    let signed = id
        .certify(pb::CertifyRequest {
            csr_pem: pem,
            token: web_token,
        })
        .await?
        .into_inner();
    let replicas = |identity: Option<tonic::transport::Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(mesh.ca_pem().unwrap_or_default()))
            .domain_name("mesh-control-plane");
        if let Some(i) = identity {
            tls = tls.identity(i);
        }
        let grpc = mesh.grpc;
        async move {
            let ch = Endpoint::from_shared(format!("https://{grpc}"))?
                .tls_config(tls)?
                .connect()
                .await?;
            anyhow::Ok(pb::replicas_client::ReplicasClient::new(ch))
        }
    };
    let web = tonic::transport::Identity::from_pem(signed.cert_chain_pem, key.serialize_pem());
    let e = replicas(Some(web))
        .await?
        .windows(pb::WindowsRequest::default())
        .await
        .expect_err("a workload asking for the replicas' telemetry");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not a control-plane replica"), "{e}");
    let e = replicas(None)
        .await?
        .proxies(pb::ListProxiesRequest {})
        .await
        .expect_err("an anonymous caller");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    Ok(())
}

/// The outbound sidecar checks the peer's SPIFFE id against the one the control plane gives for
/// the service, not just the CA: an endpoint of `impostor` that is really `backend`'s sidecar
/// (same CA, other identity) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_verifies_the_service_identity() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b = mesh.workload("backend", "v1").await?;
    let inbound = b.inbound.expect("inbound").to_string();
    mesh.meshctl(&[
        "endpoints",
        "add",
        "impostor",
        "--id",
        "x",
        "--address",
        &inbound,
        "--version",
        "v1",
    ])
    .await?;
    let c = mesh.client("web").await?;
    let http = h1_client(c.outbound);
    let r = get(&http, "http://impostor/").await?;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(r.headers["x-mesh-error"], "tls-failed");
    assert!(
        r.text.contains("spiffe://mesh.local/ns/default/sa/backend"),
        "{}",
        r.text
    );
    // The genuine service on the same sidecar still works.
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    Ok(())
}

/// Authorization by caller identity, method and path: an allowed identity is served, a denied
/// one gets 403 (gRPC: PERMISSION_DENIED) naming the policy that decided, `meshctl authz check`
/// explains the same decisions offline, audit mode lets a denial through and logs it, and a bad
/// rule is refused without touching what is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_denies_and_audits_by_identity() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b = mesh.workload("backend", "v1").await?;
    let web = mesh.client("web").await?;
    let batch = mesh.client("batch").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let (hw, hb) = (h1_client(web.outbound), h1_client(batch.outbound));
    assert_eq!(
        get(&hb, "http://backend/").await?.status,
        200,
        "no rules: allowed"
    );

    mesh.meshctl(&[
        "authz",
        "set",
        "backend",
        "--rule",
        "deny name=no-admin paths=/admin/*",
        "--rule",
        "allow name=web-reads from=ns/default/sa/web methods=GET,HEAD",
    ])
    .await?;
    let out = mesh
        .meshctl(&["authz", "default", "default", "deny-all"])
        .await?;
    assert!(out.contains("deny-all"), "{out}");
    let applied = |audit: bool| {
        move |d: &serde_json::Value| {
            d["services"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["name"] == "backend"
                        && s["authz"]["default"] == "deny-all"
                        && s["authz"]["audit"] == audit
                })
            })
        }
    };
    wait_config(b.admin, Duration::from_secs(10), applied(false)).await?;

    let denied = |r: &Reply, by: &str| {
        r.status == 403
            && r.headers.get("x-mesh-error").is_some_and(|v| v == "denied")
            && r.text.contains(by)
    };
    assert_eq!(get(&hw, "http://backend/items").await?.status, 200);
    let r = get(&hw, "http://backend/admin/users").await?;
    assert!(
        denied(&r, "backend-authz/no-admin"),
        "{} {}",
        r.status,
        r.text
    );
    let r = hw
        .request(
            http::Request::post("http://backend/items")
                .body(http_body_util::Full::new(bytes::Bytes::new()))?,
        )
        .await?;
    assert_eq!(r.status(), 403, "POST is not in web's rule");
    let r = get(&hb, "http://backend/items").await?;
    assert!(
        denied(&r, "namespace default deny-all"),
        "{} {}",
        r.status,
        r.text
    );

    // gRPC callers get PERMISSION_DENIED naming the policy.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", batch.outbound))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    let e = mesh_proto::example::echo_client::EchoClient::new(channel)
        .unary(mesh_proto::example::EchoRequest::default())
        .await
        .expect_err("batch may not call backend");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("namespace default deny-all"), "{e:?}");

    // The same decisions, explained offline.
    for (from, path, want) in [
        (
            "default/web",
            "/items",
            "ALLOW default/web -> backend GET /items: decided by backend-authz/web-reads",
        ),
        (
            "default/web",
            "/admin/x",
            "DENY default/web -> backend GET /admin/x: decided by backend-authz/no-admin",
        ),
        (
            "default/batch",
            "/items",
            "DENY default/batch -> backend GET /items: decided by namespace default deny-all",
        ),
    ] {
        let (code, out, _) = mesh
            .meshctl_exit(&[
                "authz", "check", "--from", from, "--to", "backend", "--path", path,
            ])
            .await?;
        assert_eq!(out.trim(), want);
        // Scripts read the decision from the exit status: 0 allows, 3 denies.
        let want_code = if want.starts_with("ALLOW") { 0 } else { 3 };
        assert_eq!(code, want_code, "{want}");
    }

    // Audit mode: batch is let through, and the would-be denial is logged.
    mesh.meshctl(&[
        "authz",
        "set",
        "backend",
        "--audit",
        "--rule",
        "allow name=web-reads from=ns/default/sa/web methods=GET,HEAD",
    ])
    .await?;
    wait_config(b.admin, Duration::from_secs(10), applied(true)).await?;
    assert_eq!(get(&hb, "http://backend/audited").await?.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = mesh.logs_of("backend-v1-proxy")?;
        if log.lines().any(|l| {
            l.contains("authz audit: would deny")
                && l.contains("sa/batch")
                && l.contains("/audited")
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit line:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad rule is refused and changes nothing.
    let bad = mesh
        .meshctl(&["authz", "set", "backend", "--rule", "allow from=bogus"])
        .await;
    assert!(
        bad.as_ref()
            .is_err_and(|e| e.to_string().contains("use ns/<ns>/sa/<sa>")),
        "{bad:?}"
    );
    let got = mesh
        .meshctl(&["-o", "json", "authz", "get", "backend"])
        .await?;
    let got: serde_json::Value = serde_json::from_str(&got)?;
    assert_eq!(got["authz"]["audit"], true, "{got}");
    assert_eq!(got["authz"]["rules"][0]["name"], "web-reads", "{got}");
    Ok(())
}

/// Plaintext HTTP/1.1 GET straight to an inbound port; the raw answer ("" if the connection
/// was closed without one).
async fn plaintext_get(inbound: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(inbound).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    Ok(String::from_utf8_lossy(&buf).to_string())
}

/// mTLS modes: STRICT (the default) refuses plaintext; PERMISSIVE serves plaintext callers
/// (with no identity passed to the app) and mTLS callers alike; `meshctl services` reports the
/// mode; back to STRICT, plaintext is refused again. Authorization sees a plaintext caller as
/// having no identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_plaintext_and_strict_refuses_it() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b = mesh.workload("backend", "v1").await?;
    let inbound = b.inbound.expect("inbound");
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let http = h1_client(c.outbound);
    let mode_in_dump = |want: bool| {
        move |d: &serde_json::Value| {
            d["services"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "backend" && s["mtls_permissive"] == want)
            })
        }
    };
    assert!(
        plaintext_get(inbound, "/").await?.is_empty(),
        "STRICT by default"
    );
    let table = mesh.meshctl(&["services"]).await?;
    assert!(
        table.contains("MTLS") && table.contains("STRICT"),
        "{table}"
    );

    mesh.meshctl(&["mtls", "backend", "permissive"]).await?;
    wait_config(b.admin, Duration::from_secs(10), mode_in_dump(true)).await?;
    let plain = plaintext_get(inbound, "/plain").await?;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(
        plain.contains("\"peer\":\"\""),
        "no identity for plaintext: {plain}"
    );
    assert!(
        plain.contains("\"protocol\":\"HTTP/1.1\""),
        "a plaintext HTTP/1.1 caller reaches the app over HTTP/1.1: {plain}"
    );
    let r = get(&http, "http://backend/mtls").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["peer"], "spiffe://mesh.local/ns/default/sa/web");
    let table = mesh.meshctl(&["services"]).await?;
    assert!(table.contains("PERMISSIVE"), "{table}");

    // allow-mesh-only: plaintext callers are denied, mesh callers served.
    mesh.meshctl(&["authz", "default", "default", "allow-mesh-only"])
        .await?;
    wait_config(b.admin, Duration::from_secs(10), |d| {
        d["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "backend" && s["authz"]["default"] == "allow-mesh-only")
        })
    })
    .await?;
    let plain = plaintext_get(inbound, "/").await?;
    assert!(plain.starts_with("HTTP/1.1 403"), "{plain}");
    assert!(
        plain.contains("namespace default allow-mesh-only"),
        "{plain}"
    );
    assert_eq!(get(&http, "http://backend/").await?.status, 200);

    mesh.meshctl(&["mtls", "backend", "strict"]).await?;
    wait_config(b.admin, Duration::from_secs(10), mode_in_dump(false)).await?;
    assert!(
        plaintext_get(inbound, "/").await?.is_empty(),
        "STRICT again"
    );
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    let bad = mesh.meshctl(&["mtls", "backend", "lenient"]).await;
    assert!(bad.is_err_and(|e| e.to_string().contains("use strict or permissive")));
    Ok(())
}

/// Bootstrap tokens are listed by id (never the secret), revocable, and a revoked token gets
/// no certificate; neither the admin token nor any bootstrap token appears in any log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_revocable_and_no_secret_is_logged() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    let created: serde_json::Value = serde_json::from_str(
        &mesh
            .meshctl(&[
                "-o",
                "json",
                "token",
                "create",
                "--identity",
                "default/batch",
            ])
            .await?,
    )?;
    let (token, id) = (
        created["token"].as_str().unwrap_or("").to_string(),
        created["id"].as_str().unwrap_or("").to_string(),
    );
    assert_eq!(id.len(), 16, "{created}");
    let list = mesh.meshctl(&["token", "list"]).await?;
    assert!(
        list.contains(&id) && list.contains("sa/batch") && !list.contains(&token),
        "{list}"
    );

    let short = mesh.meshctl(&["token", "revoke", "abc"]).await;
    assert!(short.is_err_and(|e| e.to_string().contains("at least 8 hex digits")));
    let out = mesh.meshctl(&["token", "revoke", &id[..10]]).await?;
    assert!(out.contains("revoked"), "{out}");
    assert!(!mesh.meshctl(&["token", "list"]).await?.contains(&id));

    let mut ca = identity_client(&mesh).await?;
    let (_, pem) = csr("spiffe://mesh.local/ns/default/sa/batch")?;
    let e = ca
        .certify(pb::CertifyRequest {
            csr_pem: pem,
            token: token.clone(),
        })
        .await
        .expect_err("revoked token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("unknown or revoked"), "{e:?}");

    let admin_token = std::fs::read_to_string(mesh.data_dir().join("admin-token"))?;
    let logs = mesh.logs_of("")?;
    assert!(
        logs.contains("bootstrap token revoked"),
        "the logs were read"
    );
    for secret in [admin_token.trim(), token.as_str(), "mesh1."] {
        assert!(!logs.contains(secret), "a secret is in the logs");
    }
    Ok(())
}

/// Garbage on every control-plane port and an oversized admin message are refused; the control
/// plane keeps serving and its state is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_refuses_garbage_and_oversized_messages() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let route_before = mesh
        .meshctl(&["-o", "json", "route", "get", "backend"])
        .await?;

    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    garbage.extend(b"\x16\x03\x01\x00\x05hello");
    for addr in [mesh.grpc, mesh.admin_addr, mesh.http] {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let _ = s.write_all(&garbage).await;
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "{addr} kept a garbage connection open");
    }
    let r = admin_get(mesh.http, "/nosuch").await?;
    assert_eq!(r.status, 404);

    // 5 MiB in one admin call: over the 4 MiB message limit.
    let huge = pb::SetRouteRequest {
        service: "backend".into(),
        route: Some(pb::Route {
            rules: vec![pb::RouteRule {
                name: "x".repeat(5 * 1024 * 1024),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = mesh.admin.set_route(huge).await.expect_err("oversized");
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{e:?}"
    );

    // Still serving, state intact.
    assert_eq!(
        mesh.meshctl(&["-o", "json", "route", "get", "backend"])
            .await?,
        route_before
    );
    let r = get(&h1_client(c.outbound), "http://backend/").await?;
    assert_eq!(r.status, 200);
    assert!(mesh.meshctl(&["services"]).await?.contains("backend"));
    Ok(())
}

/// Sends GETs to backend until `stop`, bounded in time; returns (successes, failures).
fn steady_load(
    http: HttpClient,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            match get(&http, "http://backend/").await {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failed.push(format!("{} {}", r.status, r.text)),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    })
}

/// Test 3 of the security issue: the trust root is replaced with an overlap (new root
/// trusted, then signing, then the old one dropped) under constant HTTP/1.1 and HTTP/2 load,
/// with endpoints joining mid-rotation and after it, and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_with_overlap_fails_no_request() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b1 = mesh.workload("backend", "v1").await?;
    let c = mesh.client("web").await?;
    let ca = |s: String| -> anyhow::Result<serde_json::Value> { Ok(serde_json::from_str(&s)?) };
    let before = ca(mesh.meshctl(&["-o", "json", "ca", "status"]).await?)?;
    assert_eq!(before["phase"], "steady");
    let old = before["roots"][0]["fingerprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The steps only go in order.
    let e = mesh
        .meshctl(&["ca", "rotate", "--step", "finish"])
        .await
        .expect_err("finish before activate");
    assert!(e.to_string().contains("finish follows activate"), "{e}");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads = [
        steady_load(h1_client(c.outbound), stop.clone()),
        steady_load(h2c_client(c.outbound), stop.clone()),
    ];

    // Step 1 alone, then an endpoint joins while both roots are trusted and the old one signs.
    let out = mesh.meshctl(&["ca", "rotate", "--step", "prepare"]).await?;
    assert!(out.contains("prepare: done (phase prepared)"), "{out}");
    let b2 = mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 2).await?;
    // The rest in one command: activate, wait for every proxy to renew, finish.
    let (code, out, progress) = mesh
        .meshctl_exit(&["ca", "rotate", "--timeout", "60s"])
        .await?;
    assert_eq!(code, 0, "{progress}");
    assert!(
        out.contains("activate: done") && out.contains("finish: done (phase steady)"),
        "{out}"
    );
    // Progress shows live on stderr: how many proxies are ready for each step.
    assert!(
        progress.contains("activate: ")
            && progress.contains("finish: ")
            && progress.contains("proxies ready"),
        "{progress}"
    );
    // Joining after the rotation: a backend endpoint and a client, bootstrapped with the new
    // bundle file.
    let b3 = mesh.workload("backend", "v1").await?;
    mesh.wait_endpoints("backend", 3).await?;
    let c2 = mesh.client("web").await?;
    for i in 0..30 {
        let r = get(&h1_client(c2.outbound), &format!("http://backend/new/{i}")).await?;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in loads {
        let (o, f) = l.await?;
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    eprintln!("rotation under load: {ok} requests, none failed");
    assert!(ok > 50, "only {ok} requests during the rotation");

    // One new root, signing; every proxy's certificate is from it and trusts it alone.
    let after = ca(mesh.meshctl(&["-o", "json", "ca", "status"]).await?)?;
    assert_eq!(after["phase"], "steady", "{after}");
    let roots = after["roots"].as_array().cloned().unwrap_or_default();
    assert_eq!(roots.len(), 1, "{after}");
    let new = roots[0]["fingerprint"].as_str().unwrap_or_default();
    assert_ne!(new, old);
    for s in [&b1, &b2, &b3, &c, &c2] {
        let dump = admin_get(s.admin, "/config_dump").await?.json;
        assert_eq!(dump["certificate"]["signer"], new, "{dump}");
        assert_eq!(dump["trust_roots"], 1, "{dump}");
    }
    let proxies = after["proxies"].as_array().cloned().unwrap_or_default();
    assert_eq!(proxies.len(), 5, "{after}");
    assert!(
        proxies
            .iter()
            .all(|p| p["cert_signer"] == new && p["bundle_applied"] == true),
        "{after}"
    );
    // The old root's files are gone; the bundle file is the new root.
    let dir = mesh.data_dir().join("ca");
    assert!(!dir.join(format!("roots/{old}.pem")).exists());
    assert!(!dir.join(format!("roots/{old}.key")).exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("bundle.pem"))?
            .matches("BEGIN CERTIFICATE")
            .count(),
        1
    );
    Ok(())
}

/// The certificate section of a sidecar's /config_dump: (expires_at_unix, public key).
async fn cert_of(admin: std::net::SocketAddr) -> anyhow::Result<(i64, String)> {
    let d = admin_get(admin, "/config_dump").await?.json;
    let c = &d["certificate"];
    Ok((
        c["expires_at_unix"].as_i64().unwrap_or_default(),
        c["public_key"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Issue 29 finding 3: every renewal comes with a fresh key pair; revoking a bootstrap token,
/// or an identity, stops the renewals of the certificates descending from it, and its proxy
/// drops out of the mesh when its certificate expires (a connection lives no longer than the
/// certificate that opened it); a workload not revoked keeps renewing and calling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_and_identities_stop_renewing() -> anyhow::Result<()> {
    // 30 s certificates: a proxy renews at 70% ± 5% with its certificate (while more than
    // 5 s of it are left), so both the renewal and the refusal happen within the test.
    let mut mesh = Mesh::start_with(&["--cert-ttl-secs", "30"]).await?;
    mesh.workload("backend", "v1").await?;
    let web = mesh.client("web").await?;
    let batch = mesh.client("batch").await?;
    let ops = mesh.client("ops").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let clients = [(&web, "web"), (&batch, "batch"), (&ops, "ops")]
        .map(|(c, name)| (h1_client(c.outbound), c.admin, name));
    for (http, _, name) in &clients {
        assert_eq!(get(http, "http://backend/").await?.status, 200, "{name}");
    }

    // A renewal (at about 70% of 30 s) installs a certificate for a key pair of its own.
    let first = cert_of(web.admin).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(35);
    let renewed = loop {
        let now = cert_of(web.admin).await?;
        if now.0 != first.0 {
            break now;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!first.1.is_empty());
    assert_ne!(renewed.1, first.1, "a renewal reuses no key pair");

    // Revoke batch's bootstrap token and web's identity.
    let list: serde_json::Value =
        serde_json::from_str(&mesh.meshctl(&["-o", "json", "token", "list"]).await?)?;
    let batch_token = list["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["identity"] == "spiffe://mesh.local/ns/default/sa/batch")
        .and_then(|t| t["id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no token for batch: {list}"))?;
    mesh.meshctl(&["token", "revoke", &batch_token]).await?;
    let out = mesh.meshctl(&["identity", "revoke", "default/web"]).await?;
    assert!(out.contains("revoked"), "{out}");

    // Each keeps working until the certificate it holds expires, then is out; ops, not
    // revoked, is served all along, across its own connections' certificate-bound closes.
    let now_unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    let expiry = [cert_of(web.admin).await?.0, cert_of(batch.admin).await?.0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut out_at: [Option<i64>; 2] = [None, None];
    let mut served_after_revoke = [false, false];
    let (mut ops_ok, mut ops_failed) = (0, Vec::new());
    while out_at.iter().any(Option::is_none) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still served after their certificates expired ({expiry:?}, now {}): {out_at:?}",
            now_unix()
        );
        for i in 0..2 {
            if out_at[i].is_none() {
                match get(&clients[i].0, "http://backend/").await {
                    Ok(r) if r.status == 200 => served_after_revoke[i] = true,
                    other => {
                        let why = other.map_or_else(
                            |e| e.to_string(),
                            |r| format!("{} {:?}", r.status, r.headers.get("x-mesh-error")),
                        );
                        eprintln!(
                            "{} out at {} (certificate expiry {}): {why}",
                            clients[i].2,
                            now_unix(),
                            expiry[i]
                        );
                        out_at[i] = Some(now_unix());
                    }
                }
            }
        }
        match get(&clients[2].0, "http://backend/").await {
            Ok(r) if r.status == 200 => ops_ok += 1,
            other => ops_failed.push(other.map_or_else(
                |e| e.to_string(),
                |r| format!("{} {:?}", r.status, r.headers.get("x-mesh-error")),
            )),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ops_failed.is_empty(),
        "ops, not revoked, failed: {ops_failed:?} ({ops_ok} ok)"
    );
    for i in 0..2 {
        assert!(
            served_after_revoke[i],
            "{}: served until its certificate expires",
            clients[i].2
        );
        let at = out_at[i].unwrap_or_default();
        assert!(
            at >= expiry[i] - 1,
            "{} out at {at}, before its certificate expired at {}",
            clients[i].2,
            expiry[i]
        );
    }
    let log = mesh.cp_log();
    assert!(
        log.contains("renewal refused: identity spiffe://mesh.local/ns/default/sa/web was revoked"),
        "{log}"
    );
    assert!(
        log.contains(&format!("the bootstrap token {batch_token}")),
        "{log}"
    );
    // A token created after the revocation admits the identity again.
    let _again = mesh.client("web").await?;
    Ok(())
}

/// Issue 29 finding 4: a service's authorization rules reach its own proxies only; a caller's
/// proxy still gets everything it needs to call it (endpoints, identity, route, policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_rules_reach_only_the_services_own_proxies() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let b = mesh.workload("backend", "v1").await?;
    let web = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 1).await?;
    let http = h1_client(web.outbound);
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    mesh.meshctl(&[
        "authz",
        "set",
        "backend",
        "--rule",
        "allow name=web-only from=ns/default/sa/web",
    ])
    .await?;
    mesh.meshctl(&["policy", "set", "backend", "--timeout", "3s"])
        .await?;
    let backend_of = |d: &serde_json::Value| {
        d["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "backend")
            .cloned()
            .unwrap_or_default()
    };
    wait_config(b.admin, Duration::from_secs(10), |d| {
        backend_of(d)["authz"].to_string().contains("web-only")
    })
    .await?;
    wait_config(web.admin, Duration::from_secs(10), |d| {
        policy_in_dump(d, "backend").is_some_and(|p| p.contains("3s"))
    })
    .await?;
    let seen = backend_of(&admin_get(web.admin, "/config_dump").await?.json);
    assert!(
        seen["authz"].is_null(),
        "the caller's proxy got the rules: {seen}"
    );
    assert!(
        !seen["balancer"].as_array().is_none_or(|e| e.is_empty()),
        "the caller's proxy knows the endpoints: {seen}"
    );
    assert_eq!(get(&http, "http://backend/").await?.status, 200);
    Ok(())
}

/// What each admin RPC needs, written out here independently of the control plane's table so
/// that a change to either is caught.
const READ_RPCS: &[&str] = &[
    "ListServices",
    "ListEndpoints",
    "GetRoute",
    "ListRoutes",
    "RouteHistory",
    "GetPolicy",
    "GetAuthz",
    "CheckAuthz",
    "GetCanary",
    "Top",
    "Tap",
    "ListProxies",
    "GetVersion",
    "ListTokens",
    "GetCa",
    "ListExternals",
];
const WRITE_RPCS: &[&str] = &[
    "AddEndpoint",
    "RemoveEndpoint",
    "SetRoute",
    "RollbackRoute",
    "SetPolicy",
    "SetAuthz",
    "SetAuthzDefault",
    "SetMtlsMode",
    "SetAppProtocols",
    "StartCanary",
    "CanaryAction",
    "SetExternal",
    "RemoveExternal",
    "SetEgressMode",
];
const IDENTITY_RPCS: &[&str] = &["CreateToken", "RevokeToken", "RevokeIdentity", "RotateCa"];

/// Calls admin RPC `method` with an empty request and `credential`; the answer's code.
async fn raw_admin_call(
    channel: tonic::transport::Channel,
    credential: &str,
    method: &str,
) -> anyhow::Result<tonic::Code> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path: http::uri::PathAndQuery = format!("/mesh.v1.Admin/{method}").parse()?;
    let mut req = tonic::Request::new(());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse()?);
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let call = async {
        if method == "Tap" {
            grpc.server_streaming(req, path, codec).await.map(|_| ())
        } else {
            grpc.unary(req, path, codec).await.map(|_| ())
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow::anyhow!("{method}: no answer within 10 s"))?;
    Ok(match r {
        Ok(()) => tonic::Code::Ok,
        Err(s) => s.code(),
    })
}

/// Admin credentials carry scopes: each RPC is refused (PERMISSION_DENIED) to a credential
/// without its scope and let through to one with it, RPC by RPC; a credential grants no more
/// than it holds, `meshctl token list` shows scopes, and a revoked credential stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_credentials_have_scopes_enforced_rpc_by_rpc() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    mesh.workload("backend", "v1").await?;

    // Every RPC of the service is in exactly one list above.
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/mesh/v1/admin.proto"),
    )?;
    let service = proto
        .split("service Admin {")
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .unwrap_or_default();
    let mut rpcs: Vec<&str> = service
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .collect();
    rpcs.sort();
    let mut listed: Vec<&str> = [READ_RPCS, WRITE_RPCS, IDENTITY_RPCS].concat();
    listed.sort();
    assert_eq!(
        rpcs, listed,
        "admin.proto's RPCs and this test's lists differ"
    );

    let (read, read_id) = mesh.admin_credential("read", "dashboards").await?;
    let (write, _) = mesh.admin_credential("write", "ci-routes").await?;
    let (ident, _) = mesh.admin_credential("identity", "vm-bootstrap").await?;
    assert!(read.starts_with("meshadm1."), "{read}");

    let list = mesh.meshctl(&["token", "list"]).await?;
    for want in [
        read_id.as_str(),
        "admin",
        "read",
        "dashboards",
        "write",
        "ci-routes",
        "identity",
        "vm-bootstrap",
    ] {
        assert!(list.contains(want), "{want} not in:\n{list}");
    }
    assert!(!list.contains(&read), "a secret is listed:\n{list}");

    let channel = Endpoint::from_shared(format!("https://{}", mesh.admin_addr))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(mesh.ca_pem()?))
                .domain_name("mesh-control-plane"),
        )?
        .connect()
        .await?;
    let root = std::fs::read_to_string(mesh.data_dir().join("admin-token"))?;
    let bootstrap = mesh.token("web").await?;
    let denied = [tonic::Code::PermissionDenied, tonic::Code::Unauthenticated];
    let mut checked = 0;
    // `write` and `identity` include `read`.
    let (read_ident, read_write) = (
        [READ_RPCS, IDENTITY_RPCS].concat(),
        [READ_RPCS, WRITE_RPCS].concat(),
    );
    for (cred, allowed) in [
        (read.as_str(), READ_RPCS),
        (ident.as_str(), read_ident.as_slice()),
        (write.as_str(), read_write.as_slice()),
        (root.trim(), listed.as_slice()),
    ] {
        for rpc in &listed {
            let code = raw_admin_call(channel.clone(), cred, rpc).await?;
            if allowed.contains(rpc) {
                assert!(
                    !denied.contains(&code),
                    "{rpc} refused to its scope: {code:?}"
                );
            } else {
                assert_eq!(
                    code,
                    tonic::Code::PermissionDenied,
                    "{rpc} with a narrower scope"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * listed.len());
    // A bootstrap token, garbage and nothing are no admin credentials.
    for cred in [bootstrap.as_str(), "meshadm1.00", ""] {
        let code = raw_admin_call(channel.clone(), cred, "ListServices").await?;
        assert_eq!(code, tonic::Code::Unauthenticated, "{cred:?}");
    }

    // Through meshctl: reads work with a read credential, writes say which scope they need.
    let services = mesh.meshctl(&["--token", &read, "services"]).await?;
    assert!(services.contains("backend"), "{services}");
    let err = mesh
        .meshctl(&[
            "--token",
            &read,
            "route",
            "set",
            "backend",
            "--weights",
            "v1=100",
        ])
        .await
        .expect_err("a read credential wrote a route");
    assert!(
        err.to_string().contains("needs the \"write\" scope"),
        "{err}"
    );
    mesh.meshctl(&[
        "--token",
        &write,
        "route",
        "set",
        "backend",
        "--weights",
        "v1=100",
    ])
    .await?;
    // No credential grants more than it holds.
    let err = mesh
        .meshctl(&["--token", &ident, "token", "create", "--scope", "write"])
        .await
        .expect_err("an identity credential minted a write credential");
    assert!(err.to_string().contains("cannot grant"), "{err}");
    mesh.meshctl(&[
        "--token",
        &ident,
        "token",
        "create",
        "--identity",
        "default/batch",
    ])
    .await?;

    // Revoked: refused on the next call.
    let out = mesh.meshctl(&["token", "revoke", &read_id]).await?;
    assert!(
        out.contains("admin credential") && out.contains("revoked"),
        "{out}"
    );
    let code = raw_admin_call(channel.clone(), &read, "ListServices").await?;
    assert_eq!(code, tonic::Code::Unauthenticated);
    Ok(())
}

/// The dashboard bound beyond loopback asks for a read credential (HTTP Basic or Bearer);
/// `/metrics` and the probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_off_loopback_needs_a_read_credential() -> anyhow::Result<()> {
    use base64::Engine;
    let mut mesh = Mesh::start_with(&["--http-addr", "0.0.0.0:0"]).await?;
    let web = std::net::SocketAddr::from(([127, 0, 0, 1], mesh.http.port()));
    let (read, _) = mesh.admin_credential("read", "dashboard").await?;
    // A workload's bootstrap token is no admin credential.
    let bootstrap = mesh.token("web").await?;
    let client = h1_client(web);
    let fetch = |path: &'static str, auth: Option<String>| {
        let client = client.clone();
        async move {
            let mut req = http::Request::get(format!("http://{web}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = client
                .request(req.body(http_body_util::Full::new(bytes::Bytes::new()))?)
                .await?;
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            anyhow::Ok((resp.status().as_u16(), challenge))
        }
    };
    let basic = |pw: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("me:{pw}"))
        )
    };
    for path in ["/", "/api/dashboard"] {
        let (status, challenge) = fetch(path, None).await?;
        assert_eq!(status, 401, "{path}");
        assert!(challenge.is_some_and(|c| c.starts_with("Basic")), "{path}");
        assert_eq!(fetch(path, Some(basic("wrong"))).await?.0, 401, "{path}");
        assert_eq!(
            fetch(path, Some(basic(&bootstrap))).await?.0,
            401,
            "{path}: a bootstrap token"
        );
        assert_eq!(fetch(path, Some(basic(&read))).await?.0, 200, "{path}");
        assert_eq!(
            fetch(path, Some(format!("Bearer {read}"))).await?.0,
            200,
            "{path}"
        );
    }
    for path in ["/metrics", "/live", "/ready"] {
        assert_eq!(fetch(path, None).await?.0, 200, "{path}");
    }
    // On loopback (every other test's setup) the dashboard stays open.
    let local = Mesh::start().await?;
    assert_eq!(admin_get(local.http, "/api/dashboard").await?.status, 200);
    Ok(())
}
