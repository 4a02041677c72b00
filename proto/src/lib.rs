//! The mesh's gRPC API, package `mesh.v1`: generated code only, no logic.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the mesh API.
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

/// The example echo service used by the demo and the end-to-end tests.
pub mod example {
    tonic::include_proto!("mesh.example.v1");
}
