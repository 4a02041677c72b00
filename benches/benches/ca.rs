//! The certificate authority's work per CSR, on one core: parse the PEM, check the CSR's
//! signature (proof of possession) and its single SPIFFE SAN, and sign a leaf with the mesh
//! root (ECDSA P-256). The end-to-end rate over gRPC and mTLS is `cp-bench`'s.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_control_plane::ca::CertificateAuthority;
use mesh_control_plane::ca::spiffe::SpiffeId;
use rcgen::{CertificateParams, KeyPair, SanType};
use std::hint::black_box;
use std::time::Duration;

fn sign_csr(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca =
        CertificateAuthority::load_or_generate(dir.path(), "mesh.local", Duration::from_secs(3600))
            .expect("CA");
    let id = SpiffeId::new("mesh.local", "default", "web").expect("id");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
    let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
    assert!(ca.sign_csr(&csr, &id).is_ok(), "the fixture CSR is signed");
    c.bench_function("ca_sign_csr", |b| {
        b.iter(|| black_box(ca.sign_csr(black_box(&csr), &id).is_ok()))
    });
}

criterion_group!(benches, sign_csr);
criterion_main!(benches);
