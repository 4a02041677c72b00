//! Picking an endpoint: weighted split across versions by a precomputed smooth weighted
//! round-robin schedule (exact splits, no randomness, one atomic increment per request), then
//! round robin within the version.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest schedule kept; weights are scaled down past it.
const MAX_SCHEDULE: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub version: Option<Arc<str>>,
    pub ready: bool,
}

#[derive(Debug)]
struct Group {
    version: Option<Arc<str>>,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

/// Immutable per snapshot; shared by all requests.
#[derive(Debug)]
pub struct Balancer {
    groups: Vec<Group>,
    /// Group index per slot.
    schedule: Box<[u16]>,
    cursor: AtomicUsize,
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

impl Balancer {
    /// `backends`: (version, weight). Empty: every ready endpoint, equally. Backends whose
    /// version has no ready endpoint are left out of the schedule, so their share goes to the
    /// others instead of failing.
    pub fn new(endpoints: &[Endpoint], backends: &[(Arc<str>, u32)]) -> Self {
        let ready = endpoints.iter().filter(|e| e.ready);
        let mut groups = Vec::new();
        let mut weights = Vec::new();
        if backends.is_empty() {
            let eps: Vec<Endpoint> = ready.cloned().collect();
            if !eps.is_empty() {
                groups.push(Group {
                    version: None,
                    endpoints: eps,
                    next: AtomicUsize::new(0),
                });
                weights.push(1);
            }
        } else {
            for (version, weight) in backends {
                let eps: Vec<Endpoint> = ready
                    .clone()
                    .filter(|e| e.version.as_deref() == Some(&**version))
                    .cloned()
                    .collect();
                if *weight > 0 && !eps.is_empty() {
                    groups.push(Group {
                        version: Some(version.clone()),
                        endpoints: eps,
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

    /// The next endpoint, or None when no ready endpoint can take the request.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.schedule.is_empty() {
            return None;
        }
        let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        let group = self.groups.get(usize::from(self.schedule[slot]))?;
        let i = group.next.fetch_add(1, Ordering::Relaxed) % group.endpoints.len();
        group.endpoints.get(i)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, port: u16, v: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            version: Some(v.into()),
            ready: true,
        }
    }

    fn split(b: &Balancer, n: usize) -> std::collections::HashMap<String, usize> {
        let mut m = std::collections::HashMap::new();
        for _ in 0..n {
            let e = b.pick().unwrap();
            *m.entry(e.version.as_deref().unwrap_or("").to_string())
                .or_default() += 1;
        }
        m
    }

    #[test]
    fn exact_weighted_split_and_interleaving() {
        let eps = [ep("a", 1, "v1"), ep("b", 2, "v1"), ep("c", 3, "v2")];
        let b = Balancer::new(&eps, &[("v1".into(), 90), ("v2".into(), 10)]);
        let m = split(&b, 1000);
        assert_eq!((m["v1"], m["v2"]), (900, 100));
        // Smooth: v2 never gets two in a row at 90/10.
        let s = schedule(&[90, 10]);
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().filter(|x| **x == 1).count(), 1);
        let s = schedule(&[1, 1]);
        assert_eq!(s, vec![0, 1]);
    }

    #[test]
    fn zero_weight_and_empty_versions_leave_schedule() {
        let eps = [ep("a", 1, "v1"), ep("c", 3, "v2")];
        let b = Balancer::new(&eps, &[("v1".into(), 0), ("v2".into(), 100)]);
        assert_eq!(split(&b, 50)["v2"], 50);
        let b = Balancer::new(&eps, &[("v3".into(), 100)]);
        assert!(b.pick().is_none());
        let mut down = ep("a", 1, "v1");
        down.ready = false;
        let b = Balancer::new(&[down], &[]);
        assert!(b.pick().is_none());
    }

    #[test]
    fn round_robin_within_version() {
        let eps = [ep("a", 1, "v1"), ep("b", 2, "v1")];
        let b = Balancer::new(&eps, &[]);
        let ids: Vec<_> = (0..4).map(|_| b.pick().unwrap().id.to_string()).collect();
        assert_eq!(ids, ["a", "b", "a", "b"]);
    }

    #[test]
    fn large_weights_are_scaled() {
        let s = schedule(&[1_000_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 2);
        assert!(s.contains(&1));
    }
}
