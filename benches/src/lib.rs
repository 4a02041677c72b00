//! Fixtures shared by the benchmarks.

pub mod cpu_limit;
pub mod cpu_pin;
pub mod linkerd;
pub mod mesh;
pub mod oha;

use mesh_proto::v1 as pb;
use mesh_proxy::snapshot::Service;

/// A service with `n` endpoints split across v1 and v2, routed 90/10.
pub fn service(n: usize) -> Service {
    service_with(n, None)
}

/// Every policy on, with limits high enough that none of them refuses a benchmark request.
pub fn full_policy() -> pb::Policy {
    pb::Policy {
        timeouts: Some(pb::Timeouts {
            request_ms: 10_000,
            per_try_ms: 5_000,
            ..Default::default()
        }),
        retry: Some(pb::Retry {
            max_retries: 2,
            retry_on: vec!["5xx".into(), "connect-failure".into()],
            ..Default::default()
        }),
        circuit_breaker: Some(pb::CircuitBreaker {
            consecutive_failures: 5,
            max_concurrent: 100_000,
            max_pending: 100,
            ..Default::default()
        }),
        rate_limit: Some(pb::RateLimit {
            outbound: Some(pb::Rate {
                per_second: 1_000_000_000,
                burst: 1_000_000,
            }),
            ..Default::default()
        }),
        load_balancer: None,
        grpc_failures: Vec::new(),
        fault: Some(pb::Fault {
            abort_percent: 0.0001,
            abort_status: 503,
            ..Default::default()
        }),
        hedge: None,
        adaptive_concurrency: None,
    }
}

/// As [`service`], with a policy.
pub fn service_with(n: usize, policy: Option<pb::Policy>) -> Service {
    build(config(n, policy))
}

fn build(cfg: pb::ServiceConfig) -> Service {
    match mesh_proxy::snapshot::ServiceConfig::try_from(cfg) {
        Ok(c) => Service::build(c, 1, None, &pool()),
        Err(e) => panic!("fixture is valid: {e}"),
    }
}

/// A peer connection pool under a throwaway CA (the benchmarks never connect with it).
fn pool() -> std::sync::Arc<mesh_proxy::outbound::pool::Pool> {
    let ca = match rcgen::generate_simple_self_signed(vec!["bench-ca".into()]) {
        Ok(c) => c,
        Err(e) => panic!("CA: {e}"),
    };
    let tls = match mesh_proxy::tls::TlsContext::new(&ca.cert.pem()) {
        Ok(t) => t,
        Err(e) => panic!("bundle: {e}"),
    };
    std::sync::Arc::new(mesh_proxy::outbound::pool::Pool::new(std::sync::Arc::new(
        tls,
    )))
}

/// The discovery config behind [`service_with`].
fn config(n: usize, policy: Option<pb::Policy>) -> pb::ServiceConfig {
    let endpoints = (0..n)
        .map(|i| pb::Endpoint {
            id: format!("ep{i}"),
            address: format!("127.0.0.1:{}", 20000 + i),
            labels: [(
                "version".to_string(),
                if i % 2 == 0 { "v1" } else { "v2" }.to_string(),
            )]
            .into(),
            ready: true,
            app_port: 0,
            identity: String::new(),
        })
        .collect();
    pb::ServiceConfig {
        name: "backend".into(),
        namespace: "default".into(),
        identity: "spiffe://mesh.local/ns/default/sa/backend".into(),
        endpoints,
        route: Some(pb::Route {
            backends: vec![
                pb::WeightedBackend {
                    version: "v1".into(),
                    weight: 90,
                    ..Default::default()
                },
                pb::WeightedBackend {
                    version: "v2".into(),
                    weight: 10,
                    ..Default::default()
                },
            ],
            rules: Vec::new(),
            mirror: None,
        }),
        policy,
        authz: None,
        mtls_mode: String::new(),
        vips: Vec::new(),
        ports: Vec::new(),
        app_protocols: Vec::new(),
        backend_services: Vec::new(),
        external: None,
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |i: usize| -> anyhow::Result<f64> { Ok(f.get(i).context("stat fields")?.parse::<f64>()?) };
    Ok((field(11)? + field(12)?) / 100.0)
}

/// Resident set size of a process, KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()
        .context("VmRSS value")
}

/// A route with `n` header-matched rules ahead of a path-prefix rule (most specific first, so
/// a request for the prefix walks every header rule before it matches).
pub fn service_with_rules(n: usize) -> Service {
    use pb::{key_match, route_match};
    let mut cfg = config(4, None);
    let header_rules = (0..n).map(|i| pb::RouteRule {
        name: format!("canary-{i}"),
        matches: vec![pb::RouteMatch {
            path: Some(route_match::Path::Prefix(format!("/api/v{i}"))),
            headers: vec![pb::KeyMatch {
                name: "x-canary".into(),
                value: Some(key_match::Value::Exact(format!("user-{i}"))),
            }],
            ..Default::default()
        }],
        backends: vec![pb::WeightedBackend {
            version: "v2".into(),
            weight: 100,
            ..Default::default()
        }],
        ..Default::default()
    });
    let prefix_rule = pb::RouteRule {
        name: "bytes".into(),
        matches: vec![pb::RouteMatch {
            path: Some(route_match::Path::Prefix("/bytes".into())),
            ..Default::default()
        }],
        ..Default::default()
    };
    if let Some(route) = cfg.route.as_mut() {
        route.rules = header_rules.chain([prefix_rule]).collect();
    }
    build(cfg)
}
