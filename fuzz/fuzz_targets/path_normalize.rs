//! The request-path normaliser authorization decides on (`mesh_authz::path`), then the
//! authorization matcher on what it returns: the first line is rules separated by `;`, the
//! rest the path. A normal form is a fixed point, starts with `/` and has no empty, `.` or
//! `..` segment; a path the rules deny keeps being denied however it is respelled.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (rules, path) = text.split_once('\n').unwrap_or(("", &text));
    for strict in [false, true] {
        let Ok(n) = mesh_authz::path::normalize(path, strict) else {
            continue;
        };
        if &*n == "*" {
            continue;
        }
        assert!(n.starts_with('/'), "{path:?} -> {n:?}");
        let again = mesh_authz::path::normalize(&n, strict).expect("a normal form normalises");
        assert_eq!(again, n, "not a fixed point: {path:?}");
        let inner = n.trim_end_matches('/');
        for seg in inner.split('/').skip(1) {
            assert!(!seg.is_empty() && seg != "." && seg != "..", "{path:?} -> {n:?}");
        }
    }
    let rules: Vec<_> = rules
        .split(';')
        .enumerate()
        .filter_map(|(i, r)| mesh_authz::parse_rule(r, i).ok())
        .collect();
    let a = mesh_proto::v1::Authz {
        name: "p".into(),
        rules,
        default_action: "allow-all".into(),
        trust_domain: "mesh.local".into(),
        ..Default::default()
    };
    // `*` (OPTIONS' asterisk form) names no path: there is nothing to respell.
    if let Ok(authz) = mesh_authz::Authz::try_from(&a)
        && let Ok(n) = mesh_authz::path::normalize(path, authz.matches_paths())
        && &*n != "*"
    {
        let d = authz.decide(None, "GET", &n);
        // Respelling the normal form with a duplicate slash and a dot segment decides alike.
        let respelled = format!("/.{n}").replace("/", "//");
        if let Ok(r) = mesh_authz::path::normalize(&respelled, authz.matches_paths()) {
            assert_eq!(authz.decide(None, "GET", &r).allowed, d.allowed, "{path:?}");
        }
    }
});
