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

/// Upper bounds (ms) of the latency buckets in `BackendStats.latency_buckets`; one more bucket
/// holds everything slower. Part of the API: proxies and the control plane must agree.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// gRPC status names a retry policy may list in `Retry.retry_on`, with their codes. Part of the
/// API: the control plane validates against it and proxies apply it.
pub const RETRY_GRPC_CODES: &[(&str, u8)] = &[
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];
