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
        Router::<Rule>::default()
            .route(&Method::GET, &uri, &HeaderMap::new())
            .is_none()
    );
}

fn pb_rule(name: &str) -> pb::RouteRule {
    pb::RouteRule {
        name: name.into(),
        matches: vec![pb::RouteMatch {
            path: Some(pb::route_match::Path::Prefix("/api".into())),
            ..Default::default()
        }],
        backends: vec![pb::WeightedBackend {
            version: "v2".into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn a_route_is_checked_once_whoever_builds_it() {
    let ok = pb::Route {
        backends: vec![pb::WeightedBackend {
            version: "v1".into(),
            weight: 1,
            ..Default::default()
        }],
        rules: vec![pb_rule("api")],
        mirror: None,
    };
    let r = Route::try_from(&ok).unwrap();
    assert_eq!(r.rules.len(), 1);
    assert!(r.check_versions("svc", &["v1".into(), "v2".into()]).is_ok());
    let e = r.check_versions("svc", &["v1".into()]).unwrap_err();
    assert!(e.0.contains("unknown version \"v2\""), "{e}");

    let refused = |f: &dyn Fn(&mut pb::Route), want: &str| {
        let mut r = ok.clone();
        f(&mut r);
        let e = Route::try_from(&r).unwrap_err();
        assert!(e.0.contains(want), "{want}: {e}");
    };
    refused(
        &|r| r.rules[0].name = "bad_name".into(),
        "letters, digits and '-'",
    );
    refused(&|r| r.rules.push(pb_rule("api")), "name used twice");
    refused(&|r| r.rules[0].matches.clear(), "needs at least one match");
    refused(
        &|r| r.rules[0].matches = vec![pb::RouteMatch::default()],
        "a match with no condition",
    );
    refused(
        &|r| {
            let b = r.rules[0].backends[0].clone();
            r.rules[0].backends.push(b)
        },
        "listed twice",
    );
    refused(&|r| r.backends[0].weight = 0, "weights sum to 0");
    refused(
        &|r| r.rules[0].matches[0].method = "get".into(),
        "must be upper case",
    );
    refused(
        &|r| {
            r.rules[0].matches[0].headers = vec![pb::KeyMatch {
                name: "bad header".into(),
                value: None,
            }]
        },
        "is not a header name",
    );
    refused(
        &|r| r.rules[0].matches[0].path = Some(pb::route_match::Path::Regex("(".into())),
        "invalid regex",
    );
    refused(
        &|r| {
            r.rules[0].policy = Some(pb::Policy {
                retry: Some(pb::Retry {
                    max_retries: 11,
                    ..Default::default()
                }),
                ..Default::default()
            })
        },
        "policy retry.max_retries",
    );
}

#[test]
fn hosts_match_exactly_or_by_wildcard_and_rank_before_paths() {
    let host = |h: &[&str], p: Option<&str>| Match {
        hosts: h.iter().map(|h| HostMatch::parse(h).unwrap()).collect(),
        path: p.map(|p| PathMatch::Prefix(p.into())),
        ..Default::default()
    };
    let r = Router::new(vec![
        rule("any-api", prefix("/api")),
        rule("wild", host(&["*.example.com"], None)),
        rule("shop", host(&["shop.example.com"], None)),
        rule("shop-api", host(&["shop.example.com"], Some("/api"))),
    ]);
    assert!(r.by_host());
    type HostCase<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: &[HostCase] = &[
        ("http://shop.example.com/api/x", &[], Some("shop-api")),
        ("http://SHOP.example.com:8443/", &[], Some("shop")),
        ("/", &[("host", "shop.example.com:443")], Some("shop")),
        ("/api", &[("host", "a.b.example.com")], Some("wild")),
        // A wildcard needs at least one label before the suffix.
        ("http://example.com/api", &[], Some("any-api")),
        ("http://other.org/", &[], None),
        ("/", &[], None),
    ];
    for (uri, headers, want) in cases {
        let mut h = HeaderMap::new();
        for (n, v) in *headers {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let uri: http::Uri = uri.parse().unwrap();
        let got = r.route(&Method::GET, &uri, &h).map(|i| &*r.rules[i].name);
        assert_eq!(got, *want, "{uri} {headers:?}");
    }
    for bad in ["", "*", "a..b", "-a.com", "10.0.0.1", "a.*.com", "host:80"] {
        assert!(HostMatch::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        HostMatch::parse("*.Example.com").unwrap().to_string(),
        "*.example.com"
    );
    // A host alone is a condition.
    let mut p = pb_rule("by-host");
    p.matches = vec![pb::RouteMatch {
        hosts: vec!["shop.example.com".into()],
        ..Default::default()
    }];
    let route = |p: pb::RouteRule| {
        Route::try_from(&pb::Route {
            rules: vec![p],
            ..Default::default()
        })
    };
    assert!(route(p.clone()).is_ok());
    p.matches[0].hosts = vec!["bad host".into()];
    let e = route(p).unwrap_err();
    assert!(e.0.contains("expected a DNS name"), "{e}");
}

#[test]
fn authorities_lose_their_port_only() {
    assert_eq!(host_of("catalog:8080"), "catalog");
    assert_eq!(host_of("catalog"), "catalog");
    assert_eq!(host_of("[::1]:80"), "[::1]");
}
