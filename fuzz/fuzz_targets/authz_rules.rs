//! Authorization rules as `meshctl authz set --rule` and the admin API take them, then a
//! decision on a fuzzed caller and path: lines are rules; the last line is `caller path`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.pop().unwrap_or("");
    let rules: Vec<_> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| mesh_authz::parse_rule(l, i).ok())
        .collect();
    let a = mesh_proto::v1::Authz {
        name: "p".into(),
        rules,
        default_action: "allow-mesh-only".into(),
        trust_domain: "mesh.local".into(),
        ..Default::default()
    };
    if let Ok(authz) = mesh_authz::Authz::try_from(&a) {
        let (caller, path) = last.split_once(' ').unwrap_or((last, "/"));
        let caller = mesh_authz::caller_id(caller, "mesh.local").ok().flatten();
        let d = authz.decide(caller.as_deref(), "GET", path);
        let _ = d.by.to_string();
    }
});
