//! The mesh's gRPC API, package `mesh.v1`: generated code only, no logic.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the mesh API.
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

/// The codec of the `mesh.v1` services.
pub mod codec {
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Each gRPC stream's encode and decode buffer starts at this size (tonic's default is
    /// 8 KiB) and grows for a larger message. The control plane holds a discovery and a
    /// telemetry stream open per proxy, whose messages are mostly far smaller: with tonic's
    /// default the four buffers were about half of what a connected proxy costs it.
    pub const BUFFER_BYTES: usize = 1024;
    /// Bytes encoded before a stream yields to others (tonic's default).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// Prost encoding, as `tonic_prost::ProstCodec`, with [`BUFFER_BYTES`] buffers.
    pub struct SmallBuffers<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for SmallBuffers<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    impl<T, U> Codec for SmallBuffers<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }
    }
}

/// The example echo service used by the demo and the end-to-end tests.
pub mod example {
    tonic::include_proto!("mesh.example.v1");
}

/// Discovery resource names, part of the API: `service/<name>` for a service, `service/*` to
/// subscribe to every service, and the trust bundle.
pub mod resources {
    pub const SERVICE_PREFIX: &str = "service/";
    pub const ALL_SERVICES: &str = "service/*";
    pub const TRUST_RESOURCE: &str = "trust/bundle";
    /// The egress mode of the subscribing proxy's namespace.
    pub const EGRESS_RESOURCE: &str = "egress/mode";
}

/// The admin API's request metadata naming the namespace of bare service names (meshctl's
/// `-n`); absent: `default`.
pub const NAMESPACE_HEADER: &str = "x-mesh-namespace";

/// The DNS name in the control plane's certificate that proxies and meshctl verify, whatever
/// address they dial.
pub const CONTROL_PLANE_SERVER_NAME: &str = "mesh-control-plane";

/// Upper bounds (ms) of the latency buckets in `BackendStats.latency_buckets`; one more bucket
/// holds everything slower. Part of the API: proxies and the control plane must agree.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// Every gRPC status name, by code (0 to 16), as policies spell them.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// gRPC statuses that count as the server's failure when a policy names none: UNKNOWN,
/// DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS. The rest are the application's
/// answers (NOT_FOUND, INVALID_ARGUMENT, …).
pub const DEFAULT_GRPC_FAILURES: [u16; 5] = [2, 4, 13, 14, 15];

/// The code of a gRPC status as a policy names it: a name of [`GRPC_STATUS_NAMES`] or a
/// number from 1 to 16 (OK is never a failure).
pub fn grpc_code(name: &str) -> Option<u16> {
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    let code = match n.parse::<u16>() {
        Ok(c) => c,
        Err(_) => GRPC_STATUS_NAMES.iter().position(|s| *s == n)? as u16,
    };
    (1..=16).contains(&code).then_some(code)
}

/// gRPC status names a retry policy may list in `Retry.retry_on`, with their codes. Part of the
/// API: the control plane validates against it and proxies apply it.
pub const RETRY_GRPC_CODES: &[(&str, u8)] = &[
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];
