//! The mesh control plane: stores services, endpoints and routes, pushes them to proxies over
//! the discovery stream, signs workload certificates, and serves the admin API meshctl uses.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod cli;
pub mod dashboard;
pub mod discovery;
pub mod inject;
pub mod kube_objects;
pub mod kubernetes;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod process;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod spiffe;
pub mod store;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod trace;
pub mod web;
