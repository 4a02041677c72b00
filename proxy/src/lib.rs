//! mesh-proxy: the sidecar. Outbound: routes the app's plaintext HTTP by service, balances over
//! endpoints and originates mTLS (HTTP/2) to the destination's sidecar. Inbound: terminates mTLS
//! from peers and forwards to the local app in the protocol the caller's app spoke.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod bootstrap;
pub mod config_file;
pub mod discovery;
pub mod health;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod outbound;
pub mod policy;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
