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

pub use issuer::{CaError, CertificateAuthority};
