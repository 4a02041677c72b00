//! The certificate authority: a root (generated on first start and rotatable, or given by the
//! operator) that signs workload CSRs into short-lived SPIFFE certificates, and the Identity
//! gRPC service.

pub mod grant;
pub mod issuer;
pub mod roots;
pub mod rotation;
pub mod service;
pub mod spiffe;
pub mod tls;
pub mod tokens;

pub use issuer::CertificateAuthority;

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR asks for {requested}, but the credential is for {allowed}")]
    IdentityMismatch { requested: String, allowed: String },
    #[error("CSR must name exactly one SPIFFE identity as a URI SAN, found {0}")]
    BadSans(String),
    #[error("CA files: {0}")]
    Files(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("root rotation: {0}")]
    Rotation(String),
}
