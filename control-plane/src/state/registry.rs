//! The registry: services, endpoints, routes and bootstrap tokens, held in memory and written
//! through the store. Every write bumps one revision and wakes the discovery streams through a
//! `watch` channel, so a change reaches proxies without polling.

use crate::ca::spiffe::SpiffeId;
use crate::state::keys::{Key, ServiceKind};
use crate::state::records::*;
use crate::state::store::{Change, Contents, Op, Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Mutex, watch};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Conflict(String),
}

impl From<RegistryError> for tonic::Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(StoreError::Unavailable(m)) => {
                tonic::Status::unavailable(format!("store unavailable: {m}"))
            }
            RegistryError::Store(e) => tonic::Status::internal(e.to_string()),
            RegistryError::NotFound(m) => tonic::Status::not_found(m),
            RegistryError::Invalid(m) => tonic::Status::invalid_argument(m),
            RegistryError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            RegistryError::Conflict(m) => tonic::Status::failed_precondition(m),
        }
    }
}

/// Everything the registry knows, at one revision. Immutable once published.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub revision: u64,
    pub services: BTreeMap<String, ServiceRecord>,
    pub endpoints: BTreeMap<String, BTreeMap<String, EndpointRecord>>,
    pub routes: BTreeMap<String, RouteRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Revoked tokens and identities (`ca::grant`), by key.
    pub revocations: BTreeMap<String, RevocationRecord>,
    /// Resilience policy per service.
    pub policies: BTreeMap<String, PolicyRecord>,
    /// Automated canaries, running or finished (the latest per service).
    pub canaries: BTreeMap<String, CanaryRecord>,
    /// Proxies connected to each control-plane replica (shared stores only).
    pub presence: BTreeMap<String, PresenceRecord>,
    /// Virtual IPs per service (Kubernetes ClusterIPs).
    pub vips: BTreeMap<String, VipRecord>,
    /// Authorization rules per service.
    pub authz: BTreeMap<String, AuthzRecord>,
    /// Default authorization action per namespace (absent: allow-all).
    pub authz_defaults: BTreeMap<String, String>,
    /// Egress mode per namespace (absent: allow-any).
    pub egress: BTreeMap<String, String>,
    /// mTLS mode per service when not strict (absent: strict).
    pub mtls_modes: BTreeMap<String, String>,
    /// App protocols per service declared with meshctl (app port → protocol).
    pub protocols: BTreeMap<String, BTreeMap<u16, String>>,
    /// The mesh's trust domain (for allow-mesh-only).
    pub trust_domain: String,
    /// The trust bundle, and the revision that last changed it.
    pub trust: Option<TrustRecord>,
    pub trust_version: u64,
    /// Revision of the last change touching each service (its record, endpoints or route).
    pub service_versions: HashMap<String, u64>,
    /// When this revision was committed (None for the state loaded at start): push latency
    /// is measured from it.
    pub committed_at: Option<std::time::Instant>,
}

impl State {
    /// The state of a whole store. An entry that does not decode is a corrupt store: reported,
    /// not dropped.
    fn from_contents(
        contents: &Contents,
        trust_domain: &str,
        store: &str,
    ) -> Result<Self, RegistryError> {
        let mut state = State {
            revision: contents.revision,
            trust_domain: trust_domain.to_string(),
            ..State::default()
        };
        for (k, v, rev) in &contents.entries {
            state
                .apply(k, Some(v), *rev)
                .map_err(|reason| StoreError::Corrupt {
                    path: store.to_string(),
                    reason,
                })?;
        }
        // After a (re)load every service starts at the current revision: versions never go back.
        for v in state.service_versions.values_mut() {
            *v = contents.revision;
        }
        state.trust_version = contents.revision;
        Ok(state)
    }

    /// Applies one stored entry (or its deletion when `value` is None).
    fn apply(&mut self, key: &str, value: Option<&[u8]>, rev: u64) -> Result<(), String> {
        fn de<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, String> {
            serde_json::from_slice(v).map_err(|e| format!("key {key}: {e}"))
        }
        fn set<T: serde::de::DeserializeOwned>(
            map: &mut BTreeMap<String, T>,
            name: &str,
            key: &str,
            value: Option<&[u8]>,
        ) -> Result<(), String> {
            match value {
                Some(v) => {
                    map.insert(name.into(), de(key, v)?);
                }
                None => {
                    map.remove(name);
                }
            }
            Ok(())
        }
        let k = Key::parse(key).ok_or_else(|| format!("unknown key {key:?}"))?;
        match k {
            Key::Of(kind, n) => match kind {
                ServiceKind::Service => set(&mut self.services, n, key, value)?,
                ServiceKind::Route => set(&mut self.routes, n, key, value)?,
                ServiceKind::Policy => set(&mut self.policies, n, key, value)?,
                ServiceKind::Canary => set(&mut self.canaries, n, key, value)?,
                ServiceKind::Authz => set(&mut self.authz, n, key, value)?,
                ServiceKind::Mtls => set(&mut self.mtls_modes, n, key, value)?,
                ServiceKind::Vips => set(&mut self.vips, n, key, value)?,
                ServiceKind::Protocols => set(&mut self.protocols, n, key, value)?,
            },
            Key::Endpoint(s, id) => match value {
                Some(v) => {
                    self.endpoints
                        .entry(s.into())
                        .or_default()
                        .insert(id.into(), de(key, v)?);
                }
                None => {
                    if let Some(m) = self.endpoints.get_mut(s) {
                        m.remove(id);
                        if m.is_empty() {
                            self.endpoints.remove(s);
                        }
                    }
                }
            },
            Key::AuthzDefault(ns) => {
                set(&mut self.authz_defaults, ns, key, value)?;
                // Every service of the namespace changes.
                let names: Vec<String> = self
                    .services
                    .iter()
                    .filter(|(_, s)| s.namespace == ns)
                    .map(|(k, _)| k.clone())
                    .collect();
                for n in names {
                    self.service_versions.insert(n, rev);
                }
            }
            Key::TrustBundle => {
                self.trust = value.map(|v| de(key, v)).transpose()?;
                self.trust_version = rev;
            }
            Key::Egress(ns) => set(&mut self.egress, ns, key, value)?,
            Key::Presence(r) => set(&mut self.presence, r, key, value)?,
            Key::Token(h) => set(&mut self.tokens, h, key, value)?,
            Key::Revocation(r) => set(&mut self.revocations, r, key, value)?,
        }
        // A canary's record is the controller's, not the service's config.
        let touched = k
            .service()
            .filter(|_| !matches!(k, Key::Of(ServiceKind::Canary, _)));
        if let Some(s) = touched {
            self.service_versions.insert(s.to_string(), rev);
            // Routes that send to it carry its endpoints: they change too.
            let dependents: Vec<String> = self
                .routes
                .iter()
                .filter(|(k, r)| {
                    k.as_str() != s && crate::state::backends::references(k, &r.current.route, s)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for d in dependents {
                self.service_versions.insert(d, rev);
            }
        }
        Ok(())
    }

    /// Versions (label `version`) that have at least one endpoint.
    pub fn versions_of(&self, service: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .endpoints
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|e| e.version().map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The current route of a service (the default, all endpoints equally, if never set).
    pub fn route_of(&self, service: &str) -> RouteVersion {
        self.routes
            .get(service)
            .map(|r| r.current.clone())
            .unwrap_or(RouteVersion {
                route: Route::default(),
                revision: 0,
                updated_at_unix: 0,
            })
    }
}

/// Checks a route against the service's endpoints before it is stored.
/// (name, namespace) of `service`, which a workload may register or declare only in its own
/// identity's namespace.
fn own_namespace<'a>(
    service: &'a str,
    identity: &SpiffeId,
) -> Result<(&'a str, &'a str), RegistryError> {
    let (name, namespace) = mesh_model::service::split(service);
    if namespace != identity.namespace {
        return Err(RegistryError::PermissionDenied(format!(
            "service {service:?} is in namespace {namespace:?}; identity {identity} is not"
        )));
    }
    Ok((name, namespace))
}

/// The write that creates `service`, whose workloads present `identity`.
fn new_service(
    service: &str,
    (name, namespace): (&str, &str),
    identity: &str,
) -> Result<Op, RegistryError> {
    put(
        Key::Of(ServiceKind::Service, service).to_string(),
        &ServiceRecord {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            external: None,
        },
    )
}

pub fn validate_route(state: &State, service: &str, route: &Route) -> Result<(), RegistryError> {
    if !state.services.contains_key(service) {
        return Err(RegistryError::NotFound(format!(
            "unknown service {service:?}"
        )));
    }
    // The same model the proxies convert with (`mesh-model`), on the route as they get it
    // (other services as versions), plus the versions only the control plane knows.
    let (expanded, backends) = crate::state::backends::expand(service, route);
    let mut versions = state.versions_of(service);
    for b in &backends {
        if !state.services.contains_key(&b.service) {
            return Err(RegistryError::Invalid(format!(
                "backend service {:?} is not a service of the mesh",
                b.service
            )));
        }
        if !b.subset.is_empty() && !state.versions_of(&b.service).contains(&b.subset) {
            return Err(RegistryError::Invalid(format!(
                "backend service {:?} has no version {:?}",
                b.service, b.subset
            )));
        }
        versions.push(b.version.clone());
    }
    let checked =
        mesh_model::Route::try_from(&expanded).map_err(|e| RegistryError::Invalid(e.0))?;
    checked
        .check_versions(service, &versions)
        .map_err(|e| RegistryError::Invalid(e.0))
}

/// The ops that rename every service-keyed entry of a store written before namespaces
/// (`routes/catalog`) to its service's key (`routes/catalog.shop`): the namespace its record
/// names, else `default`. Records keep their content; a canary's `service` is rewritten.
fn namespace_upgrade(contents: &crate::state::store::Contents) -> Vec<Op> {
    let ns_of: HashMap<&str, String> = contents
        .entries
        .iter()
        .filter_map(|(k, v, _)| {
            let Some(Key::Of(ServiceKind::Service, name)) = Key::parse(k) else {
                return None;
            };
            let rec: ServiceRecord = serde_json::from_slice(v).ok()?;
            Some((name, rec.namespace))
        })
        .collect();
    let mut ops = Vec::new();
    for (key, value, _) in &contents.entries {
        let Some(k) = Key::parse(key) else {
            continue;
        };
        let Some(svc) = k.service().filter(|s| !s.contains('.')) else {
            continue;
        };
        let ns = ns_of
            .get(svc)
            .filter(|n| !n.is_empty())
            .map_or(mesh_model::service::DEFAULT_NAMESPACE, String::as_str);
        let abs = format!("{svc}.{ns}");
        let new_key = k.with_service(&abs).to_string();
        let mut value = value.clone();
        if let Key::Of(ServiceKind::Canary, _) = k
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&value)
        {
            v["service"] = serde_json::Value::String(abs.clone());
            value = serde_json::to_vec(&v).unwrap_or(value);
        }
        ops.push(Op::Put(new_key, value));
        ops.push(Op::Delete(key.clone()));
    }
    ops
}

/// In-memory registry written through a [`Store`].
pub struct Registry {
    store: Arc<dyn Store>,
    state: RwLock<Arc<State>>,
    /// Serialises writers so the store and memory apply changes in the same order.
    writer: Mutex<()>,
    changes: watch::Sender<u64>,
    pub trust_domain: String,
    /// A shared store's watch is open (see [`Registry::follow`]).
    store_up: std::sync::atomic::AtomicBool,
}

/// Conflicting writes (another replica first) computed again before giving up.
const MAX_WRITE_ATTEMPTS: u32 = 8;
/// How long a committed write may take to come back on a shared store's watch.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

impl Registry {
    /// Loads the store. An entry that does not decode is a corrupt store: reported, not dropped.
    pub async fn open(store: Arc<dyn Store>, trust_domain: String) -> Result<Self, RegistryError> {
        let mut contents = store.load().await?;
        // Stores written before services had namespaces keep bare names: renamed in place.
        let upgrade = namespace_upgrade(&contents);
        if !upgrade.is_empty() {
            let n = upgrade.len() / 2;
            // Another replica may upgrade the same store first: then its result is loaded.
            let committed = store.commit(contents.revision, upgrade).await;
            contents = store.load().await?;
            if let Err(e) = committed
                && !namespace_upgrade(&contents).is_empty()
            {
                return Err(e.into());
            }
            tracing::info!(keys = n, "store upgraded: services are now name.namespace");
        }
        let state = State::from_contents(&contents, &trust_domain, &store.describe())?;
        let (changes, _) = watch::channel(contents.revision);
        Ok(Self {
            store,
            state: RwLock::new(Arc::new(state)),
            writer: Mutex::new(()),
            changes,
            trust_domain,
            store_up: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The current state (cheap: an `Arc` clone).
    pub fn state(&self) -> Arc<State> {
        match self.state.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Wakes on every committed revision.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Computes ops from the current state, commits them if nobody else committed since that
    /// state, publishes the new state. On a shared store another replica may have committed
    /// first: the write waits until this replica has seen that commit and computes again.
    async fn write<F>(&self, f: F) -> Result<u64, RegistryError>
    where
        F: Fn(&State) -> Result<Vec<Op>, RegistryError>,
    {
        let _w = self.writer.lock().await;
        let mut attempts = 0;
        loop {
            let current = self.state();
            let ops = f(&current)?;
            if ops.is_empty() {
                return Ok(current.revision);
            }
            match self.store.commit(current.revision, ops.clone()).await {
                // The watch delivers our own commit, in order with everyone else's.
                Ok(rev) if self.store.shared() => {
                    self.wait_applied(rev).await?;
                    return Ok(rev);
                }
                Ok(rev) => {
                    self.publish(&current, Change { revision: rev, ops })?;
                    return Ok(rev);
                }
                Err(StoreError::Conflict(newest)) if attempts < MAX_WRITE_ATTEMPTS => {
                    attempts += 1;
                    tracing::debug!(
                        newest,
                        seen = current.revision,
                        "store write conflict; computing again"
                    );
                    self.wait_applied(newest.max(current.revision + 1)).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Applies one commit on top of `current` and makes it the state.
    fn publish(&self, current: &State, change: Change) -> Result<(), RegistryError> {
        let mut next = current.clone();
        next.revision = change.revision;
        next.committed_at = Some(std::time::Instant::now());
        for op in &change.ops {
            let r = match op {
                Op::Put(k, v) => next.apply(k, Some(v), change.revision),
                Op::Delete(k) => next.apply(k, None, change.revision),
            };
            r.map_err(RegistryError::Invalid)?;
        }
        match self.state.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        self.changes.send_replace(change.revision);
        Ok(())
    }

    /// Waits (bounded) until the state includes revision `rev`.
    async fn wait_applied(&self, rev: u64) -> Result<(), RegistryError> {
        let mut rx = self.changes.subscribe();
        match tokio::time::timeout(APPLY_TIMEOUT, rx.wait_for(|r| *r >= rev)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(format!(
                "{}: revision {rev} was committed but has not come back on the watch within {APPLY_TIMEOUT:?}",
                self.store.describe()
            ))
            .into()),
        }
    }

    /// Follows a shared store: applies every commit (this replica's and the others') in the
    /// store's order, reconnecting with backoff, reloading everything if the store's history
    /// was compacted past our revision. Runs until the process ends.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = self.state().revision;
            match self.store.watch(from).await {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(100);
                    self.store_up
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    while let Some(item) = futures_util::StreamExt::next(&mut stream).await {
                        match item {
                            Ok(c) if c.revision <= self.state().revision => {}
                            Ok(c) => {
                                let rev = c.revision;
                                if let Err(e) = self.publish(&self.state(), c) {
                                    tracing::error!(revision = rev, error = %e, "store change not applied");
                                }
                            }
                            Err(StoreError::Compacted(r)) => {
                                tracing::warn!(compacted = r, "store history compacted; reloading");
                                if let Err(e) = self.reload().await {
                                    tracing::warn!(error = %e, "store reload failed");
                                }
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "store watch ended; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "store watch failed; retrying"),
            }
            self.store_up
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Replaces the state with a fresh load of the store.
    async fn reload(&self) -> Result<(), RegistryError> {
        let contents = self.store.load().await?;
        let state = State::from_contents(&contents, &self.trust_domain, &self.store.describe())?;
        let rev = state.revision;
        match self.state.write() {
            Ok(mut g) => *g = Arc::new(state),
            Err(p) => *p.into_inner() = Arc::new(state),
        }
        self.changes.send_replace(rev);
        Ok(())
    }

    /// Whether the store answers (a shared store's watch is open; the file store always).
    pub fn store_up(&self) -> bool {
        !self.store.shared() || self.store_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the store is, for messages.
    pub fn store_name(&self) -> String {
        self.store.describe()
    }

    /// Whether other replicas share the store.
    pub fn shared(&self) -> bool {
        self.store.shared()
    }

    /// Declares a service without an endpoint (a gateway's: its route and policy are set under
    /// it, and its identity is the one its proxies present). As with endpoints, the service is
    /// in the caller's namespace and keeps the identity it was first declared with.
    pub async fn declare_service(
        &self,
        service: &str,
        identity: &SpiffeId,
    ) -> Result<u64, RegistryError> {
        check_name("service", service)?;
        let identity_s = identity.to_string();
        let (name, namespace) = own_namespace(service, identity)?;
        self.write(|st| match st.services.get(service) {
            Some(s) if s.identity == identity_s => Ok(Vec::new()),
            Some(s) => Err(RegistryError::PermissionDenied(format!(
                "service {service:?} has identity {}, not {identity_s}",
                s.identity
            ))),
            None => Ok(vec![new_service(service, (name, namespace), &identity_s)?]),
        })
        .await
    }

    /// Registers (or updates) an endpoint, creating its service on first use. The service's
    /// identity is fixed by its first endpoint; later endpoints must present the same one.
    pub async fn upsert_endpoint(
        &self,
        service: &str,
        identity: &SpiffeId,
        endpoint: EndpointRecord,
    ) -> Result<u64, RegistryError> {
        check_name("service", service)?;
        check_name("endpoint id", &endpoint.id)?;
        endpoint
            .address
            .parse::<std::net::SocketAddr>()
            .map_err(|_| {
                RegistryError::Invalid(format!(
                    "endpoint address {:?} is not ip:port",
                    endpoint.address
                ))
            })?;
        let identity_s = identity.to_string();
        let (name, namespace) = own_namespace(service, identity)?;
        self.write(|st| {
            let mut ops = Vec::new();
            let existing = st.endpoints.get(service).and_then(|m| m.get(&endpoint.id));
            // Another account of the service's namespace is taken for an endpoint the
            // Kubernetes view vouches for: a Service whose pods run under several accounts
            // (the slice names the pod, the pod its account). Anyone else is refused.
            let vouched = endpoint.kubernetes
                || existing.is_some_and(|e| e.kubernetes && e.identity == identity_s);
            let mut endpoint = endpoint.clone();
            match st.services.get(service) {
                Some(s) if s.identity != identity_s && !vouched => {
                    return Err(RegistryError::PermissionDenied(format!(
                        "service {service:?} has identity {}, not {identity_s}",
                        s.identity
                    )));
                }
                Some(s) => {
                    endpoint.identity = if s.identity == identity_s {
                        String::new()
                    } else {
                        identity_s.clone()
                    };
                }
                None => ops.push(new_service(service, (name, namespace), &identity_s)?),
            }
            // A pod's proxy and its EndpointSlice name the same endpoint (one id per pod):
            // a registration keeps the record's place in the Kubernetes view, so it is still
            // removed when the pod leaves the slice.
            endpoint.kubernetes |= existing.is_some_and(|e| e.kubernetes);
            if existing != Some(&endpoint) {
                ops.push(put(
                    Key::Endpoint(service, &endpoint.id).to_string(),
                    &endpoint,
                )?);
            }
            Ok(ops)
        })
        .await
    }

    /// Removes an endpoint; `caller` (when given) must be the service's identity.
    pub async fn remove_endpoint(
        &self,
        service: &str,
        id: &str,
        caller: Option<&SpiffeId>,
    ) -> Result<u64, RegistryError> {
        self.write(|st| {
            if let (Some(c), Some(s)) = (caller, st.services.get(service))
                && s.identity != c.to_string()
            {
                return Err(RegistryError::PermissionDenied(format!(
                    "{c} may not remove endpoints of {service:?}"
                )));
            }
            match st.endpoints.get(service).and_then(|m| m.get(id)) {
                Some(_) => Ok(vec![Op::Delete(Key::Endpoint(service, id).to_string())]),
                None => Err(RegistryError::NotFound(format!(
                    "service {service:?} has no endpoint {id:?}"
                ))),
            }
        })
        .await
    }

    /// Stores a new route for `service`, keeping the previous ones as history.
    pub async fn set_route(
        &self,
        service: &str,
        route: Route,
        validate: bool,
        expected_revision: u64,
    ) -> Result<RouteVersion, RegistryError> {
        let now = now_unix();
        let rev = self
            .write(|st| {
                let current = st.route_of(service).revision;
                if expected_revision != 0 && current != expected_revision {
                    return Err(RegistryError::Conflict(format!(
                        "route of {service:?} changed (now revision {current}, expected \
                         {expected_revision}); read it again"
                    )));
                }
                if validate {
                    validate_route(st, service, &route)?;
                } else if !st.services.contains_key(service) {
                    return Err(RegistryError::NotFound(format!(
                        "unknown service {service:?}"
                    )));
                }
                // The revision is assigned by the commit; it is filled in after.
                let next_rev = st.revision + 1;
                let current = RouteVersion {
                    route: route.clone(),
                    revision: next_rev,
                    updated_at_unix: now,
                };
                let record = match st.routes.get(service) {
                    Some(r) => {
                        let mut history = vec![r.current.clone()];
                        history.extend(r.history.iter().take(ROUTE_HISTORY_LEN - 1).cloned());
                        RouteRecord { current, history }
                    }
                    None => RouteRecord {
                        current,
                        history: Vec::new(),
                    },
                };
                Ok(vec![put(
                    Key::Of(ServiceKind::Route, service).to_string(),
                    &record,
                )?])
            })
            .await?;
        Ok(self
            .state()
            .routes
            .get(service)
            .map(|r| r.current.clone())
            .unwrap_or(RouteVersion {
                route,
                revision: rev,
                updated_at_unix: now,
            }))
    }

    /// Makes the previous route of `service` current again; refused if there is none or if it
    /// no longer fits the service (e.g. a version it names has no endpoints now).
    pub async fn rollback_route(&self, service: &str) -> Result<RouteVersion, RegistryError> {
        let now = now_unix();
        self.write(|st| {
            let rec = st.routes.get(service).ok_or_else(|| {
                RegistryError::NotFound(format!("route of {service:?} was never set"))
            })?;
            let prev = rec.history.first().ok_or_else(|| {
                RegistryError::Invalid(format!("route of {service:?} has no earlier version"))
            })?;
            validate_route(st, service, &prev.route)?;
            let record = RouteRecord {
                current: RouteVersion {
                    route: prev.route.clone(),
                    revision: st.revision + 1,
                    updated_at_unix: now,
                },
                history: std::iter::once(rec.current.clone())
                    .chain(rec.history.iter().skip(1).cloned())
                    .take(ROUTE_HISTORY_LEN)
                    .collect(),
            };
            Ok(vec![put(
                Key::Of(ServiceKind::Route, service).to_string(),
                &record,
            )?])
        })
        .await?;
        Ok(self.state().route_of(service))
    }

    /// Stores a canary's state, and with it (same commit) the route weights `weights` (from,
    /// to) when given. `check` runs against the current state first (refuse to start twice).
    pub async fn put_canary<F>(
        &self,
        rec: CanaryRecord,
        weights: Option<(u32, u32)>,
        check: F,
    ) -> Result<u64, RegistryError>
    where
        F: Fn(&State) -> Result<(), RegistryError>,
    {
        let now = now_unix();
        self.write(|st| {
            check(st)?;
            let mut ops = vec![put(
                Key::Of(ServiceKind::Canary, &rec.service).to_string(),
                &rec,
            )?];
            if let Some((from_w, to_w)) = weights {
                let mut route = st.route_of(&rec.service).route;
                route.backends = vec![
                    mesh_proto::v1::WeightedBackend {
                        version: rec.from.clone(),
                        weight: from_w,
                        ..Default::default()
                    },
                    mesh_proto::v1::WeightedBackend {
                        version: rec.to.clone(),
                        weight: to_w,
                        ..Default::default()
                    },
                ];
                validate_route(st, &rec.service, &route)?;
                let current = RouteVersion {
                    route,
                    revision: st.revision + 1,
                    updated_at_unix: now,
                };
                let record = match st.routes.get(&rec.service) {
                    Some(r) => RouteRecord {
                        history: std::iter::once(r.current.clone())
                            .chain(r.history.iter().cloned())
                            .take(ROUTE_HISTORY_LEN)
                            .collect(),
                        current,
                    },
                    None => RouteRecord {
                        current,
                        history: Vec::new(),
                    },
                };
                ops.push(put(
                    Key::Of(ServiceKind::Route, &rec.service).to_string(),
                    &record,
                )?);
            }
            Ok(ops)
        })
        .await
    }

    /// Writes the per-service record `<prefix>/<service>` made by `record` from the revision it
    /// will be committed at, or deletes it (if `present` says there is one) when `record` is
    /// None. The service must exist.
    async fn set_service_record<T: serde::Serialize>(
        &self,
        kind: ServiceKind,
        service: &str,
        present: fn(&State, &str) -> bool,
        record: Option<impl Fn(u64) -> T>,
    ) -> Result<u64, RegistryError> {
        self.write(|st| {
            if !st.services.contains_key(service) {
                return Err(RegistryError::NotFound(format!(
                    "unknown service {service:?}"
                )));
            }
            let key = Key::Of(kind, service).to_string();
            Ok(match &record {
                // As for routes: the file store's single writer commits exactly this revision.
                Some(make) => vec![put(key, &make(st.revision + 1))?],
                None if present(st, service) => vec![Op::Delete(key)],
                None => Vec::new(),
            })
        })
        .await
    }

    /// Replaces the policy of `service`; an empty policy removes it. Refused if invalid.
    pub async fn set_policy(
        &self,
        service: &str,
        policy: mesh_proto::v1::Policy,
        validate: bool,
    ) -> Result<u64, RegistryError> {
        if validate {
            mesh_model::Policy::try_from(&policy)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        }
        let updated_at_unix = now_unix();
        let record =
            (policy != mesh_proto::v1::Policy::default()).then_some(|revision| PolicyRecord {
                policy: policy.clone(),
                revision,
                updated_at_unix,
            });
        self.set_service_record(
            ServiceKind::Policy,
            service,
            |st, s| st.policies.contains_key(s),
            record,
        )
        .await
    }

    /// Replaces a service's authorization rules (none: removes them). Validated first, the
    /// same way the proxies will read them.
    pub async fn set_authz(
        &self,
        service: &str,
        mut authz: mesh_proto::v1::Authz,
    ) -> Result<u64, RegistryError> {
        authz.default_action.clear();
        authz.trust_domain.clear();
        mesh_authz::Authz::try_from(&authz).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let updated_at_unix = now_unix();
        let record = (!authz.rules.is_empty()).then_some(|revision| AuthzRecord {
            authz: authz.clone(),
            revision,
            updated_at_unix,
        });
        self.set_service_record(
            ServiceKind::Authz,
            service,
            |st, s| st.authz.contains_key(s),
            record,
        )
        .await
    }

    /// Sets a service's mTLS mode: "strict" (stored as no record) or "permissive".
    pub async fn set_mtls_mode(&self, service: &str, mode: &str) -> Result<u64, RegistryError> {
        let permissive = match mode {
            "strict" => false,
            "permissive" => true,
            other => {
                return Err(RegistryError::Invalid(format!(
                    "unknown mTLS mode {other:?}: use strict or permissive"
                )));
            }
        };
        let record = permissive.then_some(|_: u64| "permissive");
        self.set_service_record(
            ServiceKind::Mtls,
            service,
            |st, s| st.mtls_modes.contains_key(s),
            record,
        )
        .await
    }

    /// Declares the protocols of a service's app ports (empty: clears them). Checked by the
    /// model the proxies convert with.
    pub async fn set_app_protocols(
        &self,
        service: &str,
        ports: &[mesh_proto::v1::AppPort],
    ) -> Result<u64, RegistryError> {
        let checked = mesh_model::AppProtocols::try_from(ports)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let map: BTreeMap<u16, String> = checked
            .iter()
            .map(|(p, a)| (p, a.as_str().to_string()))
            .collect();
        let record = (!map.is_empty()).then_some(|_: u64| map.clone());
        self.set_service_record(
            ServiceKind::Protocols,
            service,
            |st, s| st.protocols.contains_key(s),
            record,
        )
        .await
    }

    /// A service's declared app protocols as proxies get them: the Kubernetes Service's
    /// (`appProtocol` or port name), overridden port by port by what meshctl declared.
    pub fn app_protocols(st: &State, service: &str) -> Vec<mesh_proto::v1::AppPort> {
        let mut all: BTreeMap<u16, &str> = BTreeMap::new();
        if let Some(v) = st.vips.get(service) {
            all.extend(v.protocols.iter().map(|(p, a)| (*p, a.as_str())));
        }
        if let Some(m) = st.protocols.get(service) {
            all.extend(m.iter().map(|(p, a)| (*p, a.as_str())));
        }
        all.into_iter()
            .map(|(port, protocol)| mesh_proto::v1::AppPort {
                port: u32::from(port),
                protocol: protocol.to_string(),
            })
            .collect()
    }

    /// A service's mTLS mode.
    pub fn mtls_mode(st: &State, service: &str) -> &'static str {
        if st.mtls_modes.contains_key(service) {
            "permissive"
        } else {
            "strict"
        }
    }

    /// Sets a namespace's default authorization action.
    pub async fn set_authz_default(
        &self,
        namespace: &str,
        action: &str,
    ) -> Result<u64, RegistryError> {
        check_name("namespace", namespace)?;
        let action = mesh_authz::DefaultAction::parse(action)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.write(|_| {
            Ok(vec![put(
                Key::AuthzDefault(namespace).to_string(),
                &action.as_str(),
            )?])
        })
        .await
    }

    /// Sets a namespace's egress mode: `allow-any` (removes the record: the default) or
    /// `registry-only`.
    pub async fn set_egress_mode(&self, namespace: &str, mode: &str) -> Result<u64, RegistryError> {
        check_name("namespace", namespace)?;
        let key = Key::Egress(namespace).to_string();
        match mode {
            "allow-any" => {
                self.write(|st| {
                    Ok(if st.egress.contains_key(namespace) {
                        vec![Op::Delete(key.clone())]
                    } else {
                        Vec::new()
                    })
                })
                .await
            }
            "registry-only" => self.write(|_| Ok(vec![put(key.clone(), &mode)?])).await,
            other => Err(RegistryError::Invalid(format!(
                "egress mode {other:?}: use allow-any or registry-only"
            ))),
        }
    }

    /// Declares (or replaces) a service outside the mesh under its `host` (a DNS name with at
    /// least one dot, so it never reads as a mesh service's `name.namespace`... unless it is
    /// one: a mesh service of that key is refused).
    pub async fn set_external(
        &self,
        host: &str,
        rec: ExternalRecord,
    ) -> Result<u64, RegistryError> {
        let invalid = |m: String| RegistryError::Invalid(m);
        mesh_model::route::HostMatch::parse(host)
            .ok()
            .filter(|h| matches!(h, mesh_model::route::HostMatch::Exact(_)) && host.contains('.'))
            .ok_or_else(|| {
                invalid(format!(
                    "external host {host:?}: a DNS name with a dot, no wildcard"
                ))
            })?;
        if rec.port == 0 {
            return Err(invalid(format!("external {host:?}: port 0")));
        }
        if rec.addresses.is_empty() {
            return Err(invalid(format!("external {host:?}: no address")));
        }
        for a in &rec.addresses {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| invalid(format!("external {host:?}: address {a:?} is not ip:port")))?;
        }
        if rec.tls {
            let pems = [
                ("CA", &rec.ca_pem),
                ("client certificate", &rec.client_cert_pem),
            ];
            for (what, pem) in pems {
                if !pem.is_empty() && !pem.contains("BEGIN CERTIFICATE") {
                    return Err(invalid(format!("external {host:?}: {what} is not PEM")));
                }
            }
            if rec.client_cert_pem.is_empty() != rec.client_key_pem.is_empty() {
                return Err(invalid(format!(
                    "external {host:?}: a client certificate needs its key, and a key its certificate"
                )));
            }
        } else if !rec.ca_pem.is_empty() || !rec.client_cert_pem.is_empty() || !rec.sni.is_empty() {
            return Err(invalid(format!(
                "external {host:?}: CA, SNI and client certificate need --tls"
            )));
        }
        let key = Key::Of(ServiceKind::Service, host).to_string();
        self.write(|st| {
            if let Some(s) = st.services.get(host)
                && s.external.is_none()
            {
                return Err(RegistryError::Invalid(format!(
                    "{host:?} is a mesh service, not an external one"
                )));
            }
            Ok(vec![put(
                key.clone(),
                &ServiceRecord {
                    name: host.into(),
                    namespace: String::new(),
                    identity: String::new(),
                    external: Some(rec.clone()),
                },
            )?])
        })
        .await
    }

    /// Removes an external service (and its route and policy).
    pub async fn remove_external(&self, host: &str) -> Result<u64, RegistryError> {
        self.write(|st| match st.services.get(host) {
            Some(s) if s.external.is_some() => {
                let mut ops = vec![Op::Delete(Key::Of(ServiceKind::Service, host).to_string())];
                if st.routes.contains_key(host) {
                    ops.push(Op::Delete(Key::Of(ServiceKind::Route, host).to_string()));
                }
                if st.policies.contains_key(host) {
                    ops.push(Op::Delete(Key::Of(ServiceKind::Policy, host).to_string()));
                }
                Ok(ops)
            }
            _ => Err(RegistryError::NotFound(format!(
                "no external service {host:?}"
            ))),
        })
        .await
    }

    /// Sets (None: removes) the virtual IPs of an existing service.
    pub async fn set_vips(
        &self,
        service: &str,
        record: Option<VipRecord>,
    ) -> Result<u64, RegistryError> {
        for ip in record.iter().flat_map(|r| &r.ips) {
            ip.parse::<std::net::IpAddr>().map_err(|_| {
                RegistryError::Invalid(format!("virtual IP {ip:?} of {service:?} is not an IP"))
            })?;
        }
        let key = Key::Of(ServiceKind::Vips, service).to_string();
        self.write(|st| {
            if !st.services.contains_key(service) {
                return Err(RegistryError::NotFound(format!(
                    "unknown service {service:?}"
                )));
            }
            replace_record(&key, st.vips.get(service), record.as_ref())
        })
        .await
    }

    /// Records which proxies `replica` has connected (None: forgets the replica).
    pub async fn set_presence(
        &self,
        replica: &str,
        record: Option<PresenceRecord>,
    ) -> Result<u64, RegistryError> {
        let key = Key::Presence(replica).to_string();
        self.write(|st| replace_record(&key, st.presence.get(replica), record.as_ref()))
            .await
    }

    /// Revokes a token (deleted, and its id recorded as revoked, in one commit) so no
    /// certificate descending from it is renewed.
    pub async fn revoke_token(&self, hash: &str, id: &str) -> Result<u64, RegistryError> {
        let record = RevocationRecord {
            revoked_at_ms: crate::state::records::now_unix_ms(),
        };
        let key = Key::Revocation(&crate::state::keys::token_key(id)).to_string();
        self.write(|st| {
            let mut ops = vec![put(key.clone(), &record)?];
            if st.tokens.contains_key(hash) {
                ops.push(Op::Delete(Key::Token(hash).to_string()));
            }
            Ok(ops)
        })
        .await
    }

    /// Revokes an identity: renewals of its certificates issued so far are refused, and its
    /// unused tokens are deleted (in the same commit). Returns when, and how many tokens.
    pub async fn revoke_identity(
        &self,
        id: &crate::ca::spiffe::SpiffeId,
    ) -> Result<(i64, usize), RegistryError> {
        let record = RevocationRecord {
            revoked_at_ms: crate::state::records::now_unix_ms(),
        };
        let key = Key::Revocation(&crate::state::keys::identity_key(id)).to_string();
        let spiffe = id.to_string();
        // The write may run its closure again (a conflicting commit): the last run counts.
        let deleted = std::sync::atomic::AtomicUsize::new(0);
        self.write(|st| {
            let mut ops = vec![put(key.clone(), &record)?];
            let tokens: Vec<Op> = st
                .tokens
                .iter()
                .filter(|(_, t)| t.identity == spiffe)
                .map(|(h, _)| Op::Delete(Key::Token(h).to_string()))
                .collect();
            deleted.store(tokens.len(), std::sync::atomic::Ordering::Relaxed);
            ops.extend(tokens);
            Ok(ops)
        })
        .await?;
        Ok((record.revoked_at_ms, deleted.into_inner()))
    }

    /// Removes a stored token (by its hash).
    pub async fn delete_token(&self, hash: &str) -> Result<u64, RegistryError> {
        self.write(|st| {
            Ok(if st.tokens.contains_key(hash) {
                vec![Op::Delete(Key::Token(hash).to_string())]
            } else {
                Vec::new()
            })
        })
        .await
    }

    /// Publishes the CA's bundle to every proxy (nothing is written when it is unchanged).
    pub async fn set_trust(&self, record: TrustRecord) -> Result<u64, RegistryError> {
        self.write(|st| {
            Ok(if st.trust.as_ref() == Some(&record) {
                vec![]
            } else {
                vec![put(Key::TrustBundle.to_string(), &record)?]
            })
        })
        .await
    }

    /// Stores a token's hash; returns nothing secret.
    pub async fn put_token(&self, hash: String, record: TokenRecord) -> Result<u64, RegistryError> {
        self.write(|_| Ok(vec![put(Key::Token(&hash).to_string(), &record)?]))
            .await
    }
}

/// The ops that make record `key` `new` (None: absent) when it is `current`: none if equal.
fn replace_record<T: serde::Serialize + PartialEq>(
    key: &str,
    current: Option<&T>,
    new: Option<&T>,
) -> Result<Vec<Op>, RegistryError> {
    Ok(match (current, new) {
        (c, Some(r)) if c != Some(r) => vec![put(key.to_string(), r)?],
        (Some(_), None) => vec![Op::Delete(key.to_string())],
        _ => Vec::new(),
    })
}

fn put<T: serde::Serialize>(key: String, v: &T) -> Result<Op, RegistryError> {
    serde_json::to_vec(v)
        .map(|b| Op::Put(key, b))
        .map_err(|e| RegistryError::Invalid(e.to_string()))
}

/// Names used in keys: DNS-label-like, so they never contain `/`.
pub fn check_name(what: &str, s: &str) -> Result<(), RegistryError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "invalid {what} {s:?}: use letters, digits, '-', '.', '_' or ':'"
        )))
    }
}

#[cfg(test)]
mod tests;
