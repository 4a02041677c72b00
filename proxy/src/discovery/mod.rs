//! Discovery: the config stream from the control plane into `Snapshots`.

pub mod client;
pub mod convert;

pub use client::DiscoveryClient;

pub use mesh_proto::resources::{ALL_SERVICES, EGRESS_RESOURCE, SERVICE_PREFIX, TRUST_RESOURCE};
