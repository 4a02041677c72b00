//! Resilience policies, one tower layer per module, each applying its part of the pushed
//! `Policy` (the typed config of `mesh-model`) and keeping the state that outlives config
//! updates.
//! The layers are put together, in order, by `outbound::stack`.

pub mod adaptive;
pub mod circuit_breaker;
pub mod fault;
pub mod global;
pub mod hedge;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use std::sync::Arc;

pub use mesh_model::policy::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, GrpcFailures, Policy};

/// Per-service state that outlives config updates: counters and buckets keep counting when a
/// new snapshot replaces the service (see `Service::inherit`).
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    pub budget: Arc<retry::Budget>,
    pub outbound: Arc<rate_limit::Gcra>,
    pub inbound: Arc<rate_limit::Gcra>,
    pub per_caller: Arc<rate_limit::PerKey>,
    /// The rule's recent answer times (the hedge delay) and hedges sent: only where the
    /// policy hedges, so that services without it carry nothing.
    pub recent: Option<Arc<hedge::Recent>>,
    /// This proxy's shares of the service's global limit: only where the policy sets one.
    pub global: Option<Arc<global::GlobalLimits>>,
    /// Rebuilt when the limits change (a semaphore's size is fixed).
    pub limits: Option<Arc<circuit_breaker::Limits>>,
    /// The app's adaptive concurrency limit (the service's own proxy); kept while its config
    /// is unchanged.
    pub adaptive: Option<Arc<adaptive::Adaptive>>,
}

impl PolicyState {
    pub fn new(p: &Policy) -> Self {
        Self {
            limits: p.limits.map(|c| Arc::new(circuit_breaker::Limits::new(c))),
            adaptive: p.adaptive.map(|c| Arc::new(adaptive::Adaptive::new(c))),
            recent: p.hedge.map(|_| Arc::default()),
            global: p.rate_global.map(|_| Arc::default()),
            ..Self::default()
        }
    }

    /// The service's own inbound limits, as its proxy (or its gateway) admits a request: the
    /// caller's bucket (`inbound_per_caller`, keyed by `caller()`, asked only then), then
    /// all callers' (`inbound`). Err: how long until the request would pass.
    pub fn check_inbound(
        &self,
        p: &Policy,
        caller: impl FnOnce() -> Arc<str>,
    ) -> Result<(), std::time::Duration> {
        if let Some(rate) = p.rate_inbound_per_caller {
            self.per_caller.check(&caller(), rate)?;
        }
        if let Some(rate) = p.rate_inbound {
            self.inbound.check(rate)?;
        }
        Ok(())
    }

    /// Keeps `old`'s counters; limits are kept only if their config did not change.
    pub fn inherit(&mut self, old: &PolicyState) {
        self.budget = old.budget.clone();
        self.outbound = old.outbound.clone();
        self.inbound = old.inbound.clone();
        self.per_caller = old.per_caller.clone();
        // Learned latencies and held shares carry over while the feature stays on.
        if self.recent.is_some() && old.recent.is_some() {
            self.recent = old.recent.clone();
        }
        if self.global.is_some() && old.global.is_some() {
            self.global = old.global.clone();
        }
        if let (Some(new), Some(old)) = (&self.limits, &old.limits)
            && new.config() == old.config()
        {
            self.limits = Some(old.clone());
        }
        if let (Some(new), Some(old)) = (&self.adaptive, &old.adaptive)
            && new.config() == old.config()
        {
            self.adaptive = Some(old.clone());
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
