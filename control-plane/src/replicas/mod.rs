//! Several replicas on a shared store: leadership for singleton work and endpoint leases.

pub mod leader;
pub mod lease;
