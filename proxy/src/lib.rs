//! mesh-proxy: the sidecar. Outbound: routes the app's plaintext HTTP by service, balances over
//! endpoints and originates mTLS (HTTP/2) to the destination's sidecar. Inbound: terminates mTLS
//! from peers and forwards to the local app in the protocol the caller's app spoke.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod app_probe;
pub mod balance;
pub mod bootstrap;
pub mod config_file;
pub mod discovery;
pub mod gateway;
pub mod health;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod lifecycle;
pub mod outbound;
pub mod policy;
pub mod snapshot;
pub mod telemetry;
pub mod tls;

/// A map looked up on every request (the service by name, the pooled connection by endpoint):
/// foldhash, seeded per process, costs a fraction of the default SipHash per lookup.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The concurrent form of [`FastMap`].
pub type FastDashMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
