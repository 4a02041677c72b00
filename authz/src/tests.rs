use super::*;

const TD: &str = "mesh.local";

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

fn policy(rules: &[&str], default: &str) -> Authz {
    let a = pb::Authz {
        name: "backend-authz".into(),
        rules: rules
            .iter()
            .enumerate()
            .map(|(i, s)| parse_rule(s, i).expect("rule"))
            .collect(),
        audit: false,
        default_action: default.into(),
        trust_domain: TD.into(),
    };
    Authz::try_from(&a).expect("valid")
}

#[test]
fn decisions_table() {
    let p = policy(
        &[
            "deny name=no-admin paths=/admin/*",
            "allow name=web-reads from=ns/default/sa/web methods=GET,HEAD",
            "allow name=ops from=ns/ops/* paths=/metrics,/debug/*",
            "allow name=anyone-health paths=/health",
            "allow name=partner from=spiffe://other.org/ns/x/sa/y",
        ],
        "deny-all",
    );
    let web = id("default", "web");
    let ops = id("ops", "tool");
    let foreign_ops = "spiffe://evil.org/ns/ops/sa/tool".to_string();
    let partner = "spiffe://other.org/ns/x/sa/y".to_string();
    // (caller, method, path) → (allowed, decided by)
    let table: &[(Option<&str>, &str, &str, bool, &str)] = &[
        (Some(&web), "GET", "/items", true, "backend-authz/web-reads"),
        (
            Some(&web),
            "HEAD",
            "/items",
            true,
            "backend-authz/web-reads",
        ),
        (
            Some(&web),
            "POST",
            "/items",
            false,
            "namespace default deny-all",
        ),
        (
            Some(&web),
            "GET",
            "/admin/users",
            false,
            "backend-authz/no-admin",
        ),
        (
            Some(&ops),
            "POST",
            "/debug/pprof",
            true,
            "backend-authz/ops",
        ),
        (Some(&ops), "GET", "/metrics", true, "backend-authz/ops"),
        (
            Some(&ops),
            "GET",
            "/metricsx",
            false,
            "namespace default deny-all",
        ),
        (
            Some(&foreign_ops),
            "GET",
            "/metrics",
            false,
            "namespace default deny-all",
        ),
        (None, "GET", "/health", true, "backend-authz/anyone-health"),
        (None, "GET", "/items", false, "namespace default deny-all"),
        (
            Some(&partner),
            "DELETE",
            "/x",
            true,
            "backend-authz/partner",
        ),
        (
            Some("not-a-spiffe-id"),
            "GET",
            "/items",
            false,
            "namespace default deny-all",
        ),
    ];
    for (caller, method, path, allowed, by) in table {
        let d = p.decide(*caller, method, path);
        assert_eq!(
            (d.allowed, d.by.to_string().as_str()),
            (*allowed, *by),
            "{caller:?} {method} {path}"
        );
    }
}

#[test]
fn namespace_defaults() {
    let web = id("default", "web");
    let other_td = "spiffe://other.org/ns/default/sa/web";
    for (default, caller, allowed) in [
        ("allow-all", None, true),
        ("allow-all", Some(web.as_str()), true),
        ("deny-all", Some(web.as_str()), false),
        ("allow-mesh-only", Some(web.as_str()), true),
        ("allow-mesh-only", Some(other_td), false),
        ("allow-mesh-only", None, false),
    ] {
        let p = policy(&[], default);
        let d = p.decide(caller, "GET", "/");
        assert_eq!(d.allowed, allowed, "{default} {caller:?}");
        assert_eq!(d.by.to_string(), format!("namespace default {default}"));
    }
    assert!(policy(&[], "allow-all").allows_everything());
    assert!(!policy(&[], "deny-all").allows_everything());
    assert!(!policy(&["deny paths=/x"], "allow-all").allows_everything());
}

#[test]
fn bad_rules_are_refused_with_the_reason() {
    for (spec, want) in [
        ("permit from=*", "start with allow or deny"),
        ("allow who=x", "unknown key"),
        ("allow from", "not key=value"),
    ] {
        let e = parse_rule(spec, 0).expect_err(spec);
        assert!(e.to_string().contains(want), "{spec}: {e}");
    }
    let with = |r: pb::AuthzRule, default: &str| {
        Authz::try_from(&pb::Authz {
            name: "p".into(),
            rules: vec![r],
            default_action: default.into(),
            ..Default::default()
        })
    };
    for (spec, want) in [
        ("allow from=default", "use ns/<ns>/sa/<sa>"),
        ("allow from=ns/a b/*", "is not key=value"),
        ("allow methods=get", "upper case"),
        ("allow paths=api", "must start with /"),
    ] {
        let e = parse_rule(spec, 0)
            .and_then(|r| with(r, ""))
            .expect_err(spec);
        assert!(e.to_string().contains(want), "{spec}: {e}");
    }
    let ok = parse_rule("allow", 0).expect("rule");
    assert!(with(ok.clone(), "allow-some").is_err());
    let twice = pb::Authz {
        name: "p".into(),
        rules: vec![ok.clone(), ok],
        ..Default::default()
    };
    assert!(Authz::try_from(&twice).is_err_and(|e| e.to_string().contains("twice")));
}

#[test]
fn callers_for_check() {
    assert_eq!(caller_id("default/web", TD), Ok(Some(id("default", "web"))));
    assert_eq!(
        caller_id("ns/default/sa/web", TD),
        Ok(Some(id("default", "web")))
    );
    assert_eq!(caller_id("", TD), Ok(None));
    assert!(caller_id("web", TD).is_err());
}
