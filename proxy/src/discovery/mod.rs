//! Discovery: the config stream from the control plane into `Snapshots`.

pub mod client;
pub mod convert;
pub mod convert_route;

pub use client::DiscoveryClient;

/// Resource name prefix for services.
pub const SERVICE_PREFIX: &str = "service/";
/// Every service (a transparent proxy needs them all).
pub const ALL_SERVICES: &str = "service/*";
/// The trust bundle's resource name; every proxy subscribes to it.
pub const TRUST_RESOURCE: &str = "trust/bundle";
