//! What the control plane knows: the registry (one immutable state per revision, the only
//! writer of the store), the records it stores, and the stores (file, etcd, Kubernetes).

pub mod backends;
pub mod keys;
pub mod records;
pub mod registry;
pub mod store;
