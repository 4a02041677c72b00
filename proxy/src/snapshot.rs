//! Dynamic config as immutable values: one `Snapshot` per applied update, swapped atomically and
//! read per request with `ArcSwap::load`. Also the on-demand subscription of services: a
//! request for a service not yet known asks discovery for it and waits (bounded) for the answer.

use crate::FastMap;
use crate::balance::state::EndpointState;
use crate::balance::{Balancer, Endpoint};
use crate::http::router::{MirrorConfig, Router, Rule};
use crate::outbound::stack::Stack;
use crate::policy::{Policy, PolicyState};
use crate::telemetry::metrics::TargetMetrics;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The route label of requests no rule matched (metrics, debug header).
pub const DEFAULT_ROUTE: &str = "default";
/// How long a request waits for discovery to answer about a service it has not seen yet.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);
/// Most distinct service names a proxy subscribes to (bounds what a confused app can make it do).
pub const MAX_SUBSCRIPTIONS: usize = 5_000;

/// One service as the proxy uses it.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// SPIFFE identity its endpoints must present.
    pub identity: Arc<str>,
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    pub backends: Vec<(Arc<str>, u32)>,
    /// The default backends' balancer.
    pub balancer: Arc<Balancer>,
    pub policy: Policy,
    pub state: PolicyState,
    /// Who may call this service (checked by its own proxies, inbound); None: everyone.
    pub authz: Option<Arc<mesh_authz::Authz>>,
    /// PERMISSIVE mTLS: its proxies also accept plaintext (callers without identity).
    pub mtls_permissive: bool,
    /// The outbound request stack for the default backends, built on first use (`outbound::stack`).
    pub stack: OnceLock<Stack>,
    /// The route's rules, and per rule (same index) where it sends.
    pub router: Router,
    pub targets: Vec<Target>,
    /// Mirroring of the default backends' requests.
    pub mirror: Option<MirrorConfig>,
    pub mirror_balancer: Option<Arc<Balancer>>,
    /// Request counters of the default route, per answering version.
    pub metrics: Arc<TargetMetrics>,
    /// What the proxy knows of each endpoint, shared by every balancer of the service.
    pub endpoint_states: HashMap<EndpointKey, Arc<EndpointState>>,
    /// Virtual IPs (Kubernetes ClusterIPs) and their (port, target app port) pairs.
    pub vips: Vec<std::net::IpAddr>,
    pub vip_ports: Vec<(u16, u16)>,
    /// What the app speaks on its declared ports (undeclared: detected).
    pub app_protocols: mesh_model::AppProtocols,
}

pub type EndpointKey = (Arc<str>, SocketAddr);

/// Where one rule sends its requests.
#[derive(Debug)]
pub struct Target {
    pub balancer: Arc<Balancer>,
    pub stack: OnceLock<Stack>,
    /// The shadow version's endpoints, when the rule mirrors.
    pub mirror_balancer: Option<Arc<Balancer>>,
    /// State of the rule's own policy (None: it uses the service's).
    pub state: Option<PolicyState>,
    /// Request counters of the rule, per answering version.
    pub metrics: Arc<TargetMetrics>,
}

impl Service {
    /// Builds the default and per-rule balancers over the current endpoints; an endpoint keeps
    /// the state `known` has for it (fresh otherwise).
    pub fn build_balancers(&mut self, known: &HashMap<EndpointKey, Arc<EndpointState>>) {
        self.endpoint_states = self
            .endpoints
            .iter()
            .map(|e| {
                let k = (e.id.clone(), e.addr);
                let s = known.get(&k).cloned().unwrap_or_default();
                (k, s)
            })
            .collect();
        let states = &self.endpoint_states;
        let state_of = |e: &Endpoint| {
            states
                .get(&(e.id.clone(), e.addr))
                .cloned()
                .unwrap_or_default()
        };
        let endpoints = &self.endpoints;
        let mirror_of = |m: &Option<MirrorConfig>| {
            m.as_ref().map(|m| {
                Arc::new(Balancer::new(
                    endpoints,
                    &[(m.version.clone(), 1)],
                    state_of,
                ))
            })
        };
        let versions = || endpoints.iter().filter_map(|e| e.version.as_ref());
        let (name, identity) = (&self.name, &self.identity);
        let counters =
            |route: &Arc<str>| Arc::new(TargetMetrics::new(name, identity, route, versions()));
        self.metrics = counters(&Arc::from(DEFAULT_ROUTE));
        self.balancer = Arc::new(Balancer::new(endpoints, &self.backends, state_of));
        self.mirror_balancer = mirror_of(&self.mirror);
        self.targets = self
            .router
            .rules
            .iter()
            .map(|r| Target {
                balancer: if r.backends.is_empty() {
                    self.balancer.clone()
                } else {
                    Arc::new(Balancer::new(endpoints, &r.backends, state_of))
                },
                stack: OnceLock::new(),
                mirror_balancer: mirror_of(&r.mirror),
                state: r.policy.as_ref().map(PolicyState::new),
                metrics: counters(&r.name),
            })
            .collect();
        self.stack = OnceLock::new();
    }

    /// Carries over what `old` (the same service in the previous snapshot) learned: endpoint
    /// latencies and ejections, retry budget, rate-limit buckets.
    pub fn inherit(&mut self, old: &Service) {
        self.build_balancers(&old.endpoint_states);
        self.state.inherit(&old.state);
        for (rule, target) in self.router.rules.iter().zip(self.targets.iter_mut()) {
            let old_state = old
                .router
                .rules
                .iter()
                .position(|r| r.name == rule.name)
                .and_then(|i| old.targets.get(i)?.state.as_ref());
            if let (Some(new), Some(old)) = (target.state.as_mut(), old_state) {
                new.inherit(old);
            }
        }
    }

    /// The policy and its state for requests of `target` (a rule's own, else the service's).
    pub fn policy_for<'a>(
        &'a self,
        target: Option<(&'a Rule, &'a Target)>,
    ) -> (&'a Policy, &'a PolicyState) {
        match target {
            Some((
                Rule {
                    policy: Some(p), ..
                },
                Target { state: Some(s), .. },
            )) => (p, s),
            _ => (&self.policy, &self.state),
        }
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    /// Control-plane revision of the last applied response.
    pub version: u64,
    pub services: FastMap<Arc<str>, Arc<Service>>,
    /// Names the control plane said do not exist.
    pub missing: HashSet<Arc<str>>,
    /// True once the first response of the control plane was applied.
    pub synced: bool,
    /// Endpoints by their app's own address (IP and app port), and by IP alone, for
    /// connections redirected by transparent interception: where the app was calling.
    pub app_addrs: AppAddrs,
}

/// See [`Snapshot::app_addrs`].
#[derive(Debug, Clone, Default)]
pub struct AppAddrs {
    pub by_addr: HashMap<SocketAddr, AppTarget>,
    pub by_ip: HashMap<std::net::IpAddr, AppTarget>,
    /// Service virtual IP and port → the service, and the app port the port reaches.
    pub by_vip: HashMap<SocketAddr, (Arc<str>, u16)>,
}

/// The service and endpoint an app address belongs to.
#[derive(Debug, Clone)]
pub struct AppTarget {
    pub service: Arc<str>,
    pub identity: Arc<str>,
    /// The endpoint's sidecar (inbound listener).
    pub inbound: SocketAddr,
}

/// Indexes the services' endpoints by app address and by IP.
pub fn app_addrs(services: &FastMap<Arc<str>, Arc<Service>>) -> AppAddrs {
    let mut m = AppAddrs::default();
    for (name, s) in services {
        for e in &s.endpoints {
            let Some(port) = e.app_port else { continue };
            let t = AppTarget {
                service: name.clone(),
                identity: s.identity.clone(),
                inbound: e.addr,
            };
            m.by_ip.insert(e.addr.ip(), t.clone());
            m.by_addr.insert(SocketAddr::new(e.addr.ip(), port), t);
        }
        for ip in &s.vips {
            for &(port, target) in &s.vip_ports {
                m.by_vip
                    .insert(SocketAddr::new(*ip, port), (name.clone(), target));
            }
        }
    }
    m
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("unknown service")]
    Unknown,
    #[error("no answer from discovery")]
    Unavailable,
    #[error("too many distinct services requested")]
    TooMany,
}

/// The current snapshot plus subscription bookkeeping.
pub struct Snapshots {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
    subscribed: DashMap<Arc<str>, ()>,
    subscribe_tx: mpsc::UnboundedSender<Arc<str>>,
}

impl Snapshots {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Arc<str>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (changed, _) = watch::channel(0);
        let s = Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            changed,
            subscribed: DashMap::new(),
            subscribe_tx: tx,
        };
        (Arc::new(s), rx)
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot and wakes waiting requests.
    pub fn store(&self, s: Snapshot) {
        let v = s.version;
        self.current.store(Arc::new(s));
        self.changed.send_replace(v);
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every name subscribed so far (resent after a reconnect).
    pub fn subscriptions(&self) -> Vec<Arc<str>> {
        self.subscribed.iter().map(|e| e.key().clone()).collect()
    }

    /// Subscribes to `name` ahead of any request (e.g. for `--upstream` listeners).
    pub fn subscribe(&self, name: &str) -> Result<(), ResolveError> {
        if self.subscribed.contains_key(name) {
            return Ok(());
        }
        if self.subscribed.len() >= MAX_SUBSCRIPTIONS {
            return Err(ResolveError::TooMany);
        }
        let name: Arc<str> = name.into();
        if self.subscribed.insert(name.clone(), ()).is_none() {
            let _ = self.subscribe_tx.send(name);
        }
        Ok(())
    }

    /// The service for `name`; subscribes and waits up to `DISCOVERY_WAIT` the first time.
    pub async fn resolve(&self, name: &str) -> Result<Arc<Service>, ResolveError> {
        // Bound first, so the snapshot's guard is not held across the wait.
        let known = lookup(&self.current.load(), name);
        match known {
            Some(r) => r,
            // Boxed: rare, and its wait inline would enlarge every request's future.
            None => Box::pin(self.discover(name)).await,
        }
    }

    /// Subscribes to `name` and waits for the control plane to say what it is.
    async fn discover(&self, name: &str) -> Result<Arc<Service>, ResolveError> {
        self.subscribe(name)?;
        self.wait_until(DISCOVERY_WAIT, |snap| lookup(snap, name))
            .await
            .unwrap_or(Err(ResolveError::Unavailable))
    }

    /// Waits (at most `within`) until the snapshot holds `name`, even if the control plane
    /// said it does not exist yet: a proxy's own service, which its registration creates.
    pub async fn wait_for(&self, name: &str, within: std::time::Duration) -> Option<Arc<Service>> {
        let _ = self.subscribe(name);
        self.wait_until(within, |snap| snap.services.get(name).cloned())
            .await
    }

    /// The first answer `f` gives on the current snapshot or a later one, within `within`.
    async fn wait_until<R>(
        &self,
        within: std::time::Duration,
        f: impl Fn(&Snapshot) -> Option<R>,
    ) -> Option<R> {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if let Some(r) = f(&self.current.load()) {
                    return Some(r);
                }
                rx.changed().await.ok()?;
            }
        };
        tokio::time::timeout(within, wait).await.ok().flatten()
    }
}

/// What `snap` says of `name`: the service, known not to exist, or nothing yet.
fn lookup(snap: &Snapshot, name: &str) -> Option<Result<Arc<Service>, ResolveError>> {
    if let Some(svc) = snap.services.get(name) {
        return Some(Ok(svc.clone()));
    }
    snap.missing
        .contains(name)
        .then_some(Err(ResolveError::Unknown))
}
