//! Per-request costs on the proxy's hot path: picking an endpoint, resolving a known service from
//! the current snapshot, mapping a Host to a service name, and the policy stack (every policy
//! on vs none) over an upstream that answers at once.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_proxy::balance::{Algorithm, LbConfig};
use mesh_proxy::http::body::ReqBody;
use mesh_proxy::http::errors::ProxyError;
use mesh_proxy::outbound::stack::policies;
use mesh_proxy::snapshot::{Snapshot, Snapshots};
use std::hint::black_box;
use std::sync::Arc;
use tower::ServiceExt;

fn pick(c: &mut Criterion) {
    let svc = mesh_benches::service(10);
    for (name, algorithm) in [
        ("balancer_pick_p2c_90_10_10_endpoints", Algorithm::P2cEwma),
        ("balancer_pick_rr_90_10_10_endpoints", Algorithm::RoundRobin),
    ] {
        let lb = LbConfig {
            algorithm,
            ..Default::default()
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                if let Ok(p) = svc.balancer.pick(&lb, None, &[]) {
                    p.finish(true, &svc.balancer, None);
                }
            })
        });
    }
}

/// A current-thread runtime for one request at a time.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An upstream that answers at once.
fn upstream(
    _: http::Request<ReqBody>,
) -> std::future::Ready<Result<http::Response<()>, ProxyError>> {
    std::future::ready(Ok(http::Response::new(())))
}

/// The added cost of the policy layers: the same request through no policy and through all.
fn policy_stack(c: &mut Criterion) {
    let rt = runtime();
    let upstream = tower::service_fn(upstream);
    for (name, policy) in [
        ("policy_stack_none", None),
        ("policy_stack_all", Some(mesh_benches::full_policy())),
    ] {
        let svc = mesh_benches::service_with(4, policy);
        let stack = policies(&svc.policy, &svc.state, upstream);
        c.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut req = http::Request::new(ReqBody::Empty);
                    req.headers_mut()
                        .insert("grpc-timeout", http::HeaderValue::from_static("5S"));
                    black_box(stack.clone().oneshot(req).await.is_ok())
                })
            })
        });
    }
}

fn resolve(c: &mut Criterion) {
    let (snapshots, _rx) = Snapshots::new();
    let mut snap = Snapshot {
        synced: true,
        ..Snapshot::default()
    };
    for i in 0..100 {
        let s = mesh_benches::service(4);
        snap.services.insert(format!("svc{i}").into(), Arc::new(s));
    }
    snapshots.store(snap);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("resolve_known_service_of_100", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(snapshots.resolve(black_box("svc42")).await.is_ok()) })
        })
    });
}

/// The rule a request takes, through 10 header-matched rules to a path prefix; and the default
/// route when no rule matches.
fn route_match(c: &mut Criterion) {
    let svc = mesh_benches::service_with_rules(10);
    let method = http::Method::GET;
    let mut headers = http::HeaderMap::new();
    headers.insert("x-canary", http::HeaderValue::from_static("user-none"));
    headers.insert("accept", http::HeaderValue::from_static("*/*"));
    for (name, uri, want) in [
        (
            "route_match_prefix_after_10_header_rules",
            "/bytes/1024",
            Some(10),
        ),
        ("route_match_no_rule_of_11", "/other?x=1", None),
    ] {
        let uri: http::Uri = uri.parse().expect("uri");
        assert_eq!(svc.router.route(&method, &uri, &headers), want);
        c.bench_function(name, |b| {
            b.iter(|| black_box(svc.router.route(&method, black_box(&uri), &headers)))
        });
    }
}

fn host(c: &mut Criterion) {
    c.bench_function("service_key_fqdn", |b| {
        b.iter(|| {
            black_box(mesh_model::service::host_key(
                black_box("backend.default.svc.cluster.local"),
                black_box("default"),
            ))
        })
    });
}

/// The request-path cost of hedging, a global limit's share and the adaptive limit, when on.
fn beyond(c: &mut Criterion) {
    let rt = runtime();
    let upstream = tower::service_fn(upstream);
    // Hedging on at a fixed delay, over an upstream that answers first: the race and the p95
    // bookkeeping, never a second copy.
    let hedged = mesh_benches::service_with(
        4,
        Some(mesh_proto::v1::Policy {
            hedge: Some(mesh_proto::v1::Hedge { delay_ms: 50 }),
            ..Default::default()
        }),
    );
    let stack = policies(&hedged.policy, &hedged.state, upstream);
    c.bench_function("policy_stack_hedge_on", |b| {
        b.iter(|| {
            rt.block_on(async {
                black_box(
                    stack
                        .clone()
                        .oneshot(http::Request::new(ReqBody::Empty))
                        .await
                        .is_ok(),
                )
            })
        })
    });
    let limits = mesh_proxy::policy::global::GlobalLimits::default();
    let rate = mesh_model::policy::GlobalRate {
        rate: mesh_model::policy::Rate::new(1_000_000_000, 1_000_000),
        per_caller: false,
    };
    let caller: Arc<str> = "spiffe://mesh.local/ns/default/sa/web".into();
    c.bench_function("global_limit_share_check", |b| {
        b.iter(|| black_box(limits.check(rate, &caller).is_ok()))
    });
    let adaptive = Arc::new(mesh_proxy::policy::adaptive::Adaptive::new(
        mesh_model::policy::AdaptiveConfig {
            min_limit: 1_000,
            max_limit: 10_000,
            min_rtt_interval: std::time::Duration::from_secs(30),
            tolerance_percent: 10.0,
        },
    ));
    c.bench_function("adaptive_limit_acquire_and_answer", |b| {
        b.iter(|| {
            if let Ok(p) = adaptive.acquire() {
                p.answered();
            }
        })
    });
}

criterion_group!(
    benches,
    pick,
    resolve,
    route_match,
    host,
    policy_stack,
    beyond
);
criterion_main!(benches);
