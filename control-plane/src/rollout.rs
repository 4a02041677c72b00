//! The canary controller. It moves a service's route weight from a stable version to a new
//! one, step by step. It judges each step on the telemetry the proxies report for the new
//! version: failure percentage and p99 latency, once the step has seen a floor of requests. At
//! the first breached gate it rolls back to 0%, at the end it promotes to 100%. Its state is
//! in the store, written in the same commit as the weights it sets, so a restarted control
//! plane picks up where it was.

use crate::observe::telemetry::{Window, now_ms};
use crate::replicas::view::MeshView;
use crate::state::records::{CanaryRecord, now_unix};
use crate::state::registry::{Registry, RegistryError, State};
use mesh_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;

/// How often running canaries are judged.
pub const TICK: Duration = Duration::from_millis(200);
pub const DEFAULT_MIN_REQUESTS: u32 = 20;
/// Shortest step interval accepted, ms.
pub const MIN_INTERVAL_MS: u32 = 200;

pub const RUNNING: &str = "running";
pub const PAUSED: &str = "paused";
pub const PROMOTED: &str = "promoted";
pub const ROLLED_BACK: &str = "rolled-back";
pub const ABORTED: &str = "aborted";

/// The info message for a record, with what its current step has seen (`w`: the new
/// version's traffic since the step began).
pub fn info(rec: &CanaryRecord, w: &Window) -> pb::CanaryInfo {
    pb::CanaryInfo {
        service: rec.service.clone(),
        from: rec.from.clone(),
        to: rec.to.clone(),
        steps: rec.steps.clone(),
        step_index: rec.step_index as u32,
        state: rec.state.clone(),
        reason: rec.reason.clone(),
        weight: weight_of(rec),
        interval_ms: rec.interval_ms,
        max_error_percent: rec.max_error_percent,
        max_p99_ms: rec.max_p99_ms,
        min_requests: rec.min_requests,
        step_requests: w.requests,
        step_error_percent: w.error_percent(),
        step_p99_ms: w.p99_ms().unwrap_or(0),
        updated_at_unix: rec.updated_at_unix,
    }
}

/// The weight of `to` the record stands at.
fn weight_of(rec: &CanaryRecord) -> u32 {
    match rec.state.as_str() {
        ROLLED_BACK | ABORTED => 0,
        PROMOTED => 100,
        _ => rec.steps.get(rec.step_index).copied().unwrap_or(0),
    }
}

fn bad(m: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(m.into())
}

/// Checks a start request against the registry and builds the first record.
pub fn plan(st: &State, r: &pb::StartCanaryRequest) -> Result<CanaryRecord, RegistryError> {
    if !st.services.contains_key(&r.service) {
        return Err(RegistryError::NotFound(format!(
            "unknown service {:?}",
            r.service
        )));
    }
    let versions = st.versions_of(&r.service);
    if !versions.contains(&r.to) {
        return Err(bad(format!(
            "unknown version {:?} (known: {})",
            r.to,
            versions.join(", ")
        )));
    }
    let from = if r.from.is_empty() {
        st.route_of(&r.service)
            .route
            .backends
            .iter()
            .filter(|b| b.version != r.to)
            .max_by_key(|b| b.weight)
            .map(|b| b.version.clone())
            .or_else(|| versions.iter().find(|v| **v != r.to).cloned())
            .ok_or_else(|| bad("no stable version to shift from: give --from"))?
    } else {
        r.from.clone()
    };
    if from == r.to || !versions.contains(&from) {
        return Err(bad(format!(
            "--from {from:?} must be another known version"
        )));
    }
    let steps_ok = !r.steps.is_empty()
        && r.steps.windows(2).all(|w| w[0] < w[1])
        && r.steps.first().is_some_and(|s| *s > 0)
        && r.steps.last() == Some(&100);
    if !steps_ok {
        return Err(bad(
            "steps must rise from above 0 to exactly 100, e.g. 5,25,50,100",
        ));
    }
    if r.interval_ms < MIN_INTERVAL_MS {
        return Err(bad(format!(
            "interval must be at least {MIN_INTERVAL_MS} ms"
        )));
    }
    if !(0.0..=100.0).contains(&r.max_error_percent) {
        return Err(bad("max error rate must be a percentage"));
    }
    if let Some(c) = st.canaries.get(&r.service)
        && (c.state == RUNNING || c.state == PAUSED)
    {
        return Err(RegistryError::Conflict(format!(
            "a canary of {:?} to {} is already {}",
            r.service, c.to, c.state
        )));
    }
    Ok(CanaryRecord {
        service: r.service.clone(),
        from,
        to: r.to.clone(),
        steps: r.steps.clone(),
        step_index: 0,
        state: RUNNING.into(),
        reason: String::new(),
        interval_ms: r.interval_ms,
        max_error_percent: r.max_error_percent,
        max_p99_ms: r.max_p99_ms,
        min_requests: if r.min_requests == 0 {
            DEFAULT_MIN_REQUESTS
        } else {
            r.min_requests
        },
        step_started_ms: now_ms(),
        updated_at_unix: now_unix(),
    })
}

/// Starts a canary: the first step's weights and the record, in one commit.
pub async fn start(
    registry: &Registry,
    r: &pb::StartCanaryRequest,
) -> Result<CanaryRecord, RegistryError> {
    let rec = plan(&registry.state(), r)?;
    let w = weight_of(&rec);
    let req = r.clone();
    registry
        .put_canary(rec.clone(), Some((100 - w, w)), move |st| {
            plan(st, &req).map(|_| ())
        })
        .await?;
    tracing::info!(service = %rec.service, to = %rec.to, weight = w, "canary started");
    Ok(rec)
}

/// pause / resume / abort.
pub async fn act(
    registry: &Registry,
    service: &str,
    action: &str,
) -> Result<CanaryRecord, RegistryError> {
    let mut rec = registry
        .state()
        .canaries
        .get(service)
        .cloned()
        .ok_or_else(|| RegistryError::NotFound(format!("no canary for {service:?}")))?;
    let live = rec.state == RUNNING || rec.state == PAUSED;
    let weights = match (action, live) {
        ("pause", true) => {
            rec.state = PAUSED.into();
            None
        }
        ("resume", true) => {
            rec.state = RUNNING.into();
            rec.step_started_ms = now_ms();
            None
        }
        ("abort", true) => {
            rec.state = ABORTED.into();
            rec.reason = "aborted by an operator".into();
            Some((100, 0))
        }
        ("pause" | "resume" | "abort", false) => {
            return Err(RegistryError::Conflict(format!(
                "the canary of {service:?} is already {}",
                rec.state
            )));
        }
        (other, _) => {
            return Err(bad(format!(
                "unknown action {other:?} (pause, resume, abort)"
            )));
        }
    };
    rec.updated_at_unix = now_unix();
    registry
        .put_canary(rec.clone(), weights, |_| Ok(()))
        .await?;
    tracing::info!(%service, action, "canary {}", rec.state);
    Ok(rec)
}

/// What a tick decides for one running canary.
#[derive(Debug, PartialEq)]
enum Verdict {
    Hold(Option<String>),
    RollBack(String),
    Advance,
}

/// Judges a step on `w`, what the new version received since the step began.
fn judge(rec: &CanaryRecord, w: &Window, now: i64) -> Verdict {
    let weight = weight_of(rec);
    if w.requests >= u64::from(rec.min_requests) {
        let err = w.error_percent();
        if err > rec.max_error_percent {
            return Verdict::RollBack(format!(
                "step {} ({weight}%): error rate {err:.1}% > max {}% over {} requests",
                rec.step_index + 1,
                rec.max_error_percent,
                w.requests
            ));
        }
        if rec.max_p99_ms > 0
            && let Some(p99) = w.p99_ms().filter(|p| *p > rec.max_p99_ms)
        {
            return Verdict::RollBack(format!(
                "step {} ({weight}%): p99 {} > max {} ms over {} requests",
                rec.step_index + 1,
                if p99 == u32::MAX {
                    "over 5000 ms".to_string()
                } else {
                    format!("≤ {p99} ms")
                },
                rec.max_p99_ms,
                w.requests
            ));
        }
    }
    if now - rec.step_started_ms < i64::from(rec.interval_ms) {
        return Verdict::Hold(None);
    }
    if w.requests < u64::from(rec.min_requests) {
        return Verdict::Hold(Some(format!(
            "waiting for traffic: fewer than {} requests to {} this step",
            rec.min_requests, rec.to
        )));
    }
    Verdict::Advance
}

/// One pass over the running canaries. A step is judged on every replica's telemetry; while
/// a live replica does not answer, the canary holds rather than judge on part of the traffic.
pub async fn tick(registry: &Registry, view: &MeshView) {
    let st = registry.state();
    for rec in st.canaries.values().filter(|c| c.state == RUNNING) {
        let (edges, unreachable) = view
            .edges(rec.step_started_ms, Some((&rec.service, Some(&rec.to))))
            .await;
        let now = now_ms();
        let mut next = rec.clone();
        next.updated_at_unix = now_unix();
        let verdict = if unreachable.is_empty() {
            judge(rec, &edges.window(&rec.service, &rec.to), now)
        } else {
            Verdict::Hold(Some(format!(
                "waiting for the telemetry of replica {}",
                unreachable.join(", ")
            )))
        };
        let weights = match verdict {
            Verdict::Hold(reason) => {
                match reason {
                    Some(r) if r != rec.reason => next.reason = r,
                    _ => continue,
                }
                None
            }
            Verdict::RollBack(reason) => {
                tracing::warn!(service = %rec.service, %reason, "canary rolled back");
                next.state = ROLLED_BACK.into();
                next.reason = reason;
                Some((100, 0))
            }
            Verdict::Advance if rec.step_index + 1 >= rec.steps.len() => {
                tracing::info!(service = %rec.service, to = %rec.to, "canary promoted");
                next.state = PROMOTED.into();
                next.reason = format!("all {} steps passed", rec.steps.len());
                Some((0, 100))
            }
            Verdict::Advance => {
                next.step_index += 1;
                next.step_started_ms = now;
                next.reason = String::new();
                let w = weight_of(&next);
                tracing::info!(service = %rec.service, weight = w, "canary step");
                Some((100 - w, w))
            }
        };
        let service = rec.service.clone();
        let expected = (rec.step_index, rec.state.clone());
        let r = registry
            .put_canary(next, weights, move |st| {
                // Only if nobody (an operator, another tick) changed it meanwhile.
                match st.canaries.get(&service) {
                    Some(c) if (c.step_index, c.state.clone()) == expected => Ok(()),
                    _ => Err(RegistryError::Conflict("canary changed meanwhile".into())),
                }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "canary step not applied");
        }
    }
}

/// Runs the controller until the process ends.
/// Only the leading replica moves canaries; the others wait.
pub async fn run(
    registry: Arc<Registry>,
    view: Arc<MeshView>,
    leader: crate::replicas::leader::Leadership,
) {
    let mut t = tokio::time::interval(TICK);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        if leader.is_leader() {
            tick(&registry, &view).await;
        } else {
            leader.acquired().await;
        }
    }
}
