//! Discovery: the config stream from the control plane into `Snapshots`.

pub mod client;
pub mod convert;
pub mod convert_route;

pub use client::DiscoveryClient;

/// Resource name prefix for services.
pub const SERVICE_PREFIX: &str = "service/";
