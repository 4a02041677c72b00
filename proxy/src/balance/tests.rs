use super::*;
use std::collections::HashMap;

fn ep(id: &str, port: u16, v: &str) -> Endpoint {
    Endpoint {
        id: id.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        version: Some(v.into()),
        ready: true,
        app_port: None,
        identity: None,
    }
}

fn fresh(_: &Endpoint) -> Arc<EndpointState> {
    Arc::new(EndpointState::new())
}

fn rr() -> LbConfig {
    LbConfig {
        algorithm: Algorithm::RoundRobin,
        ..Default::default()
    }
}

fn split(b: &Balancer, lb: &LbConfig, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let p = b.pick(lb, None, &[]).unwrap();
        *m.entry(p.id.to_string()).or_default() += 1;
        p.finish(true, b, None);
    }
    m
}

#[test]
fn exact_weighted_split_and_interleaving() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1"), ep("c", 3, "v2")];
    let b = Balancer::new(&eps, &[("v1".into(), 90), ("v2".into(), 10)], fresh);
    let m = split(&b, &rr(), 1000);
    assert_eq!((m["a"] + m["b"], m["c"]), (900, 100));
    // Smooth: v2 never gets two in a row at 90/10.
    let s = schedule(&[90, 10]);
    assert_eq!(s.len(), 10);
    assert_eq!(s.iter().filter(|x| **x == 1).count(), 1);
    assert_eq!(schedule(&[1, 1]), vec![0, 1]);
}

#[test]
fn zero_weight_and_empty_versions_leave_schedule() {
    let eps = [ep("a", 1, "v1"), ep("c", 3, "v2")];
    let b = Balancer::new(&eps, &[("v1".into(), 0), ("v2".into(), 100)], fresh);
    assert_eq!(split(&b, &rr(), 50)["c"], 50);
    let b = Balancer::new(&eps, &[("v3".into(), 100)], fresh);
    assert_eq!(
        b.pick(&rr(), None, &[]).unwrap_err(),
        PickError::NoEndpoints
    );
    let mut down = ep("a", 1, "v1");
    down.ready = false;
    let b = Balancer::new(&[down], &[], fresh);
    assert!(b.pick(&rr(), None, &[]).is_err());
}

#[test]
fn round_robin_within_version_and_retries_go_elsewhere() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1")];
    let b = Balancer::new(&eps, &[], fresh);
    let ids: Vec<_> = (0..4)
        .map(|_| b.pick(&rr(), None, &[]).unwrap().id.to_string())
        .collect();
    assert_eq!(ids, ["a", "b", "a", "b"]);
    let avoid = [eps[0].addr];
    for _ in 0..4 {
        assert_eq!(
            &*b.pick(&LbConfig::default(), None, &avoid).unwrap().id,
            "b"
        );
    }
}

#[test]
fn large_weights_are_scaled() {
    let s = schedule(&[1_000_000, 1]);
    assert!(s.len() as u64 <= MAX_SCHEDULE + 2);
    assert!(s.contains(&1));
}

#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_endpoint() {
    let eps = [
        ep("fast", 1, "v1"),
        ep("fast2", 2, "v1"),
        ep("slow", 3, "v1"),
    ];
    let b = Balancer::new(&eps, &[], fresh);
    let lb = LbConfig::default();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..600 {
        let p = b.pick(&lb, None, &[]).unwrap();
        let slow = &*p.id == "slow";
        *counts.entry(p.id.to_string()).or_default() += 1;
        tokio::time::advance(Duration::from_millis(if slow { 50 } else { 5 })).await;
        p.finish(true, &b, None);
    }
    // Round robin would give it a third (200).
    assert!(counts["slow"] < 60, "{counts:?}");
}

#[test]
fn consistent_hash_is_sticky_and_spreads() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1"), ep("c", 3, "v1")];
    let b = Balancer::new(&eps, &[], fresh);
    let lb = LbConfig {
        algorithm: Algorithm::ConsistentHash,
        hash_header: Some(http::HeaderName::from_static("x-user")),
        ..Default::default()
    };
    let mut owners = std::collections::HashSet::new();
    for user in 0..30 {
        let key = hash_bytes(format!("user-{user}").as_bytes());
        let first = b.pick(&lb, Some(key), &[]).unwrap().id.clone();
        for _ in 0..5 {
            assert_eq!(b.pick(&lb, Some(key), &[]).unwrap().id, first);
        }
        owners.insert(first);
    }
    assert_eq!(owners.len(), 3, "keys spread over every endpoint");
}

fn outlier(consecutive: u32) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: consecutive,
        base_ejection: Duration::from_secs(1),
        max_ejection_percent: 50.0,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn ejects_after_consecutive_failures_then_probation_lets_it_back() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1"), ep("c", 3, "v1")];
    let b = Balancer::new(&eps, &[], fresh);
    let cfg = outlier(3);
    let a = eps[0].addr;
    let fail_a = |n| {
        (0..n)
            .map(|_| {
                let p = b.pick(&rr(), None, &[eps[1].addr, eps[2].addr]).unwrap();
                assert_eq!(p.addr, a);
                p.finish(false, &b, Some(&cfg))
            })
            .collect::<Vec<bool>>()
    };
    // The third failure ejects (and says so: the metrics count it).
    assert_eq!(fail_a(3), [false, false, true]);
    // Ejected: nothing goes to a for the ejection time.
    for _ in 0..20 {
        assert_ne!(b.pick(&rr(), None, &[]).unwrap().addr, a);
    }
    tokio::time::advance(Duration::from_millis(1001)).await;
    // Probation: one trial at a time.
    let trial = b.pick(&rr(), None, &[eps[1].addr, eps[2].addr]).unwrap();
    assert_eq!(trial.addr, a);
    for _ in 0..6 {
        assert_ne!(b.pick(&rr(), None, &[]).unwrap().addr, a);
    }
    // The trial fails: ejected again, for twice as long.
    trial.finish(false, &b, Some(&cfg));
    tokio::time::advance(Duration::from_millis(1500)).await;
    for _ in 0..6 {
        assert_ne!(b.pick(&rr(), None, &[]).unwrap().addr, a);
    }
    tokio::time::advance(Duration::from_millis(600)).await;
    let trial = b.pick(&rr(), None, &[eps[1].addr, eps[2].addr]).unwrap();
    trial.finish(true, &b, Some(&cfg));
    let m = split(&b, &rr(), 30);
    assert_eq!(m["a"], 10, "back in rotation: {m:?}");
}

#[tokio::test(start_paused = true)]
async fn never_ejects_more_than_the_max_share() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1")];
    let b = Balancer::new(&eps, &[], fresh);
    let cfg = outlier(1);
    for _ in 0..4 {
        let p = b.pick(&rr(), None, &[]).unwrap();
        p.finish(false, &b, Some(&cfg));
    }
    // 50% of 2 is one endpoint: the other stays whatever it does.
    let now = state::Now::get();
    let ejected = b.states().filter(|(_, s)| s.is_ejected(now)).count();
    assert_eq!(ejected, 1);
    assert!(b.pick(&rr(), None, &[]).is_ok());
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_the_window_ejects() {
    let eps = [ep("a", 1, "v1"), ep("b", 2, "v1"), ep("c", 3, "v1")];
    let b = Balancer::new(&eps, &[], fresh);
    let cfg = OutlierConfig {
        failure_rate_percent: 50.0,
        min_requests: 10,
        ..outlier(0)
    };
    let only_a = [eps[1].addr, eps[2].addr];
    for i in 0..10 {
        let p = b.pick(&rr(), None, &only_a).unwrap();
        p.finish(i % 2 == 0, &b, Some(&cfg));
    }
    let now = state::Now::get();
    assert!(b.states().any(|(e, s)| &*e.id == "a" && s.is_ejected(now)));
}

#[tokio::test(start_paused = true)]
async fn new_endpoints_warm_up() {
    let s = EndpointState::new();
    let warm = Duration::from_secs(10);
    assert!((s.warm(state::Now::get(), warm) - 0.1).abs() < 1e-9);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!((s.warm(state::Now::get(), warm) - 0.55).abs() < 1e-6);
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(s.warm(state::Now::get(), warm), 1.0);
}

#[test]
fn telemetry_buckets_are_at_most_their_bound_at_microseconds() {
    use super::state::{BUCKETS, bucket_of};
    // Bounds 1, 2, 5, 10 … ms: a bucket holds what does not exceed its bound (µs here).
    for (latency, bucket) in [
        (300, 0),
        (1_000, 0),
        (1_001, 1),
        (1_900, 1),
        (2_000, 1),
        (2_001, 2),
        (5_000_000, BUCKETS - 2),
        (5_000_001, BUCKETS - 1),
    ] {
        assert_eq!(
            bucket_of(Duration::from_micros(latency)),
            bucket,
            "{latency} µs"
        );
    }
}
