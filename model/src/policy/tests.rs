use super::*;

fn check(p: &pb::Policy) -> Result<Policy, PolicyError> {
    Policy::try_from(p)
}

#[test]
fn accepts_a_full_policy_and_refuses_bad_fields() {
    let mut p = pb::Policy {
        timeouts: Some(pb::Timeouts {
            request_ms: 2000,
            per_try_ms: 500,
            ..Default::default()
        }),
        retry: Some(pb::Retry {
            max_retries: 3,
            retry_on: vec!["5xx".into(), "503".into(), "unavailable".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let ok = check(&p).unwrap();
    assert_eq!(ok.request_timeout, Some(Duration::from_secs(2)));
    let r = ok.retry.unwrap();
    assert!(r.on.any_5xx);
    assert_eq!((r.on.statuses, r.on.grpc_codes), (vec![503], vec![14]));
    p.retry.as_mut().unwrap().retry_on.push("sometimes".into());
    assert_eq!(check(&p).unwrap_err().field, "retry.retry_on");
    p.retry.as_mut().unwrap().retry_on.pop();
    p.retry.as_mut().unwrap().max_retries = 11;
    assert_eq!(check(&p).unwrap_err().field, "retry.max_retries");
    p.retry.as_mut().unwrap().max_retries = 3;
    p.timeouts.as_mut().unwrap().per_try_ms = 3000;
    assert_eq!(check(&p).unwrap_err().field, "timeouts.per_try");
    let p = pb::Policy {
        fault: Some(pb::Fault {
            abort_percent: 10.0,
            abort_status: 42,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(check(&p).unwrap_err().field, "fault.abort_status");
    let p = pb::Policy {
        load_balancer: Some(pb::LoadBalancer {
            algorithm: "random".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(check(&p).unwrap_err().reason.contains("p2c-ewma"));
    let mut p = pb::Policy {
        grpc_failures: vec![
            "unavailable".into(),
            "RESOURCE_EXHAUSTED".into(),
            "13".into(),
        ],
        ..Default::default()
    };
    assert_eq!(
        check(&p).unwrap().grpc_failures,
        GrpcFailures::of(&[14, 8, 13])
    );
    for bad_code in ["ok", "0", "17", "sometimes"] {
        p.grpc_failures = vec![bad_code.into()];
        assert_eq!(check(&p).unwrap_err().field, "grpc_failures", "{bad_code}");
    }
}

#[test]
fn defaults_fill_what_a_policy_leaves_out() {
    let p = pb::Policy {
        retry: Some(pb::Retry {
            max_retries: 2,
            ..Default::default()
        }),
        circuit_breaker: Some(pb::CircuitBreaker {
            consecutive_failures: 5,
            max_concurrent: 10,
            ..Default::default()
        }),
        rate_limit: Some(pb::RateLimit {
            inbound: Some(pb::Rate {
                per_second: 100,
                burst: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = check(&p).unwrap();
    let r = c.retry.unwrap();
    assert!(r.on.connect_failure && r.on.refused_stream && !r.on.any_5xx);
    assert_eq!(r.backoff_base, DEFAULT_BACKOFF_BASE);
    assert_eq!(c.outlier.unwrap().window, DEFAULT_OUTLIER_WINDOW);
    assert_eq!(c.limits.unwrap().max_concurrent, 10);
    assert_eq!(c.rate_inbound, Some(Rate::new(100, 10)));
    assert_eq!(check(&pb::Policy::default()).unwrap(), Policy::default());
}

#[test]
fn rates_and_headers_are_checked() {
    let p = pb::Policy {
        rate_limit: Some(pb::RateLimit {
            outbound: Some(pb::Rate {
                per_second: 0,
                burst: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(check(&p).unwrap_err().field, "rate_limit.outbound");
    let p = pb::Policy {
        load_balancer: Some(pb::LoadBalancer {
            algorithm: "consistent-hash".into(),
            hash_header: "bad header".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(check(&p).unwrap_err().field, "load_balancer.hash_header");
}
