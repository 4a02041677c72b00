//! Mesh certificates a test obtains itself, as a workload would (CSR and bootstrap token).

use crate::*;

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
