//! One proxy's discovery stream.

use super::{
    ALL_SERVICES, EGRESS_RESOURCE, ProxyTable, SERVICE_PREFIX, TRUST_RESOURCE, service_config,
};
use crate::observe::metrics::cp_metrics;
use crate::state::registry::Registry;
use mesh_proto::v1 as pb;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// Most resource names one proxy may subscribe to (bounds memory per stream).
const MAX_SUBSCRIPTIONS: usize = 10_000;

pub(super) struct Session {
    registry: Arc<Registry>,
    table: Arc<ProxyTable>,
    id: u64,
    /// The proxy's verified identity: only the services it serves (those with this identity)
    /// come with their authorization rules.
    identity: String,
    /// The proxy's namespace: the names it subscribes to are relative to it (a bare name is
    /// a service of its own namespace, as in a pod's DNS search path).
    namespace: String,
    tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    subscriptions: BTreeSet<String>,
    /// What the proxy was last sent per name: Some(version), or None when sent as removed.
    sent: HashMap<String, Option<u64>>,
    /// Nonce → revision of responses not yet answered, and the commit time of the write that
    /// caused them (None for the first response and resubscriptions: no write to time).
    pending: HashMap<String, (u64, Option<Instant>)>,
    next_nonce: u64,
}

impl Session {
    pub(super) fn new(
        registry: Arc<Registry>,
        table: Arc<ProxyTable>,
        id: u64,
        identity: String,
        tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
    ) -> Self {
        let namespace = crate::ca::spiffe::SpiffeId::parse(&identity)
            .map(|i| i.namespace)
            .unwrap_or_else(|_| mesh_model::service::DEFAULT_NAMESPACE.to_string());
        Self {
            registry,
            table,
            id,
            identity,
            namespace,
            tx,
            subscriptions: BTreeSet::new(),
            sent: HashMap::new(),
            pending: HashMap::new(),
            next_nonce: 0,
        }
    }

    pub(super) async fn run(
        mut self,
        first: pb::DiscoveryRequest,
        mut inbound: Streaming<pb::DiscoveryRequest>,
    ) {
        let mut changes = self.registry.watch();
        changes.borrow_and_update();
        self.handle(first);
        // The first response always goes out, empty or not: it tells the proxy it is in sync.
        let mut ok = self.push(true, false).await;
        while ok {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        let resubscribed = self.handle(m);
                        if resubscribed {
                            ok = self.push(false, false).await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "discovery stream error");
                        break;
                    }
                },
                r = changes.changed() => {
                    if r.is_err() { break; }
                    changes.borrow_and_update();
                    ok = self.push(false, true).await;
                }
            }
        }
        if let Some((_, s)) = self.table.proxies.remove(&self.id) {
            tracing::info!(node = %s.node_id, "proxy disconnected");
        }
    }

    /// Applies (un)subscriptions and ACK/NACK. Returns whether subscriptions grew.
    fn handle(&mut self, m: pb::DiscoveryRequest) -> bool {
        let mut grew = false;
        for name in m.subscribe {
            if self.subscriptions.len() < MAX_SUBSCRIPTIONS && self.subscriptions.insert(name) {
                grew = true;
            }
        }
        for name in m.unsubscribe {
            self.subscriptions.remove(&name);
            self.sent.remove(&name);
        }
        if let Some(mut st) = self.table.proxies.get_mut(&self.id) {
            if !m.response_nonce.is_empty()
                && let Some((rev, committed)) = self.pending.remove(&m.response_nonce)
            {
                if m.error_detail.is_empty() {
                    if let Some(t) = committed {
                        cp_metrics().acked(t.elapsed());
                    }
                    st.acked_version = st.acked_version.max(rev);
                    if st.nacked_version <= rev {
                        st.nacked_version = 0;
                        st.nack_reason.clear();
                    }
                } else {
                    cp_metrics().nacks.inc();
                    tracing::warn!(node = %st.node_id, revision = rev, reason = %m.error_detail, "proxy NACKed config");
                    st.nacked_version = rev;
                    st.nack_reason = m.error_detail;
                }
            }
            if !m.cert_signer.is_empty() && m.cert_signer != st.cert_signer {
                st.cert_signer = m.cert_signer;
            }
            if grew || st.subscriptions.len() != self.subscriptions.len() {
                st.subscriptions = self.subscriptions.iter().cloned().collect();
            }
        }
        grew
    }

    /// Sends what changed since the last push; `timed`: a write caused it (its ACK is timed).
    /// Returns false when the stream is gone.
    async fn push(&mut self, always: bool, timed: bool) -> bool {
        let span = crate::observe::trace::begin();
        let state = self.registry.state();
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        // "service/*" stands for every service there is, and every one sent before (so its
        // removal goes out too); without it the subscriptions are used as they are, uncopied.
        let expanded: BTreeSet<String>;
        let names = if self.subscriptions.contains(ALL_SERVICES) {
            let mut all: BTreeSet<String> = self
                .subscriptions
                .iter()
                .filter(|n| *n != ALL_SERVICES)
                .cloned()
                .collect();
            all.extend(state.services.keys().map(|s| {
                format!(
                    "{SERVICE_PREFIX}{}",
                    mesh_model::service::relative(s, &self.namespace)
                )
            }));
            all.extend(
                self.sent
                    .keys()
                    .filter(|k| k.starts_with(SERVICE_PREFIX))
                    .cloned(),
            );
            expanded = all;
            &expanded
        } else {
            &self.subscriptions
        };
        for name in names {
            let last = self.sent.get(name);
            match current(&state, name, last, &self.identity, &self.namespace) {
                Some((version, kind)) if last != Some(&Some(version)) => {
                    self.sent.insert(name.clone(), Some(version));
                    resources.push(pb::Resource {
                        name: name.clone(),
                        version,
                        kind,
                    });
                }
                None if last != Some(&None) => {
                    self.sent.insert(name.clone(), None);
                    removed.push(name.clone());
                }
                _ => {}
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            return true;
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        let committed = state.committed_at.filter(|_| timed);
        self.pending
            .insert(nonce.clone(), (state.revision, committed));
        cp_metrics().pushes.inc();
        // Bound the bookkeeping if a proxy never answers.
        if self.pending.len() > 64 {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, (r, _))| *r)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                self.pending.remove(&n);
            }
        }
        let (n_resources, n_removed) = (resources.len(), removed.len());
        let resp = pb::DiscoveryResponse {
            version: state.revision,
            nonce,
            resources,
            removed,
        };
        let ok = self.tx.send(Ok(resp)).await.is_ok();
        if let Some(node) = self.table.proxies.get(&self.id).map(|p| p.node_id.clone()) {
            crate::observe::trace::push(span, &node, state.revision, n_resources, n_removed);
        }
        ok
    }
}

/// The current version of a resource and, when the proxy does not have that version yet
/// (`sent`), its content. None: no such resource.
fn current(
    state: &crate::state::registry::State,
    name: &str,
    sent: Option<&Option<u64>>,
    identity: &str,
    namespace: &str,
) -> Option<(u64, Option<pb::resource::Kind>)> {
    let key = name
        .strip_prefix(SERVICE_PREFIX)
        .map(|svc| mesh_model::service::absolute(svc, namespace));
    let version = match &key {
        None if name == TRUST_RESOURCE => state.trust.as_ref().map(|_| state.trust_version)?,
        // One version per mode; absent (allow-any, the default) is "removed".
        None if name == EGRESS_RESOURCE => match state.egress.get(namespace)?.as_str() {
            "registry-only" => 2,
            _ => 1,
        },
        None => return None,
        Some(key) => {
            state.services.get(key)?;
            state
                .service_versions
                .get(key)
                .copied()
                .unwrap_or(state.revision)
        }
    };
    if sent == Some(&Some(version)) {
        return Some((version, None));
    }
    if name == EGRESS_RESOURCE {
        let mode = state.egress.get(namespace)?.clone();
        return Some((
            version,
            Some(pb::resource::Kind::Egress(pb::Egress { mode })),
        ));
    }
    let kind = match (name.strip_prefix(SERVICE_PREFIX), &key) {
        (Some(svc), Some(key)) => {
            let mut c = service_config(state, key)?;
            // Named as the proxy asked: relative to its namespace.
            c.name = svc.to_string();
            // Who may call a service is its own proxies' business: another proxy learning
            // the rules would learn which identities to impersonate. (A service with no
            // identity yet has no proxy of its own: its rules go to whoever asks.)
            if !c.identity.is_empty() && c.identity != identity {
                c.authz = None;
            }
            pb::resource::Kind::Service(c)
        }
        _ => {
            let t = state.trust.as_ref()?;
            pb::resource::Kind::Trust(pb::TrustBundle {
                bundle_pem: t.bundle_pem.clone(),
                signer: t.signer.clone(),
            })
        }
    };
    Some((version, Some(kind)))
}
