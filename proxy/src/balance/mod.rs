//! Picking an endpoint, in two steps. First the version: the route's weighted split follows a
//! precomputed smooth weighted round-robin schedule (exact splits, one atomic increment).
//! Then the endpoint within the version: P2C over peak-EWMA latency (default), round robin,
//! or consistent hashing on a header; ejected endpoints (`outlier`) are skipped, new ones
//! warm up gently. Nothing here takes a lock: per-endpoint state is atomics.

pub mod outlier;
pub mod state;

use outlier::OutlierConfig;
use state::EndpointState;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest schedule kept; weights are scaled down past it.
const MAX_SCHEDULE: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub version: Option<Arc<str>>,
    pub ready: bool,
    /// The app's own port on `addr`'s IP, when known (transparent interception).
    pub app_port: Option<u16>,
    /// The endpoint's SPIFFE id when not the service's (several service accounts).
    pub identity: Option<Arc<str>>,
}

pub use mesh_model::policy::{Algorithm, LbConfig};

/// One endpoint an attempt went to.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub id: Arc<str>,
    pub version: Option<Arc<str>>,
    /// When it went out, and when and how it ended (a status, or why it failed): each attempt
    /// of a retried request is a span of its own.
    pub start: std::time::SystemTime,
    pub end: Option<(std::time::SystemTime, Result<u16, String>)>,
}

/// Endpoints a request already tried, in order. Set by the retry layer (so a retry goes
/// elsewhere when it can) and by the debug header (so the response can say where it went).
#[derive(Debug, Clone, Default)]
pub struct Tried(Arc<Mutex<Vec<Attempt>>>);

impl Tried {
    pub fn push(&self, p: &Picked) {
        if let Ok(mut v) = self.0.lock() {
            v.push(Attempt {
                addr: p.addr,
                id: p.id.clone(),
                version: p.answered.version.clone(),
                start: std::time::SystemTime::now(),
                end: None,
            });
        }
    }

    /// Records how the last attempt ended: the answer's status, or why there was none.
    pub fn ended(&self, outcome: Result<u16, String>) {
        if let Ok(mut v) = self.0.lock()
            && let Some(last) = v.last_mut()
        {
            last.end = Some((std::time::SystemTime::now(), outcome));
        }
    }
    pub fn list(&self) -> Vec<SocketAddr> {
        self.0
            .lock()
            .map(|v| v.iter().map(|a| a.addr).collect())
            .unwrap_or_default()
    }
    pub fn attempts(&self) -> Vec<Attempt> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Which endpoint answered a request: carried by the answer's body to telemetry (the
/// per-version counters, access logs, spans).
#[derive(Debug)]
pub struct Answered {
    pub version: Option<Arc<str>>,
    pub addr: SocketAddr,
    /// The identity its certificate must name, when not the service's.
    pub identity: Option<Arc<str>>,
    /// The endpoint's counters: the answer's end adds its latency (`EndpointState::answered_in`).
    pub state: Arc<EndpointState>,
}

impl Answered {
    /// The identity the endpoint's certificate must name: its own, else its service's.
    pub fn identity_or<'a>(&'a self, service: &'a Arc<str>) -> &'a Arc<str> {
        self.identity.as_ref().unwrap_or(service)
    }
}

#[derive(Debug)]
struct Member {
    ep: Endpoint,
    /// Handed to each answer from this endpoint (one shared copy, not one per request).
    answered: Arc<Answered>,
    state: Arc<EndpointState>,
    /// For rendezvous hashing.
    hash: u64,
}

#[derive(Debug)]
struct Group {
    version: Option<Arc<str>>,
    members: Vec<Member>,
    next: AtomicUsize,
}

/// Immutable per snapshot (the endpoint states inside live on across snapshots).
#[derive(Debug)]
pub struct Balancer {
    groups: Vec<Group>,
    /// Group index per slot.
    schedule: Box<[u16]>,
    cursor: AtomicUsize,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No ready endpoint in the route.
    NoEndpoints,
    /// Every endpoint is ejected or on probation with its trial request out.
    AllEjected,
}

/// An endpoint chosen for one attempt; report how it went with [`Picked::finish`]. Dropping
/// it unfinished (the request was cancelled) only releases its in-flight count.
#[derive(Debug)]
pub struct Picked {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    /// The endpoint's version and address, shared: what telemetry is told if it answers.
    pub answered: Arc<Answered>,
    state: Arc<EndpointState>,
    trial: bool,
    started: state::Now,
    done: bool,
}

impl Drop for Picked {
    fn drop(&mut self) {
        if !self.done {
            self.state.cancel(self.trial);
        }
    }
}

impl Picked {
    /// The endpoint refused the request at once (429: its share of a rate limit is spent).
    /// Not a failure, and its latency is not recorded: a fast refusal would make the endpoint
    /// look fastest to P2C, which would send it more of what it refuses.
    pub fn refused(mut self) {
        self.done = true;
        self.state.refused();
        self.state.outcome(true, self.trial);
    }

    /// Records the attempt's latency (for EWMA) and outcome (for outlier ejection); true
    /// when it got the endpoint ejected.
    pub fn finish(
        mut self,
        success: bool,
        balancer: &Balancer,
        cfg: Option<&OutlierConfig>,
    ) -> bool {
        self.done = true;
        let now = state::Now::get();
        let rtt = Duration::from_nanos(now.0.saturating_sub(self.started.0));
        self.state.head(now, rtt, success);
        record_outcome(&self.state, &self.id, self.trial, success, balancer, cfg)
    }
}

/// An attempt's outcome, for telemetry and outlier ejection; true when it got the endpoint
/// ejected. Shared by an attempt judged at its head ([`Picked::finish`]) and one judged at
/// its end ([`Verdict::finish`]).
fn record_outcome(
    state: &Arc<EndpointState>,
    id: &Arc<str>,
    trial: bool,
    success: bool,
    balancer: &Balancer,
    cfg: Option<&OutlierConfig>,
) -> bool {
    state.outcome(success, trial);
    cfg.is_some_and(|cfg| outlier::record(balancer, state, success, trial, cfg, id))
}

impl Picked {
    /// The head of the answer is in, but its outcome is not: a gRPC call's status comes in
    /// its trailers. Latency is recorded now (for EWMA); the outcome waits for the returned
    /// [`Verdict`].
    pub fn head_only(mut self) -> Verdict {
        self.done = true;
        let now = state::Now::get();
        let rtt = Duration::from_nanos(now.0.saturating_sub(self.started.0));
        self.state.head(now, rtt, true);
        Verdict {
            id: self.id.clone(),
            state: self.state.clone(),
            trial: self.trial,
            done: false,
        }
    }
}

/// The outcome of an attempt still to be told (see [`Picked::head_only`]). Dropped untold
/// (the caller went away before the end) it counts as a request that did not fail: the
/// endpoint is not to blame.
#[derive(Debug)]
pub struct Verdict {
    pub id: Arc<str>,
    state: Arc<EndpointState>,
    trial: bool,
    done: bool,
}

impl Verdict {
    /// Records the outcome; true when it got the endpoint ejected.
    pub fn finish(
        mut self,
        success: bool,
        balancer: &Balancer,
        cfg: Option<&OutlierConfig>,
    ) -> bool {
        self.done = true;
        record_outcome(&self.state, &self.id, self.trial, success, balancer, cfg)
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if !self.done {
            self.state.outcome(true, self.trial);
        }
    }
}

/// Records a deferred verdict: the endpoint service whose balancer the attempt was picked from.
pub trait Judge: Send + Sync {
    /// The call ended with `status` (None: with none at all, a broken call).
    fn judge(&self, v: Verdict, status: Option<u16>);
}

/// A gRPC answer's verdict waiting for the status in its trailers.
pub struct GrpcPending {
    pub verdict: Verdict,
    pub judge: Arc<dyn Judge>,
}

impl std::fmt::Debug for GrpcPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPending")
            .field("verdict", &self.verdict)
            .finish_non_exhaustive()
    }
}

impl GrpcPending {
    /// The call ended with `status` (None: with no status at all, a broken call).
    pub fn status(self, status: Option<u16>) {
        self.judge.judge(self.verdict, status);
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin (as nginx): the heaviest group goes first, others interleave.
fn schedule(weights: &[u64]) -> Vec<u16> {
    let g = weights
        .iter()
        .copied()
        .filter(|w| *w > 0)
        .fold(0, gcd)
        .max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        w = w
            .iter()
            .map(|x| (x * MAX_SCHEDULE).div_ceil(total))
            .collect();
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of bytes (FNV-1a, then mixed).
pub fn hash_bytes(b: &[u8]) -> u64 {
    mix(b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    }))
}

impl Balancer {
    /// `backends`: (version, weight). Empty: every ready endpoint, equally. Backends whose
    /// version has no ready endpoint are left out of the schedule, so their share goes to the
    /// others instead of failing. `state_of` gives each endpoint its state (kept from the
    /// previous snapshot when the endpoint was already known).
    pub fn new(
        endpoints: &[Endpoint],
        backends: &[(Arc<str>, u32)],
        state_of: impl Fn(&Endpoint) -> Arc<EndpointState>,
    ) -> Self {
        let member = |e: &Endpoint| {
            let state = state_of(e);
            Member {
                hash: hash_bytes(e.id.as_bytes()),
                answered: Arc::new(Answered {
                    version: e.version.clone(),
                    addr: e.addr,
                    identity: e.identity.clone(),
                    state: state.clone(),
                }),
                state,
                ep: e.clone(),
            }
        };
        let ready = endpoints.iter().filter(|e| e.ready);
        let mut groups = Vec::new();
        let mut weights = Vec::new();
        if backends.is_empty() {
            let members: Vec<Member> = ready.map(member).collect();
            if !members.is_empty() {
                groups.push(Group {
                    version: None,
                    members,
                    next: AtomicUsize::new(0),
                });
                weights.push(1);
            }
        } else {
            for (version, weight) in backends {
                let members: Vec<Member> = ready
                    .clone()
                    .filter(|e| e.version.as_deref() == Some(&**version))
                    .map(member)
                    .collect();
                if *weight > 0 && !members.is_empty() {
                    groups.push(Group {
                        version: Some(version.clone()),
                        members,
                        next: AtomicUsize::new(0),
                    });
                    weights.push(u64::from(*weight));
                }
            }
        }
        Self {
            schedule: schedule(&weights).into_boxed_slice(),
            groups,
            cursor: AtomicUsize::new(0),
        }
    }

    fn members(&self) -> impl Iterator<Item = &Member> {
        self.groups.iter().flat_map(|g| g.members.iter())
    }

    /// The state of each endpoint in the schedule, by endpoint id.
    pub fn states(&self) -> impl Iterator<Item = (&Endpoint, &Arc<EndpointState>)> {
        self.members().map(|m| (&m.ep, &m.state))
    }

    /// Picks the endpoint for one attempt. `hash`: the request's hash key (consistent-hash);
    /// `avoid`: endpoints this request already tried.
    pub fn pick(
        &self,
        lb: &LbConfig,
        hash: Option<u64>,
        avoid: &[SocketAddr],
    ) -> Result<Picked, PickError> {
        if self.schedule.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        let first = usize::from(self.schedule[slot]);
        let now = state::Now::get();
        let usable =
            |m: &Member, avoid: &[SocketAddr]| m.state.eligible(now) && !avoid.contains(&m.ep.addr);
        // The scheduled version first; then any version, so ejections or the avoid list cost
        // a little of the split rather than the request.
        let tries = [(Some(first), avoid), (None, avoid), (None, &[][..])];
        for (group, avoid) in tries {
            let picked = match group {
                Some(g) => self
                    .groups
                    .get(g)
                    .and_then(|g| self.choose(g, lb, hash, now, &|m| usable(m, avoid))),
                None => self
                    .groups
                    .iter()
                    .find_map(|g| self.choose(g, lb, hash, now, &|m| usable(m, avoid))),
            };
            if let Some(p) = picked {
                return Ok(p);
            }
        }
        Err(PickError::AllEjected)
    }

    fn choose(
        &self,
        g: &Group,
        lb: &LbConfig,
        hash: Option<u64>,
        now: state::Now,
        usable: &dyn Fn(&Member) -> bool,
    ) -> Option<Picked> {
        let n = g.members.len();
        // A few rounds in case a probation trial is taken between the check and the claim.
        for _ in 0..3 {
            let m = match (lb.algorithm, hash) {
                (Algorithm::ConsistentHash, Some(h)) => g
                    .members
                    .iter()
                    .filter(|m| usable(m))
                    .max_by_key(|m| mix(h ^ m.hash)),
                (Algorithm::RoundRobin, _) => {
                    let start = g.next.fetch_add(1, Ordering::Relaxed);
                    (0..n)
                        .map(|i| &g.members[(start + i) % n])
                        .filter(|m| usable(m))
                        .find(|m| {
                            m.state.warm(now, lb.warmup) >= 1.0
                                || fastrand::f64() < m.state.warm(now, lb.warmup)
                        })
                        .or_else(|| {
                            (0..n)
                                .map(|i| &g.members[(start + i) % n])
                                .find(|m| usable(m))
                        })
                }
                _ => p2c(g, now, lb.warmup, usable),
            }?;
            if let Some(trial) = m.state.admit(now) {
                return Some(Picked {
                    id: m.ep.id.clone(),
                    addr: m.ep.addr,
                    answered: m.answered.clone(),
                    state: m.state.clone(),
                    trial,
                    started: now,
                    done: false,
                });
            }
        }
        None
    }

    /// Versions in the schedule with their share of slots (for /config_dump).
    pub fn shares(&self) -> Vec<(Option<Arc<str>>, usize)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                (
                    g.version.clone(),
                    self.schedule
                        .iter()
                        .filter(|s| usize::from(**s) == i)
                        .count(),
                )
            })
            .collect()
    }
}

/// Power of two choices: two distinct random members, the cheaper one wins.
fn p2c<'a>(
    g: &'a Group,
    now: state::Now,
    warmup: Duration,
    usable: &dyn Fn(&Member) -> bool,
) -> Option<&'a Member> {
    let n = g.members.len();
    let pick = |i: usize| Some(&g.members[i]).filter(|m| usable(m));
    let (a, b) = match n {
        0 => return None,
        1 => return pick(0),
        2 => (0, 1),
        _ => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            (a, b)
        }
    };
    match (pick(a), pick(b)) {
        (Some(x), Some(y)) => {
            if x.state.cost(now, warmup) <= y.state.cost(now, warmup) {
                Some(x)
            } else {
                Some(y)
            }
        }
        (Some(x), None) | (None, Some(x)) => Some(x),
        (None, None) => g.members.iter().find(|m| usable(m)),
    }
}

#[cfg(test)]
mod tests;
