//! THE outbound request stack, for one service's config: every policy layer in order, top to
//! bottom. A layer whose policy is not set passes requests straight through (no allocation),
//! so a service without a policy costs what the bare endpoint call costs.

use super::endpoint::{Endpoint, EndpointService};
use super::external::External;
use super::pool::Pool;
use crate::balance::Balancer;
use crate::policy::circuit_breaker::{Limit, LimitsLayer};
use crate::policy::fault::{Fault, FaultLayer};
use crate::policy::rate_limit::{RateLimit, RateLimitLayer};
use crate::policy::retry::{Hedging, Retry, RetryLayer};
use crate::policy::timeout::{Timeout, TimeoutLayer};
use crate::policy::{Policy, PolicyState};
use std::sync::Arc;
use tower::ServiceBuilder;

/// The policy layers over an inner service, outermost first.
pub type Policies<S> = RateLimit<Fault<Timeout<Limit<Retry<Timeout<S>>>>>>;
/// The stack's type (nameable, so services can keep it without boxing).
pub type Stack = Policies<EndpointService>;

/// Builds the stack for a service's current config (`service`, whose endpoints present
/// `identity`), sending to `balancer` (the default backends' or a rule's). Layer state
/// (buckets, budget, limits, endpoint stats) lives in the service's policy state and the
/// endpoint states, so rebuilding on a config change keeps it.
/// What an endpoint service sends to: the service, the identity its endpoints present, and
/// for a service outside the mesh how it is reached.
pub type Dest<'a> = (&'a Arc<str>, &'a Arc<str>, &'a Option<Arc<External>>);

pub fn build(
    dest: Dest<'_>,
    balancer: &Arc<Balancer>,
    (p, state): (&Policy, &PolicyState),
    pool: &Arc<Pool>,
) -> Stack {
    let service = dest.0;
    policies(
        p,
        state,
        // Pick an endpoint (P2C / RR / hash, skipping ejected ones), send over pooled mTLS h2.
        EndpointService(Arc::new(Endpoint {
            outlier: p.outlier,
            ejections: p
                .outlier
                .map(|_| crate::telemetry::metrics::metrics().ejections(service)),
            ..endpoint_config(dest, balancer, p, pool)
        })),
    )
}

/// The bare endpoint service to `balancer` under policy `p`'s balancing and connection
/// settings, without outlier recording (mirror copies use it as is: no policies, no retries,
/// and no lookup of counters per copy).
pub fn endpoint(
    dest: Dest<'_>,
    balancer: &Arc<Balancer>,
    p: &Policy,
    pool: &Arc<Pool>,
) -> EndpointService {
    EndpointService(Arc::new(endpoint_config(dest, balancer, p, pool)))
}

/// What `endpoint` shares, without outlier recording.
fn endpoint_config(
    (service, identity, external): Dest<'_>,
    balancer: &Arc<Balancer>,
    p: &Policy,
    pool: &Arc<Pool>,
) -> Endpoint {
    Endpoint {
        external: external.clone(),
        service: service.clone(),
        identity: identity.clone(),
        balancer: balancer.clone(),
        lb: p.lb.clone(),
        outlier: None,
        grpc_failures: p.grpc_failures,
        connect_timeout: p.connect_timeout,
        idle_timeout: p.idle_timeout,
        pool: pool.clone(),
        ejections: None,
    }
}

/// The policy layers of `p` over `inner` (also used alone by the benchmarks).
pub fn policies<S>(p: &Policy, state: &PolicyState, inner: S) -> Policies<S> {
    ServiceBuilder::new()
        // Refuse over-rate calls first, before any work: 429 + retry-after.
        .layer(RateLimitLayer::new(p.rate_outbound, state.outbound.clone()))
        // Chaos: delay and/or abort a share of requests (off unless configured).
        .layer(FaultLayer(p.fault))
        // Deadline of the whole request, retries included; the client's grpc-timeout if shorter.
        .layer(TimeoutLayer::request(p.request_timeout))
        // Circuit breaker limits: in-flight and queued requests; past them a fast 503.
        .layer(LimitsLayer(state.limits.clone()))
        // Retries within the budget, idempotency-aware, body replayed from a bounded copy.
        // Hedges of idempotent requests slower than the rule's p95 (or set delay), same budget.
        .layer(RetryLayer::new(
            p.retry.clone(),
            p.hedge
                .zip(state.recent.clone())
                .map(|(cfg, recent)| Hedging { cfg, recent }),
            state.budget.clone(),
        ))
        // Deadline of each attempt.
        .layer(TimeoutLayer::per_try(p.per_try_timeout))
        .service(inner)
}
