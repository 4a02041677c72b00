//! The mesh control plane: stores services, endpoints and routes, pushes them to proxies over
//! the discovery stream, signs workload certificates, and serves the admin API meshctl uses.
//!
//! Rooms by concern: `state` (the registry, its stored records and the stores behind it),
//! `discovery` (the push to proxies), `ca` (certificates, tokens, the control plane's own TLS),
//! `api` (the admin gRPC API, the HTTP port and dashboard), `k8s` (Kubernetes endpoints,
//! Services and injection webhook), `replicas` (leadership and endpoint leases across
//! replicas), `observe` (proxies' telemetry, tap, the control plane's metrics and traces),
//! `rollout` (the canary controller), and `server`, which wires them together.
#![forbid(unsafe_code)]

pub mod api;
pub mod ca;
pub mod discovery;
pub mod k8s;
pub mod observe;
pub mod replicas;
pub mod rollout;
pub mod server;
pub mod state;
