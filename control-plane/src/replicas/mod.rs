//! Several replicas on a shared store: leadership for singleton work, endpoint leases, and
//! one view of the mesh whichever replica is asked.

pub mod leader;
pub mod lease;
pub mod peers;
pub mod view;
