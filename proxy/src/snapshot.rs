//! Dynamic config as immutable values: one `Snapshot` per applied update, swapped atomically and
//! read per request with `ArcSwap::load`. Also the on-demand subscription of services: a
//! request for a service not yet known asks discovery for it and waits (bounded) for the answer.

use crate::FastMap;
use crate::balance::state::EndpointState;
use crate::balance::{Balancer, Endpoint};
use crate::http::router::{MirrorConfig, Router, Rule};
use crate::outbound::pool::Pool;
use crate::outbound::stack::{self, Stack};
use crate::policy::{Policy, PolicyState};
use crate::telemetry::metrics::TargetMetrics;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The route label of requests no rule matched (metrics, debug header).
pub const DEFAULT_ROUTE: &str = "default";
/// How long a request waits for discovery to answer about a service it has not seen yet.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);
/// Most distinct service names a proxy subscribes to (bounds what a confused app can make it do).
pub const MAX_SUBSCRIPTIONS: usize = 5_000;

/// A service's config as pushed: pure values, checked once by `discovery::convert` (with the
/// model the control plane admits with). Nothing in it changes while it is in force.
#[derive(Debug)]
pub struct ServiceConfig {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// SPIFFE identity its endpoints must present.
    pub identity: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    /// The default route's versions and weights.
    pub backends: Vec<(Arc<str>, u32)>,
    pub policy: Policy,
    /// Who may call this service (checked by its own proxies, inbound); None: everyone.
    pub authz: Option<Arc<mesh_authz::Authz>>,
    /// PERMISSIVE mTLS: its proxies also accept plaintext (callers without identity).
    pub mtls_permissive: bool,
    /// The route's rules, sorted by precedence.
    pub router: Router,
    /// Mirroring of the default backends' requests.
    pub mirror: Option<MirrorConfig>,
    /// Virtual IPs (Kubernetes ClusterIPs) and their (port, target app port) pairs.
    pub vips: Vec<std::net::IpAddr>,
    pub vip_ports: Vec<(u16, u16)>,
    /// What the app speaks on its declared ports (undeclared: detected).
    pub app_protocols: mesh_model::AppProtocols,
    /// The other services the route sends to, by the version name their endpoints carry.
    pub backend_services: Vec<BackendService>,
    /// A service outside the mesh: how its addresses are reached (TLS or plaintext) instead
    /// of mesh mTLS.
    pub external: Option<Arc<crate::outbound::external::External>>,
}

/// A service a route sends to, seen by the routed service's proxies as one of its versions:
/// its requests are counted under its own name and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendService {
    pub version: Arc<str>,
    pub service: Arc<str>,
    pub identity: Arc<str>,
    pub subset: Arc<str>,
}

/// A service in force: its config, and the runtime built from it once, eagerly, when the push
/// is applied (balancers, policy state, counters, the policy stacks), carrying over what the
/// previous version of the service learned. Reads of config fields go through `Deref`.
#[derive(Debug)]
pub struct Service {
    pub config: ServiceConfig,
    /// Discovery version of the config.
    pub version: u64,
    /// The default backends' balancer, policy stack and mirror.
    pub balancer: Arc<Balancer>,
    pub stack: Stack,
    pub mirror_balancer: Option<Arc<Balancer>>,
    /// State of the service's policy (rate-limit buckets, retry budget, limits).
    pub state: PolicyState,
    /// Request counters of the default route, per answering version.
    pub metrics: Arc<TargetMetrics>,
    /// The route's rules, each with where it sends (same order as `config.router`).
    pub routes: Router<RoutedRule>,
    /// What the proxy knows of each endpoint, shared by every balancer of the service.
    pub endpoint_states: HashMap<EndpointKey, Arc<EndpointState>>,
}

impl std::ops::Deref for Service {
    type Target = ServiceConfig;

    fn deref(&self) -> &ServiceConfig {
        &self.config
    }
}

pub type EndpointKey = (Arc<str>, SocketAddr);

/// A rule of the route with the runtime it sends to.
#[derive(Debug)]
pub struct RoutedRule {
    pub rule: Rule,
    pub target: Target,
}

impl mesh_model::route::Matches for RoutedRule {
    fn matches(&self) -> &[mesh_model::route::Match] {
        mesh_model::route::Matches::matches(&self.rule)
    }
}

/// Where one rule sends its requests.
#[derive(Debug)]
pub struct Target {
    pub balancer: Arc<Balancer>,
    pub stack: Stack,
    /// The shadow version's endpoints, when the rule mirrors.
    pub mirror_balancer: Option<Arc<Balancer>>,
    /// State of the rule's own policy (None: it uses the service's).
    pub state: Option<PolicyState>,
    /// Request counters of the rule, per answering version.
    pub metrics: Arc<TargetMetrics>,
}

impl Service {
    /// The runtime of `config`: endpoints keep what `previous` (the same service in the
    /// previous snapshot) learned of them (latencies, ejections), and policy states carry over
    /// (retry budget, rate-limit buckets), per rule by the rule's name.
    pub fn build(
        config: ServiceConfig,
        version: u64,
        previous: Option<&Service>,
        pool: &Arc<Pool>,
    ) -> Service {
        let endpoint_states: HashMap<EndpointKey, Arc<EndpointState>> = config
            .endpoints
            .iter()
            .map(|e| {
                let k = (e.id.clone(), e.addr);
                let s = previous
                    .and_then(|o| o.endpoint_states.get(&k).cloned())
                    .unwrap_or_default();
                (k, s)
            })
            .collect();
        let state_of = |e: &Endpoint| {
            endpoint_states
                .get(&(e.id.clone(), e.addr))
                .cloned()
                .unwrap_or_default()
        };
        let endpoints = &config.endpoints;
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
        let (name, identity) = (&config.name, &config.identity);
        let counters = |route: &Arc<str>| {
            Arc::new(TargetMetrics::new(
                (name, identity),
                route,
                versions(),
                &config.backend_services,
            ))
        };
        let mut state = PolicyState::new(&config.policy);
        if let Some(o) = previous {
            state.inherit(&o.state);
        }
        let balancer = Arc::new(Balancer::new(endpoints, &config.backends, state_of));
        let stack = stack::build(
            (name, identity, &config.external),
            &balancer,
            (&config.policy, &state),
            pool,
        );
        let routes = config.router.map(|r| {
            let balancer = if r.backends.is_empty() {
                balancer.clone()
            } else {
                Arc::new(Balancer::new(endpoints, &r.backends, state_of))
            };
            let rule_state = r.policy.as_ref().map(|p| {
                let mut st = PolicyState::new(p);
                let old = previous.and_then(|o| {
                    o.routes
                        .rules
                        .iter()
                        .find(|x| x.rule.name == r.name)?
                        .target
                        .state
                        .as_ref()
                });
                if let Some(old) = old {
                    st.inherit(old);
                }
                st
            });
            let policy = match (&r.policy, &rule_state) {
                (Some(p), Some(s)) => (p, s),
                _ => (&config.policy, &state),
            };
            let stack = stack::build((name, identity, &config.external), &balancer, policy, pool);
            RoutedRule {
                target: Target {
                    stack,
                    mirror_balancer: mirror_of(&r.mirror),
                    state: rule_state,
                    metrics: counters(&r.name),
                    balancer,
                },
                rule: r.clone(),
            }
        });
        Service {
            mirror_balancer: mirror_of(&config.mirror),
            metrics: counters(&Arc::from(DEFAULT_ROUTE)),
            balancer,
            stack,
            state,
            routes,
            endpoint_states,
            version,
            config,
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
    /// The namespace's egress mode is registry-only: destinations outside the registry are
    /// refused rather than passed through.
    pub registry_only: bool,
}

/// See [`Snapshot::app_addrs`].
#[derive(Debug, Clone, Default)]
pub struct AppAddrs {
    pub by_addr: HashMap<SocketAddr, AppTarget>,
    pub by_ip: HashMap<std::net::IpAddr, AppTarget>,
    /// Service virtual IP and port → the service, and the app port the port reaches.
    pub by_vip: HashMap<SocketAddr, (Arc<str>, u16)>,
    /// An external service's addresses, and port 80 of their IPs (where an app calls
    /// `http://<host>`) → the service.
    pub by_external: HashMap<SocketAddr, Arc<str>>,
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
        if s.external.is_some() {
            for e in &s.endpoints {
                m.by_external.insert(e.addr, name.clone());
                m.by_external
                    .entry(SocketAddr::new(e.addr.ip(), 80))
                    .or_insert_with(|| name.clone());
            }
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::v1 as pb;

    fn pool() -> Arc<Pool> {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("CA");
        let tls = crate::tls::TlsContext::new(&ca.cert.pem()).expect("bundle");
        Arc::new(Pool::new(Arc::new(tls)))
    }

    /// Two versions; rule "canary" (header x-canary) sends to v2 under a policy of its own.
    fn config() -> ServiceConfig {
        let ep = |id: &str, port: u32, v: &str| pb::Endpoint {
            id: id.into(),
            address: format!("127.0.0.1:{port}"),
            labels: [("version".to_string(), v.to_string())].into(),
            ready: true,
            ..Default::default()
        };
        let backend = |v: &str| pb::WeightedBackend {
            version: v.into(),
            weight: 1,
            ..Default::default()
        };
        ServiceConfig::try_from(pb::ServiceConfig {
            name: "api".into(),
            namespace: "default".into(),
            identity: "spiffe://mesh.local/ns/default/sa/api".into(),
            endpoints: vec![ep("a", 9001, "v1"), ep("b", 9002, "v2")],
            route: Some(pb::Route {
                backends: vec![backend("v1")],
                rules: vec![pb::RouteRule {
                    name: "canary".into(),
                    matches: vec![pb::RouteMatch {
                        headers: vec![pb::KeyMatch {
                            name: "x-canary".into(),
                            value: None,
                        }],
                        ..Default::default()
                    }],
                    backends: vec![backend("v2")],
                    policy: Some(pb::Policy {
                        retry: Some(pb::Retry {
                            max_retries: 2,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                mirror: None,
            }),
            ..Default::default()
        })
        .expect("valid config")
    }

    #[test]
    fn the_runtime_is_built_once_from_the_config_and_keeps_what_it_learned() {
        let pool = pool();
        let lb = crate::balance::LbConfig::default();
        let first = Service::build(config(), 1, None, &pool);
        // Each rule carries its own target: no joining by index.
        let canary = &first.routes.rules[0];
        assert_eq!(&*canary.rule.name, "canary");
        assert!(canary.target.state.is_some(), "the rule's own policy state");
        let port = |b: &Balancer| b.pick(&lb, None, &[]).map(|p| p.addr.port());
        assert_eq!(port(&canary.target.balancer), Ok(9002));
        assert_eq!(port(&first.balancer), Ok(9001));
        let req = http::Request::get("/")
            .header("x-canary", "1")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        assert_eq!(
            first
                .routes
                .route(&parts.method, &parts.uri, &parts.headers),
            Some(0)
        );

        // The next push: what the endpoints and the policies learned carries over.
        let second = Service::build(config(), 2, Some(&first), &pool);
        let key: EndpointKey = (Arc::from("a"), "127.0.0.1:9001".parse().expect("addr"));
        assert!(Arc::ptr_eq(
            &first.endpoint_states[&key],
            &second.endpoint_states[&key]
        ));
        assert!(Arc::ptr_eq(&first.state.budget, &second.state.budget));
        let budget = |s: &Service| {
            s.routes.rules[0]
                .target
                .state
                .as_ref()
                .map(|st| st.budget.clone())
                .expect("rule state")
        };
        assert!(Arc::ptr_eq(&budget(&first), &budget(&second)));
    }
}
