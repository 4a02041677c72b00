//! Discovery config as a proxy receives it: any bytes the control plane (or anyone on the
//! stream) could send, decoded and converted; conversion must refuse, never panic, and a config
//! it accepts must build its runtime (balancers, policy states, stacks) without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::{Arc, LazyLock};

/// A trust root for the pool's TLS context (a throwaway self-signed certificate; the pool never
/// connects here).
const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBejCCASGgAwIBAgIUNF0Wyf7mcYY59SjH0yuLhVRc0xwwCgYIKoZIzj0EAwIw\nEjEQMA4GA1UEAwwHZnV6ei1jYTAgFw0yNjEyMDYxOTQ5MzFaGA8yMTI2MTExMjE5\nNDkzMVowEjEQMA4GA1UEAwwHZnV6ei1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH\nA0IABP9Zt3qzRNP9TtYK2pK4LfdbsERElrnkAdeyeM36NECDynO2mwAalAIlDrby\nc0WZ0olcMzbwDQ2oVNWLk0olDxCjUzBRMB0GA1UdDgQWBBReW0UKL+iYC8jOixA2\nawNUCaDL4zAfBgNVHSMEGDAWgBReW0UKL+iYC8jOixA2awNUCaDL4zAPBgNVHRMB\nAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIAM8alE7IvfLZXN3wukg6lNp6BkP\nGOykeApGhL80DxLWAiBVIzN9EObSwnawzFsECF7gnHNPF2fERiUVrBdE5xFIEg==\n-----END CERTIFICATE-----";

static POOL: LazyLock<Arc<mesh_proxy::outbound::pool::Pool>> = LazyLock::new(|| {
    let tls = mesh_proxy::tls::TlsContext::new(CA).expect("the fixed CA parses");
    Arc::new(mesh_proxy::outbound::pool::Pool::new(Arc::new(tls)))
});

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = mesh_proto::v1::ServiceConfig::decode(data)
        && let Ok(cfg) = mesh_proxy::snapshot::ServiceConfig::try_from(c)
    {
        let first = mesh_proxy::snapshot::Service::build(cfg, 1, None, &POOL);
        // A second push of the same config carries the first's state over.
        if let Ok(again) = mesh_proxy::snapshot::ServiceConfig::try_from(
            mesh_proto::v1::ServiceConfig::decode(data).expect("decoded once already"),
        ) {
            let _ = mesh_proxy::snapshot::Service::build(again, 2, Some(&first), &POOL);
        }
    }
});
