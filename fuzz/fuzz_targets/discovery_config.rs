//! Discovery config as a proxy receives it: any bytes the control plane (or anyone on the
//! stream) could send, decoded and converted; conversion must refuse, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = mesh_proto::v1::ServiceConfig::decode(data) {
        let _ = mesh_proxy::snapshot::Service::try_from(c);
    }
});
