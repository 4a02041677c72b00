//! Resilience policies: what values the control plane accepts before it stores one. The proxy
//! converts the same message into its own types and NACKs what it cannot apply; this check
//! exists so a user gets a clear refusal from `meshctl` instead of a NACK later.

use mesh_proto::v1 as pb;

/// Conditions a retry may name besides status codes; gRPC codes are listed in [`GRPC_CODES`].
pub const RETRY_CONDITIONS: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "refused-stream",
    "reset",
    "timeout",
];
/// gRPC status names a retry may name, with their codes.
pub const GRPC_CODES: &[(&str, u8)] = mesh_proto::RETRY_GRPC_CODES;
/// Load-balancing algorithms the proxy implements.
pub const ALGORITHMS: &[&str] = &["p2c-ewma", "round-robin", "consistent-hash"];

/// Most retries a policy may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest duration a policy field may hold (one day), in milliseconds.
pub const MAX_MS: u32 = 86_400_000;

/// Why a policy is refused, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field,
        reason: reason.into(),
    }
}

fn ms(field: &'static str, v: u32) -> Result<(), PolicyError> {
    if v > MAX_MS {
        return Err(bad(field, format!("{v} ms is longer than a day")));
    }
    Ok(())
}

fn percent(field: &'static str, v: f64) -> Result<(), PolicyError> {
    if !(0.0..=100.0).contains(&v) {
        return Err(bad(field, format!("{v} is not a percentage in 0..=100")));
    }
    Ok(())
}

fn rate(field: &'static str, r: &Option<pb::Rate>) -> Result<(), PolicyError> {
    if let Some(r) = r {
        if r.per_second == 0 {
            return Err(bad(field, "per_second must be at least 1"));
        }
        if r.burst > r.per_second.saturating_mul(60) {
            return Err(bad(field, "burst is more than a minute of traffic"));
        }
    }
    Ok(())
}

/// True when `cond` is a retry condition the proxy understands.
pub fn is_retry_condition(cond: &str) -> bool {
    RETRY_CONDITIONS.contains(&cond)
        || GRPC_CODES.iter().any(|(n, _)| *n == cond)
        || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
}

/// Checks every field of `p`; the first bad one is named in the error.
pub fn validate(p: &pb::Policy) -> Result<(), PolicyError> {
    if let Some(t) = &p.timeouts {
        ms("timeouts.request", t.request_ms)?;
        ms("timeouts.per_try", t.per_try_ms)?;
        ms("timeouts.connect", t.connect_ms)?;
        ms("timeouts.idle", t.idle_ms)?;
        ms("timeouts.stream_idle", t.stream_idle_ms)?;
        if t.per_try_ms > 0 && t.request_ms > 0 && t.per_try_ms > t.request_ms {
            return Err(bad(
                "timeouts.per_try",
                "longer than the request timeout, so it could never fire",
            ));
        }
    }
    if let Some(r) = &p.retry {
        if r.max_retries > MAX_RETRIES {
            return Err(bad(
                "retry.max_retries",
                format!("{} is more than {MAX_RETRIES}", r.max_retries),
            ));
        }
        if let Some(c) = r.retry_on.iter().find(|c| !is_retry_condition(c)) {
            return Err(bad(
                "retry.retry_on",
                format!(
                    "unknown condition {c:?} (use {}, a status code, or a gRPC code: {})",
                    RETRY_CONDITIONS.join(", "),
                    GRPC_CODES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        ms("retry.backoff_base", r.backoff_base_ms)?;
        ms("retry.backoff_max", r.backoff_max_ms)?;
        if r.backoff_max_ms > 0 && r.backoff_base_ms > r.backoff_max_ms {
            return Err(bad("retry.backoff", "base is longer than max"));
        }
        if !(0.0..=1000.0).contains(&r.budget_percent) {
            return Err(bad("retry.budget_percent", "must be in 0..=1000"));
        }
    }
    if let Some(c) = &p.circuit_breaker {
        percent(
            "circuit_breaker.failure_rate_percent",
            c.failure_rate_percent,
        )?;
        percent(
            "circuit_breaker.max_ejection_percent",
            c.max_ejection_percent,
        )?;
        ms("circuit_breaker.window", c.window_ms)?;
        ms("circuit_breaker.base_ejection", c.base_ejection_ms)?;
    }
    if let Some(r) = &p.rate_limit {
        rate("rate_limit.outbound", &r.outbound)?;
        rate("rate_limit.inbound", &r.inbound)?;
        rate("rate_limit.inbound_per_caller", &r.inbound_per_caller)?;
    }
    if let Some(lb) = &p.load_balancer {
        if !lb.algorithm.is_empty() && !ALGORITHMS.contains(&lb.algorithm.as_str()) {
            return Err(bad(
                "load_balancer.algorithm",
                format!(
                    "unknown algorithm {:?} (use {})",
                    lb.algorithm,
                    ALGORITHMS.join(", ")
                ),
            ));
        }
        if lb.algorithm == "consistent-hash" && http_header_name_invalid(&lb.hash_header) {
            return Err(bad(
                "load_balancer.hash_header",
                format!("{:?} is not a header name", lb.hash_header),
            ));
        }
        ms("load_balancer.warmup", lb.warmup_ms)?;
    }
    if let Some(bad_code) = p
        .grpc_failures
        .iter()
        .find(|c| mesh_proto::grpc_code(c).is_none())
    {
        return Err(bad(
            "grpc_failures",
            format!(
                "{bad_code:?} is not a gRPC status other than ok (a name such as unavailable, or 1 to 16)"
            ),
        ));
    }
    if let Some(f) = &p.fault {
        ms("fault.delay", f.delay_ms)?;
        percent("fault.delay_percent", f.delay_percent)?;
        percent("fault.abort_percent", f.abort_percent)?;
        if f.abort_percent > 0.0 && !(200..=599).contains(&f.abort_status) {
            return Err(bad(
                "fault.abort_status",
                format!("{} is not an HTTP status", f.abort_status),
            ));
        }
    }
    Ok(())
}

fn http_header_name_invalid(h: &str) -> bool {
    h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(validate(&p), Ok(()));
        p.retry.as_mut().unwrap().retry_on.push("sometimes".into());
        assert_eq!(validate(&p).unwrap_err().field, "retry.retry_on");
        p.retry.as_mut().unwrap().retry_on.pop();
        p.timeouts.as_mut().unwrap().per_try_ms = 3000;
        assert_eq!(validate(&p).unwrap_err().field, "timeouts.per_try");
        let p = pb::Policy {
            fault: Some(pb::Fault {
                abort_percent: 10.0,
                abort_status: 42,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(validate(&p).unwrap_err().field, "fault.abort_status");
        let p = pb::Policy {
            load_balancer: Some(pb::LoadBalancer {
                algorithm: "random".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(validate(&p).unwrap_err().reason.contains("p2c-ewma"));
        let mut p = pb::Policy {
            grpc_failures: vec![
                "unavailable".into(),
                "RESOURCE_EXHAUSTED".into(),
                "13".into(),
            ],
            ..Default::default()
        };
        assert_eq!(validate(&p), Ok(()));
        for bad_code in ["ok", "0", "17", "sometimes"] {
            p.grpc_failures = vec![bad_code.into()];
            assert_eq!(
                validate(&p).unwrap_err().field,
                "grpc_failures",
                "{bad_code}"
            );
        }
    }
}
