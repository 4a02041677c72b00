//! Resilience policies: timeouts, retries, outlier ejection, concurrency limits, rate limits,
//! load balancing, fault injection and which gRPC statuses count as failures. A
//! [`Policy`] is built from `pb::Policy` by `TryFrom`, which is the one place its values are
//! checked; the first bad field is named in the error.

use mesh_proto::v1 as pb;
use std::time::Duration;

/// Default TCP + TLS connect timeout to a peer sidecar.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default idle time after which a pooled peer connection is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_OUTLIER_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_OUTLIER_MIN_REQUESTS: u32 = 20;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: f64 = 50.0;

/// Conditions a retry may name besides status codes and the gRPC codes of
/// [`GRPC_CODES`].
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
/// Load-balancing algorithms, by the name a policy gives.
pub const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("p2c-ewma", Algorithm::P2cEwma),
    ("round-robin", Algorithm::RoundRobin),
    ("consistent-hash", Algorithm::ConsistentHash),
];
/// Most retries a policy may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest duration a policy field may hold (one day), in milliseconds.
pub const MAX_MS: u32 = 86_400_000;

/// Everything a policy says, with defaults filled in. `Default` is "no policy".
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// A request or answer body that moves nothing this long is ended (None: never).
    pub stream_idle_timeout: Option<Duration>,
    pub retry: Option<RetryConfig>,
    pub outlier: Option<OutlierConfig>,
    pub limits: Option<LimitsConfig>,
    pub rate_outbound: Option<Rate>,
    pub rate_inbound: Option<Rate>,
    pub rate_inbound_per_caller: Option<Rate>,
    /// At a gateway: the request header naming the client for `rate_inbound_per_caller`
    /// (None: the client's IP address).
    pub client_header: Option<http::HeaderName>,
    /// All replicas of the service together, by quota leases.
    pub rate_global: Option<GlobalRate>,
    pub lb: LbConfig,
    pub fault: Option<FaultConfig>,
    /// gRPC statuses that count as the server's failure, one bit per code.
    pub grpc_failures: GrpcFailures,
    pub hedge: Option<HedgeConfig>,
    pub adaptive: Option<AdaptiveConfig>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            request_timeout: None,
            per_try_timeout: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            stream_idle_timeout: None,
            retry: None,
            outlier: None,
            limits: None,
            rate_outbound: None,
            rate_inbound: None,
            rate_inbound_per_caller: None,
            client_header: None,
            rate_global: None,
            lb: LbConfig::default(),
            fault: None,
            grpc_failures: GrpcFailures::default(),
            hedge: None,
            adaptive: None,
        }
    }
}

/// A set of gRPC status codes (0 to 16), one bit each: which count as the server's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcFailures(pub u32);

impl Default for GrpcFailures {
    fn default() -> Self {
        Self::of(&mesh_proto::DEFAULT_GRPC_FAILURES)
    }
}

impl GrpcFailures {
    pub fn of(codes: &[u16]) -> Self {
        Self(
            codes
                .iter()
                .filter(|c| **c < 32)
                .fold(0, |m, c| m | (1 << c)),
        )
    }

    /// True when a call that ended with `status` (None: with none at all) failed.
    pub fn failed(self, status: Option<u16>) -> bool {
        status.is_none_or(|c| c < 32 && self.0 & (1 << c) != 0)
    }
}

/// Which failures a retry policy retries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub any_5xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    pub timeout: bool,
    pub statuses: Vec<u16>,
    pub grpc_codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub max_retries: u32,
    pub on: RetryOn,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget_percent: f64,
    pub budget_min_per_second: u32,
    pub non_idempotent: bool,
}

impl RetryConfig {
    /// No retries, the budget's defaults (what hedging alone draws on).
    pub fn budget_only() -> Self {
        Self {
            max_retries: 0,
            on: RetryOn::default(),
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            budget_percent: DEFAULT_BUDGET_PERCENT,
            budget_min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            non_idempotent: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    /// 0: off.
    pub consecutive_failures: u32,
    /// 0: off.
    pub failure_rate_percent: f64,
    pub window: Duration,
    pub min_requests: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 0,
            failure_rate_percent: 0.0,
            window: DEFAULT_OUTLIER_WINDOW,
            min_requests: DEFAULT_OUTLIER_MIN_REQUESTS,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// 0: unlimited.
    pub max_concurrent: u32,
    pub max_pending: u32,
}

/// `per_second` sustained, `burst` at once after a quiet period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// `burst` 0 means a tenth of a second of traffic (at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = if burst == 0 {
            (per_second / 10).max(1)
        } else {
            burst
        };
        Self { per_second, burst }
    }

    /// Nanoseconds between two admitted requests at the sustained rate.
    pub fn interval_ns(&self) -> u64 {
        1_000_000_000 / u64::from(self.per_second.max(1))
    }
}

/// A limit held by all replicas of a service together: the whole budget, and whether each
/// caller identity has one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRate {
    pub rate: Rate,
    pub per_caller: bool,
}

/// When an idempotent request goes a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeConfig {
    /// None: after the p95 of the recent answers.
    pub delay: Option<Duration>,
}

pub const DEFAULT_ADAPTIVE_MIN: u32 = 3;
pub const DEFAULT_ADAPTIVE_MAX: u32 = 1000;
pub const DEFAULT_MIN_RTT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_ADAPTIVE_TOLERANCE: f64 = 10.0;

/// The bounds and pace of an adaptive concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    pub min_limit: u32,
    pub max_limit: u32,
    pub min_rtt_interval: Duration,
    /// 0..=100: latency this much above min_rtt still counts as unloaded.
    pub tolerance_percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    P2cEwma,
    RoundRobin,
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LbConfig {
    pub algorithm: Algorithm,
    /// consistent-hash: header whose value picks the endpoint (absent header: P2C).
    pub hash_header: Option<http::HeaderName>,
    /// New endpoints ramp from 10% to 100% of their share over this long.
    pub warmup: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    pub delay: Duration,
    /// 0..=100
    pub delay_percent: f64,
    pub abort_status: u16,
    /// 0..=100
    pub abort_percent: f64,
}

/// Why a policy is refused, naming the field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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

/// A duration field: 0 is "not set".
fn ms(field: &'static str, v: u32) -> Result<Option<Duration>, PolicyError> {
    if v > MAX_MS {
        return Err(bad(field, format!("{v} ms is longer than a day")));
    }
    Ok((v > 0).then(|| Duration::from_millis(u64::from(v))))
}

fn ms_or(field: &'static str, v: u32, default: Duration) -> Result<Duration, PolicyError> {
    Ok(ms(field, v)?.unwrap_or(default))
}

fn percent(field: &'static str, v: f64) -> Result<f64, PolicyError> {
    if !(0.0..=100.0).contains(&v) {
        return Err(bad(field, format!("{v} is not a percentage in 0..=100")));
    }
    Ok(v)
}

fn rate(field: &'static str, r: &Option<pb::Rate>) -> Result<Option<Rate>, PolicyError> {
    let Some(r) = r else { return Ok(None) };
    if r.per_second == 0 {
        return Err(bad(field, "per_second must be at least 1"));
    }
    if r.burst > r.per_second.saturating_mul(60) {
        return Err(bad(field, "burst is more than a minute of traffic"));
    }
    Ok(Some(Rate::new(r.per_second, r.burst)))
}

/// A header name as RFC 9110 allows it (a token).
pub fn header_name(n: &str) -> Option<http::HeaderName> {
    http::HeaderName::from_bytes(n.as_bytes()).ok()
}

/// True when `cond` is a retry condition the proxy understands.
pub fn is_retry_condition(cond: &str) -> bool {
    retry_condition(cond, &mut RetryOn::default())
}

/// Adds `cond` to `on`; false when it is no condition.
fn retry_condition(cond: &str, on: &mut RetryOn) -> bool {
    match cond {
        "5xx" => on.any_5xx = true,
        "gateway-error" => on.gateway_error = true,
        "connect-failure" => on.connect_failure = true,
        "refused-stream" => on.refused_stream = true,
        "reset" => on.reset = true,
        "timeout" => on.timeout = true,
        other => {
            if let Some((_, code)) = GRPC_CODES.iter().find(|(n, _)| *n == other) {
                on.grpc_codes.push(*code);
            } else if let Some(s) = other
                .parse::<u16>()
                .ok()
                .filter(|s| (100..=599).contains(s))
            {
                on.statuses.push(s);
            } else {
                return false;
            }
        }
    }
    true
}

fn retry(r: &pb::Retry) -> Result<Option<RetryConfig>, PolicyError> {
    if r.max_retries > MAX_RETRIES {
        return Err(bad(
            "retry.max_retries",
            format!("{} is more than {MAX_RETRIES}", r.max_retries),
        ));
    }
    let mut on = RetryOn::default();
    if r.retry_on.is_empty() {
        on.connect_failure = true;
        on.refused_stream = true;
    }
    if let Some(c) = r.retry_on.iter().find(|c| !retry_condition(c, &mut on)) {
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
    let backoff_base = ms_or(
        "retry.backoff_base",
        r.backoff_base_ms,
        DEFAULT_BACKOFF_BASE,
    )?;
    let backoff_max = ms_or("retry.backoff_max", r.backoff_max_ms, DEFAULT_BACKOFF_MAX)?;
    if r.backoff_max_ms > 0 && r.backoff_base_ms > r.backoff_max_ms {
        return Err(bad("retry.backoff", "base is longer than max"));
    }
    if !(0.0..=1000.0).contains(&r.budget_percent) {
        return Err(bad("retry.budget_percent", "must be in 0..=1000"));
    }
    Ok((r.max_retries > 0).then_some(RetryConfig {
        max_retries: r.max_retries,
        on,
        backoff_base,
        backoff_max,
        budget_percent: if r.budget_percent > 0.0 {
            r.budget_percent
        } else {
            DEFAULT_BUDGET_PERCENT
        },
        budget_min_per_second: if r.budget_min_per_second > 0 {
            r.budget_min_per_second
        } else {
            DEFAULT_BUDGET_MIN_PER_SECOND
        },
        non_idempotent: r.non_idempotent,
    }))
}

fn circuit_breaker(
    c: &pb::CircuitBreaker,
) -> Result<(Option<OutlierConfig>, Option<LimitsConfig>), PolicyError> {
    let rate = percent(
        "circuit_breaker.failure_rate_percent",
        c.failure_rate_percent,
    )?;
    let max_ejection = percent(
        "circuit_breaker.max_ejection_percent",
        c.max_ejection_percent,
    )?;
    let window = ms_or(
        "circuit_breaker.window",
        c.window_ms,
        DEFAULT_OUTLIER_WINDOW,
    )?;
    let base_ejection = ms_or(
        "circuit_breaker.base_ejection",
        c.base_ejection_ms,
        DEFAULT_BASE_EJECTION,
    )?;
    let outlier = (c.consecutive_failures > 0 || rate > 0.0).then_some(OutlierConfig {
        consecutive_failures: c.consecutive_failures,
        failure_rate_percent: rate,
        window,
        min_requests: if c.min_requests > 0 {
            c.min_requests
        } else {
            DEFAULT_OUTLIER_MIN_REQUESTS
        },
        base_ejection,
        max_ejection_percent: if max_ejection > 0.0 {
            max_ejection
        } else {
            DEFAULT_MAX_EJECTION_PERCENT
        },
    });
    let limits = (c.max_concurrent > 0).then_some(LimitsConfig {
        max_concurrent: c.max_concurrent,
        max_pending: c.max_pending,
    });
    Ok((outlier, limits))
}

fn load_balancer(lb: &pb::LoadBalancer) -> Result<LbConfig, PolicyError> {
    let algorithm = match lb.algorithm.as_str() {
        "" => Algorithm::default(),
        name => ALGORITHMS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                bad(
                    "load_balancer.algorithm",
                    format!(
                        "unknown algorithm {name:?} (use {})",
                        ALGORITHMS
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?,
    };
    let hash_header = match algorithm {
        Algorithm::ConsistentHash => Some(header_name(&lb.hash_header).ok_or_else(|| {
            bad(
                "load_balancer.hash_header",
                format!("{:?} is not a header name", lb.hash_header),
            )
        })?),
        _ => None,
    };
    Ok(LbConfig {
        algorithm,
        hash_header,
        warmup: ms_or("load_balancer.warmup", lb.warmup_ms, Duration::ZERO)?,
    })
}

fn fault(f: &pb::Fault) -> Result<Option<FaultConfig>, PolicyError> {
    let delay = ms_or("fault.delay", f.delay_ms, Duration::ZERO)?;
    let delay_percent = percent("fault.delay_percent", f.delay_percent)?;
    let abort_percent = percent("fault.abort_percent", f.abort_percent)?;
    let abort_status = match u16::try_from(f.abort_status) {
        Ok(s) if (200..=599).contains(&s) => s,
        _ if abort_percent > 0.0 => {
            return Err(bad(
                "fault.abort_status",
                format!("{} is not an HTTP status", f.abort_status),
            ));
        }
        _ => 0,
    };
    Ok(
        (delay_percent > 0.0 || abort_percent > 0.0).then_some(FaultConfig {
            delay,
            delay_percent,
            abort_status,
            abort_percent,
        }),
    )
}

fn adaptive(a: &pb::AdaptiveConcurrency) -> Result<AdaptiveConfig, PolicyError> {
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let (min_limit, max_limit) = (
        or(a.min_limit, DEFAULT_ADAPTIVE_MIN),
        or(a.max_limit, DEFAULT_ADAPTIVE_MAX),
    );
    if min_limit > max_limit {
        return Err(bad(
            "adaptive_concurrency.min_limit",
            format!("{min_limit} is above max_limit {max_limit}"),
        ));
    }
    let tolerance = percent(
        "adaptive_concurrency.tolerance_percent",
        a.tolerance_percent,
    )?;
    Ok(AdaptiveConfig {
        min_limit,
        max_limit,
        min_rtt_interval: ms_or(
            "adaptive_concurrency.min_rtt_interval",
            a.min_rtt_interval_ms,
            DEFAULT_MIN_RTT_INTERVAL,
        )?,
        tolerance_percent: if tolerance > 0.0 {
            tolerance
        } else {
            DEFAULT_ADAPTIVE_TOLERANCE
        },
    })
}

impl TryFrom<&pb::Policy> for Policy {
    type Error = PolicyError;

    fn try_from(p: &pb::Policy) -> Result<Self, PolicyError> {
        let mut out = Policy::default();
        if let Some(t) = &p.timeouts {
            out.request_timeout = ms("timeouts.request", t.request_ms)?;
            out.per_try_timeout = ms("timeouts.per_try", t.per_try_ms)?;
            out.connect_timeout = ms_or("timeouts.connect", t.connect_ms, DEFAULT_CONNECT_TIMEOUT)?;
            out.idle_timeout = ms_or("timeouts.idle", t.idle_ms, DEFAULT_IDLE_TIMEOUT)?;
            out.stream_idle_timeout = ms("timeouts.stream_idle", t.stream_idle_ms)?;
            if let (Some(per_try), Some(request)) = (out.per_try_timeout, out.request_timeout)
                && per_try > request
            {
                return Err(bad(
                    "timeouts.per_try",
                    "longer than the request timeout, so it could never fire",
                ));
            }
        }
        if let Some(r) = &p.retry {
            out.retry = retry(r)?;
        }
        if let Some(c) = &p.circuit_breaker {
            (out.outlier, out.limits) = circuit_breaker(c)?;
        }
        if let Some(r) = &p.rate_limit {
            out.rate_outbound = rate("rate_limit.outbound", &r.outbound)?;
            out.rate_inbound = rate("rate_limit.inbound", &r.inbound)?;
            out.rate_inbound_per_caller =
                rate("rate_limit.inbound_per_caller", &r.inbound_per_caller)?;
            out.client_header = match r.client_header.as_str() {
                "" => None,
                h => Some(
                    header_name(h)
                        .ok_or_else(|| bad("rate_limit.client_header", "is not a header name"))?,
                ),
            };
            out.rate_global = rate("rate_limit.global", &r.global)?.map(|rate| GlobalRate {
                rate,
                per_caller: r.global_per_caller,
            });
            if r.global_per_caller && out.rate_global.is_none() {
                return Err(bad(
                    "rate_limit.global_per_caller",
                    "set without a global rate",
                ));
            }
        }
        if let Some(lb) = &p.load_balancer {
            out.lb = load_balancer(lb)?;
        }
        if !p.grpc_failures.is_empty() {
            let codes = p
                .grpc_failures
                .iter()
                .map(|c| {
                    mesh_proto::grpc_code(c).ok_or_else(|| {
                        bad(
                            "grpc_failures",
                            format!(
                                "{c:?} is not a gRPC status other than ok (a name such as unavailable, or 1 to 16)"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.grpc_failures = GrpcFailures::of(&codes);
        }
        if let Some(f) = &p.fault {
            out.fault = fault(f)?;
        }
        if let Some(h) = &p.hedge {
            out.hedge = Some(HedgeConfig {
                delay: ms("hedge.delay", h.delay_ms)?,
            });
        }
        if let Some(a) = &p.adaptive_concurrency {
            out.adaptive = Some(adaptive(a)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
