use super::*;

fn rule(name: &str, m: Match) -> Rule {
    Rule {
        name: name.into(),
        matches: vec![m],
        backends: Vec::new(),
        set_request: Vec::new(),
        remove_request: Vec::new(),
        set_response: Vec::new(),
        remove_response: Vec::new(),
        redirect: None,
        mirror: None,
        policy: None,
    }
}

fn prefix(p: &str) -> Match {
    Match {
        path: Some(PathMatch::Prefix(p.into())),
        ..Default::default()
    }
}

fn header(name: &str, v: Option<&str>) -> KeyMatch {
    KeyMatch {
        name: name.into(),
        value: v.map(|v| ValueMatch::Exact(v.into())),
    }
}

fn router() -> Router {
    Router::new(vec![
        rule("short-prefix", prefix("/api")),
        rule("long-prefix", prefix("/api/v2")),
        rule(
            "exact",
            Match {
                path: Some(PathMatch::Exact("/api/v2/health".into())),
                ..Default::default()
            },
        ),
        rule(
            "regex",
            Match {
                path: Some(PathMatch::Regex(whole("/items/[0-9]+").unwrap())),
                ..Default::default()
            },
        ),
        rule(
            "canary-header",
            Match {
                headers: vec![header("x-canary", Some("true"))],
                ..Default::default()
            },
        ),
        rule(
            "post-orders",
            Match {
                path: Some(PathMatch::Prefix("/orders".into())),
                method: Some(Method::POST),
                ..Default::default()
            },
        ),
        rule(
            "debug-query",
            Match {
                path: Some(PathMatch::Prefix("/orders".into())),
                query: vec![KeyMatch {
                    name: "debug".into(),
                    value: None,
                }],
                ..Default::default()
            },
        ),
    ])
}

/// (method, uri, headers, the rule it should take)
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    Option<&'static str>,
);

#[test]
fn precedence_table() {
    let r = router();
    let cases: &[Case] = &[
        // (method, uri, headers, rule)
        ("GET", "/api/x", &[], Some("short-prefix")),
        ("GET", "/api", &[], Some("short-prefix")),
        ("GET", "/apix", &[], None),
        ("GET", "/api/v2/x", &[], Some("long-prefix")),
        ("GET", "/api/v2/health", &[], Some("exact")),
        // A header match beats any path match.
        (
            "GET",
            "/api/v2/health",
            &[("x-canary", "true")],
            Some("canary-header"),
        ),
        (
            "GET",
            "/api/v2/x",
            &[("x-canary", "false")],
            Some("long-prefix"),
        ),
        // A prefix beats a regex.
        ("GET", "/items/42", &[], Some("regex")),
        ("GET", "/items/abc", &[], None),
        ("POST", "/orders/1", &[], Some("post-orders")),
        ("GET", "/orders/1", &[], None),
        ("GET", "/orders/1?debug", &[], Some("debug-query")),
        ("GET", "/orders/1?x=1&debug=yes", &[], Some("debug-query")),
        // Method beats query at the same path.
        ("POST", "/orders/1?debug", &[], Some("post-orders")),
        ("GET", "/", &[], None),
    ];
    for (method, uri, headers, want) in cases {
        let mut h = HeaderMap::new();
        for (n, v) in *headers {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let uri: http::Uri = uri.parse().unwrap();
        let got = r
            .route(&method.parse().unwrap(), &uri, &h)
            .map(|i| &*r.rules[i].name);
        assert_eq!(got, *want, "{method} {uri} {headers:?}");
    }
}

#[test]
fn list_order_breaks_ties_and_regexes_match_whole_values() {
    let r = Router::new(vec![
        rule("first", prefix("/a")),
        rule("second", prefix("/a")),
    ]);
    let uri: http::Uri = "/a/b".parse().unwrap();
    assert_eq!(r.route(&Method::GET, &uri, &HeaderMap::new()), Some(0));
    let re = whole("v[0-9]").unwrap();
    assert!(re.is_match("v1"));
    assert!(!re.is_match("xv1"));
    assert!(
        Router::default()
            .route(&Method::GET, &uri, &HeaderMap::new())
            .is_none()
    );
}
