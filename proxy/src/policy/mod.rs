//! Resilience policies, one tower layer per module, each with its `Config` (built from the
//! pushed `Policy` in `discovery::convert`) and the state it keeps across config updates.
//! The layers are put together, in order, by `http::stack`.

pub mod circuit_breaker;
pub mod fault;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use crate::balance::LbConfig;
use crate::balance::outlier::OutlierConfig;
use std::sync::Arc;
use std::time::Duration;

/// Default TCP + TLS connect timeout to a peer sidecar.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default idle time after which a pooled peer connection is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything a service's policy says, as the proxy applies it. `Default` is "no policy".
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// A request or answer body that moves nothing this long is ended (None: never).
    pub stream_idle_timeout: Option<Duration>,
    pub retry: Option<retry::RetryConfig>,
    pub outlier: Option<OutlierConfig>,
    pub limits: Option<circuit_breaker::LimitsConfig>,
    pub rate_outbound: Option<rate_limit::Rate>,
    pub rate_inbound: Option<rate_limit::Rate>,
    pub rate_inbound_per_caller: Option<rate_limit::Rate>,
    pub lb: LbConfig,
    pub fault: Option<fault::FaultConfig>,
    /// gRPC statuses that count as the server's failure, one bit per code.
    pub grpc_failures: GrpcFailures,
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
            lb: LbConfig::default(),
            fault: None,
            grpc_failures: GrpcFailures::default(),
        }
    }
}

/// Per-service state that outlives config updates: counters and buckets keep counting when a
/// new snapshot replaces the service (see `Service::inherit`).
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    pub budget: Arc<retry::Budget>,
    pub outbound: Arc<rate_limit::Gcra>,
    pub inbound: Arc<rate_limit::Gcra>,
    pub per_caller: Arc<rate_limit::PerKey>,
    /// Rebuilt when the limits change (a semaphore's size is fixed).
    pub limits: Option<Arc<circuit_breaker::Limits>>,
}

impl PolicyState {
    pub fn new(p: &Policy) -> Self {
        Self {
            limits: p.limits.map(|c| Arc::new(circuit_breaker::Limits::new(c))),
            ..Self::default()
        }
    }

    /// Keeps `old`'s counters; limits are kept only if their config did not change.
    pub fn inherit(&mut self, old: &PolicyState) {
        self.budget = old.budget.clone();
        self.outbound = old.outbound.clone();
        self.inbound = old.inbound.clone();
        self.per_caller = old.per_caller.clone();
        if let (Some(new), Some(old)) = (&self.limits, &old.limits)
            && new.config() == old.config()
        {
            self.limits = Some(old.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GrpcFailures;

    #[test]
    fn grpc_failures_by_default_are_the_server_faults() {
        let d = GrpcFailures::default();
        for code in [2, 4, 13, 14, 15] {
            assert!(d.failed(Some(code)), "{code}");
        }
        for code in [0, 1, 3, 5, 7, 8, 12, 16] {
            assert!(!d.failed(Some(code)), "{code}");
        }
        assert!(d.failed(None), "a call that ended without a status failed");
        let only_internal = GrpcFailures::of(&[13]);
        assert!(only_internal.failed(Some(13)) && !only_internal.failed(Some(14)));
    }
}
