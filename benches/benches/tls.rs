//! The mTLS handshake between two sidecars, in memory, with the proxy's own TLS configs (TLS 1.3,
//! ECDSA P-256 leaves from one mesh root, client certificate required, SPIFFE id checked): a full
//! handshake, and one resumed from a session ticket of an earlier handshake.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_proxy::tls::TlsContext;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::HandshakeKind;
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;
use std::sync::Arc;

const TRUST_DOMAIN: &str = "mesh.local";

/// A sidecar's TLS context with a certificate for `sa` signed by `root`.
fn sidecar(root: &Issuer<'_, KeyPair>, bundle_pem: &str, sa: &str) -> TlsContext {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
            .try_into()
            .expect("uri"),
    )];
    let cert = p.signed_by(&key, root).expect("leaf");
    let ctx = TlsContext::new(bundle_pem).expect("bundle");
    ctx.install(
        &cert.pem(),
        &key.serialize_pem(),
        i64::MAX,
        bundle_pem,
        "root",
    )
    .expect("install");
    ctx
}

/// Moves every pending TLS record from one side to the other; false when nothing was pending.
fn pump(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("write_tls");
    }
    let moved = !buf.is_empty();
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("handshake");
    }
    moved
}

/// One handshake to completion, including the session tickets the server sends after it.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    buf: &mut Vec<u8>,
) -> Option<HandshakeKind> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c: Connection = ClientConnection::new(client.clone(), name)
        .expect("client")
        .into();
    let mut s: Connection = ServerConnection::new(server.clone())
        .expect("server")
        .into();
    for _ in 0..8 {
        let a = pump(&mut c, &mut s, buf);
        let b = pump(&mut s, &mut c, buf);
        if !a && !b {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake done");
    c.handshake_kind()
}

fn tls(c: &mut Criterion) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("root key");
    let mut rp = CertificateParams::default();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_pem = rp.self_signed(&root_key).expect("root").pem();
    let root = Issuer::from_params(&rp, root_key);
    let (web, backend) = (
        sidecar(&root, &root_pem, "web"),
        sidecar(&root, &root_pem, "backend"),
    );
    let server = backend.server_config().expect("server config");
    let expected: Arc<str> = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/backend").into();
    let resuming = web.client_config(&expected).expect("client config");
    let mut full = (*resuming).clone();
    full.resumption = Resumption::disabled();
    let full = Arc::new(full);
    let mut buf = Vec::with_capacity(16 * 1024);
    assert_eq!(
        handshake(&full, &server, &mut buf),
        Some(HandshakeKind::Full)
    );
    handshake(&resuming, &server, &mut buf);
    assert_eq!(
        handshake(&resuming, &server, &mut buf),
        Some(HandshakeKind::Resumed),
        "the second handshake resumes"
    );
    c.bench_function("tls13_mtls_handshake_full", |b| {
        b.iter(|| handshake(&full, &server, &mut buf))
    });
    c.bench_function("tls13_mtls_handshake_resumed", |b| {
        b.iter(|| handshake(&resuming, &server, &mut buf))
    });
}

criterion_group!(benches, tls);
criterion_main!(benches);
