//! One model of routes and policies (`mesh-model`): a malformed route or policy is refused with
//! the same message by the control plane's admission, by meshctl before it sends anything, and
//! by the proxy when it is pushed raw (NACKed, the last good config kept serving). Each row is
//! a value one side refused and the other accepted, or refused differently, before the model
//! was shared.

use mesh_proto::v1 as pb;
use mesh_tests::*;
use std::time::{Duration, Instant};

const WEB: &str = "spiffe://mesh.local/ns/default/sa/web";

enum Bad {
    Route(pb::Route),
    Policy(Box<pb::Policy>),
}

struct Row {
    what: &'static str,
    bad: Bad,
    /// Part of the model's message, so a row cannot pass on an unrelated refusal.
    says: &'static str,
    /// meshctl arguments that build the same value, when its flags can express it.
    meshctl: &'static [&'static str],
}

fn rule(name: &str, f: impl FnOnce(&mut pb::RouteRule)) -> pb::Route {
    let mut r = pb::RouteRule {
        name: name.into(),
        matches: vec![pb::RouteMatch {
            path: Some(pb::route_match::Path::Prefix("/x".into())),
            ..Default::default()
        }],
        backends: vec![pb::WeightedBackend {
            version: "v2".into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    f(&mut r);
    pb::Route {
        backends: good_backends(),
        rules: vec![r],
        mirror: None,
    }
}

fn good_backends() -> Vec<pb::WeightedBackend> {
    ["v1", "v2"]
        .map(|v| pb::WeightedBackend {
            version: v.into(),
            weight: 50,
            ..Default::default()
        })
        .to_vec()
}

fn policy(f: impl FnOnce(&mut pb::Policy)) -> Box<pb::Policy> {
    let mut p = Box::<pb::Policy>::default();
    f(&mut p);
    p
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            what: "rule name charset (the proxy took any non-empty name)",
            bad: Bad::Route(rule("bad_name", |_| {})),
            says: "name must be letters, digits and '-'",
            meshctl: &[
                "route",
                "set",
                "backend",
                "--match",
                "prefix:/x",
                "--to",
                "v2",
                "--name",
                "bad_name",
            ],
        },
        Row {
            what: "header name (two different charsets)",
            bad: Bad::Route(rule("hdr", |r| {
                r.matches[0].headers = vec![pb::KeyMatch {
                    name: "bad header".into(),
                    value: None,
                }]
            })),
            says: "is not a header name",
            meshctl: &[
                "route",
                "set",
                "backend",
                "--match",
                "header:bad header",
                "--to",
                "v2",
                "--name",
                "hdr",
            ],
        },
        Row {
            what: "a version twice in a rule's backends (checked nowhere)",
            bad: Bad::Route(rule("twice", |r| {
                r.backends = ["v1", "v1"]
                    .map(|v| pb::WeightedBackend {
                        version: v.into(),
                        weight: 50,
                        ..Default::default()
                    })
                    .to_vec()
            })),
            says: "listed twice",
            meshctl: &[
                "route",
                "set",
                "backend",
                "--match",
                "prefix:/x",
                "--to",
                "v1=50,v1=50",
                "--name",
                "twice",
            ],
        },
        Row {
            what: "regex (compiled unanchored by one side, anchored by the other)",
            bad: Bad::Route(rule("re", |r| {
                r.matches[0].path = Some(pb::route_match::Path::Regex("(".into()))
            })),
            says: "invalid regex",
            meshctl: &[
                "route", "set", "backend", "--match", "regex:(", "--to", "v2", "--name", "re",
            ],
        },
        Row {
            what: "a method in lower case",
            bad: Bad::Route(rule("m", |r| r.matches[0].method = "get".into())),
            says: "must be upper case",
            meshctl: &[],
        },
        Row {
            what: "default weights summing to 0",
            bad: Bad::Route(pb::Route {
                backends: good_backends()
                    .into_iter()
                    .map(|b| pb::WeightedBackend { weight: 0, ..b })
                    .collect(),
                ..Default::default()
            }),
            says: "weights sum to 0",
            meshctl: &["route", "set", "backend", "--weights", "v1=0,v2=0"],
        },
        Row {
            what: "max_retries over 10 (refused vs silently clamped)",
            bad: Bad::Policy(policy(|p| {
                p.retry = Some(pb::Retry {
                    max_retries: 11,
                    ..Default::default()
                })
            })),
            says: "retry.max_retries",
            meshctl: &["policy", "set", "backend", "--retries", "11"],
        },
        Row {
            what: "per-try timeout longer than the request timeout (refused vs accepted)",
            bad: Bad::Policy(policy(|p| {
                p.timeouts = Some(pb::Timeouts {
                    request_ms: 1000,
                    per_try_ms: 2000,
                    ..Default::default()
                })
            })),
            says: "timeouts.per_try",
            meshctl: &[
                "policy",
                "set",
                "backend",
                "--timeout",
                "1s",
                "--per-try-timeout",
                "2s",
            ],
        },
        Row {
            what: "rate burst bounds (control plane only)",
            bad: Bad::Policy(policy(|p| {
                p.rate_limit = Some(pb::RateLimit {
                    outbound: Some(pb::Rate {
                        per_second: 1,
                        burst: 100,
                    }),
                    ..Default::default()
                })
            })),
            says: "burst is more than a minute",
            meshctl: &["policy", "set", "backend", "--rate-limit", "1/s,burst=100"],
        },
        Row {
            what: "a rate of 0 per second (refused vs ignored)",
            bad: Bad::Policy(policy(|p| {
                p.rate_limit = Some(pb::RateLimit {
                    inbound: Some(pb::Rate::default()),
                    ..Default::default()
                })
            })),
            says: "per_second must be at least 1",
            meshctl: &[],
        },
        Row {
            what: "an unknown load-balancing algorithm",
            bad: Bad::Policy(policy(|p| {
                p.load_balancer = Some(pb::LoadBalancer {
                    algorithm: "random".into(),
                    ..Default::default()
                })
            })),
            says: "unknown algorithm",
            meshctl: &["policy", "set", "backend", "--lb", "random"],
        },
    ]
}

/// The model's own message for a row's value.
fn model_says(bad: &Bad) -> String {
    match bad {
        Bad::Route(r) => mesh_model::Route::try_from(r)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
        Bad::Policy(p) => mesh_model::Policy::try_from(&**p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}

/// Waits until web's proxy answered a config at or past `revision`: Ok(None) on ACK,
/// Ok(Some(reason)) on NACK.
async fn answer(mesh: &mut Mesh, revision: u64) -> anyhow::Result<Option<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let proxies = mesh
            .admin
            .list_proxies(pb::ListProxiesRequest {})
            .await?
            .into_inner()
            .proxies;
        if let Some(p) = proxies.iter().find(|p| p.identity == WEB) {
            if p.nacked_version >= revision {
                return Ok(Some(p.nack_reason.clone()));
            }
            if p.acked_version >= revision {
                return Ok(None);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "web's proxy never answered {revision}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_side_refuses_a_malformed_route_or_policy_with_the_same_message() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start().await?;
    let (c, http) = backend_v1_v2(&mut mesh).await?;
    set_weights(&mesh, c.admin, 50, 50, Duration::from_secs(2)).await?;
    let good = vec![("v1".to_string(), 50), ("v2".to_string(), 50)];
    let (read, _) = mesh.admin_credential("read", "pre-check").await?;

    for row in rows() {
        let said = model_says(&row.bad);
        assert!(
            said.contains(row.says),
            "{}: the model says {said:?}",
            row.what
        );

        // 1. Admission.
        let refused = match &row.bad {
            Bad::Route(r) => mesh
                .admin
                .set_route(pb::SetRouteRequest {
                    service: "backend".into(),
                    route: Some(r.clone()),
                    skip_validation: false,
                    expected_revision: 0,
                })
                .await
                .map(|_| ()),
            Bad::Policy(p) => mesh
                .admin
                .set_policy(pb::SetPolicyRequest {
                    service: "backend".into(),
                    policy: Some(pb::Policy::clone(p)),
                    skip_validation: false,
                })
                .await
                .map(|_| ()),
        };
        let e = refused.expect_err(row.what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", row.what);
        assert!(
            e.message().contains(&said),
            "{}: {e:?} vs {said:?}",
            row.what
        );

        // 2. meshctl, before sending: with a read-only credential, a value it sent would be
        // refused for the missing write scope instead.
        if !row.meshctl.is_empty() {
            let mut args = vec!["--token", read.as_str()];
            args.extend_from_slice(row.meshctl);
            let e = mesh.meshctl(&args).await.expect_err(row.what).to_string();
            assert!(e.contains(&said), "{}: meshctl said {e}", row.what);
            assert!(!e.contains("scope"), "{}: it was sent: {e}", row.what);
        }

        // 3. Pushed raw: NACKed with the same message; the last good config keeps serving.
        let revision = match &row.bad {
            Bad::Route(r) => {
                mesh.admin
                    .set_route(pb::SetRouteRequest {
                        service: "backend".into(),
                        route: Some(r.clone()),
                        skip_validation: true,
                        expected_revision: 0,
                    })
                    .await?
                    .into_inner()
                    .revision
            }
            Bad::Policy(p) => {
                mesh.admin
                    .set_policy(pb::SetPolicyRequest {
                        service: "backend".into(),
                        policy: Some(pb::Policy::clone(p)),
                        skip_validation: true,
                    })
                    .await?
                    .into_inner()
                    .revision
            }
        };
        let nack = answer(&mut mesh, revision).await?;
        assert!(
            nack.as_deref().is_some_and(|n| n.contains(&said)),
            "{}: {nack:?} vs {said:?}",
            row.what
        );
        let dump = admin_get(c.admin, "/config_dump").await?.json;
        assert_eq!(route_in_dump(&dump, "backend"), good, "{}", row.what);
        assert_eq!(
            get(&http, "http://backend/").await?.status,
            200,
            "{}",
            row.what
        );

        // Put the good config back (checked, so it must be ACKed).
        let revision = match row.bad {
            Bad::Route(_) => {
                mesh.admin
                    .set_route(pb::SetRouteRequest {
                        service: "backend".into(),
                        route: Some(pb::Route {
                            backends: good_backends(),
                            ..Default::default()
                        }),
                        skip_validation: false,
                        expected_revision: 0,
                    })
                    .await?
                    .into_inner()
                    .revision
            }
            Bad::Policy(_) => {
                mesh.admin
                    .set_policy(pb::SetPolicyRequest {
                        service: "backend".into(),
                        policy: None,
                        skip_validation: false,
                    })
                    .await?
                    .into_inner()
                    .revision
            }
        };
        assert_eq!(answer(&mut mesh, revision).await?, None, "{}", row.what);
    }
    Ok(())
}
