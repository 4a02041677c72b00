//! Bootstrap tokens (the Certify credential) and W3C `traceparent` headers: both arrive from
//! the network as text and are parsed before anything else looks at them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(t) = mesh_control_plane::ca::tokens::parse(&s) {
        assert_eq!(t.len(), 70);
    }
    if let Some(c) = mesh_otel::TraceContext::parse(&s) {
        assert_eq!(mesh_otel::TraceContext::parse(&c.header()), Some(c));
    }
});
