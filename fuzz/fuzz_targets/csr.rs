//! CSRs as the CA receives them: any text in the PEM field must be refused with an error
//! (or signed, if it really is a CSR for the allowed identity), never crash the CA.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_control_plane::ca::issuer::CertificateAuthority;
use mesh_control_plane::ca::spiffe::SpiffeId;
use std::sync::LazyLock;

static CA: LazyLock<(CertificateAuthority, SpiffeId, tempfile::TempDir)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_generate(
        dir.path(),
        "mesh.local",
        std::time::Duration::from_secs(3600),
    )
    .expect("CA");
    let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/web").expect("id");
    (ca, id, dir)
});

fuzz_target!(|data: &[u8]| {
    let (ca, id, _) = &*CA;
    let _ = ca.sign_csr(&String::from_utf8_lossy(data), id);
});
