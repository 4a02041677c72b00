//! Observability: the proxies' reported telemetry (top, canary gates), tap relay, and the
//! control plane's own metrics and traces.

pub mod metrics;
pub mod tap;
pub mod telemetry;
pub mod trace;
