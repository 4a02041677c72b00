//! One model of routes and resilience policies for every part of the mesh. The control plane
//! admits a route or policy by building it here, meshctl checks what it is about to send the
//! same way, and the proxy converts a push with the same code; so a value one side accepts the
//! other cannot refuse, and each refusal reads the same everywhere. `mesh-authz` is the same
//! idea for authorization rules.

pub mod backends;
pub mod policy;
pub mod protocol;
pub mod route;
pub mod service;

pub use policy::{Policy, PolicyError};
pub use protocol::{AppProtocol, AppProtocols};
pub use route::{Route, RouteError};
