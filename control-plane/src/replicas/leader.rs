//! Leadership for singleton work (the canary controller, the endpoint-lease sweeper): with
//! several replicas on a shared store exactly one does it at a time. On etcd a replica
//! campaigns in an election whose key is bound to its lease; if it cannot renew that lease in
//! time it steps down before the lease can expire on the server, so two replicas never both
//! believe they lead. A lone replica on the file store always leads.

use etcd_client::Client;
use std::time::Duration;
use tokio::sync::watch;

/// Whether this replica leads, as it changes.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// A lone replica's sender, kept so the value never closes.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A lone replica: always the leader.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            _fixed: Some(std::sync::Arc::new(tx)),
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this replica leads.
    pub async fn acquired(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Campaigns in the etcd election `<prefix>.leader` (beside the store's keys, not among
    /// them) as `id`, with a lease of `ttl`; runs for the life of the process.
    pub fn etcd(client: Client, prefix: &str, id: String, ttl: Duration) -> Self {
        let (tx, rx) = watch::channel(false);
        let name = format!("{}.leader", prefix.trim_end_matches('/'));
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match lead_once(client.clone(), &name, &id, ttl, &tx).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => tracing::warn!(error = %e, "leader election: etcd unavailable"),
                }
                if *tx.borrow() {
                    tracing::warn!(replica = %id, "lost leadership");
                }
                tx.send_replace(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        Self { rx, _fixed: None }
    }
}

/// One term: a lease, a campaign, then renewals until one fails. Returns when this replica
/// no longer leads (or never got to).
async fn lead_once(
    mut client: Client,
    name: &str,
    id: &str,
    ttl: Duration,
    tx: &watch::Sender<bool>,
) -> Result<(), etcd_client::Error> {
    let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(10);
    let lease = client.lease_grant(secs, None).await?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
    let every = ttl / 3;
    let mut campaign_client = client.clone();
    let campaign = campaign_client.campaign(name, id, lease);
    tokio::pin!(campaign);
    // Renew while campaigning (it blocks until this replica is elected).
    let elected = loop {
        tokio::select! {
            r = &mut campaign => break r,
            _ = tokio::time::sleep(every) => {
                if !renew(&mut keeper, &mut acks, every).await {
                    let _ = client.lease_revoke(lease).await;
                    return Ok(());
                }
            }
        }
    };
    if let Err(e) = elected {
        let _ = client.lease_revoke(lease).await;
        return Err(e);
    }
    tracing::info!(replica = %id, "became leader");
    tx.send_replace(true);
    loop {
        tokio::time::sleep(every).await;
        if !renew(&mut keeper, &mut acks, every).await {
            // Step down first: the lease may still be live on the server for up to a third
            // of the TTL, during which nobody leads.
            tx.send_replace(false);
            let _ = client.lease_revoke(lease).await;
            return Ok(());
        }
    }
}

/// Renews the lease once; false when it is gone or no answer came in `within`.
async fn renew(
    keeper: &mut etcd_client::LeaseKeeper,
    acks: &mut etcd_client::LeaseKeepAliveStream,
    within: Duration,
) -> bool {
    let once = async {
        keeper.keep_alive().await?;
        acks.message().await
    };
    matches!(
        tokio::time::timeout(within, once).await,
        Ok(Ok(Some(r))) if r.ttl() > 0
    )
}

impl Leadership {
    /// Holds the `coordination.k8s.io` Lease `namespace/name` as `id`, the way client-go's
    /// leader election does: the holder renews every third of `ttl`; another replica takes
    /// the Lease over only when it has seen the same record, unrenewed, for a whole `ttl` (its
    /// own clock, so clock skew between replicas does not matter). Every write carries the
    /// resourceVersion it read, so two replicas can never both win. Runs for the life of the
    /// process.
    pub fn kubernetes(
        client: kube::Client,
        namespace: &str,
        name: String,
        id: String,
        ttl: Duration,
    ) -> Self {
        let (tx, rx) = watch::channel(false);
        let api =
            kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client, namespace);
        tokio::spawn(async move {
            let mut elector = LeaseElector {
                api,
                name,
                id,
                ttl,
                seen: None,
                renewed: None,
            };
            loop {
                let leading = elector.try_acquire_or_renew().await;
                if leading != *tx.borrow() {
                    if leading {
                        tracing::info!(replica = %elector.id, lease = %elector.name, "became leader");
                    } else {
                        tracing::warn!(replica = %elector.id, lease = %elector.name, "lost leadership");
                    }
                    tx.send_replace(leading);
                }
                tokio::time::sleep(elector.ttl / 3).await;
            }
        });
        Self { rx, _fixed: None }
    }
}

/// What identifies one renewal of a Lease: (holder, renewTime).
type LeaseRecord = (Option<String>, Option<String>);

struct LeaseElector {
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    name: String,
    id: String,
    ttl: Duration,
    /// The other holder's record as last seen, and when it was first seen.
    seen: Option<(LeaseRecord, std::time::Instant)>,
    /// When this replica last renewed successfully.
    renewed: Option<std::time::Instant>,
}

impl LeaseElector {
    /// One round; whether this replica leads afterwards.
    async fn try_acquire_or_renew(&mut self) -> bool {
        use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = i32::try_from(self.ttl.as_secs()).unwrap_or(15);
        let result = match self.api.get_opt(&self.name).await {
            Ok(None) => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.id.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api
                    .create(&kube::api::PostParams::default(), &lease)
                    .await
                    .map(|_| true)
            }
            Ok(Some(mut lease)) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.id.as_str());
                let record = (
                    spec.holder_identity.clone(),
                    spec.renew_time.as_ref().map(|t| t.0.to_string()),
                );
                let wait = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.ttl, Duration::from_secs);
                let expired = match &self.seen {
                    Some((r, since)) if *r == record => since.elapsed() >= wait,
                    _ => {
                        self.seen = Some((record, std::time::Instant::now()));
                        spec.holder_identity.as_deref().is_none_or(str::is_empty)
                    }
                };
                if !mine && !expired {
                    self.renewed = None;
                    return false;
                }
                let mut next = spec;
                if !mine {
                    next.holder_identity = Some(self.id.clone());
                    next.acquire_time = Some(now.clone());
                    next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
                }
                next.lease_duration_seconds = Some(secs);
                next.renew_time = Some(now);
                lease.spec = Some(next);
                // The resourceVersion read above makes this a compare-and-swap.
                self.api
                    .replace(&self.name, &kube::api::PostParams::default(), &lease)
                    .await
                    .map(|_| true)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                self.renewed = Some(std::time::Instant::now());
                self.seen = None;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, lease = %self.name, "Lease not acquired or renewed");
                // Keep leading only while the last renewal is recent enough that the Lease
                // cannot have expired for the others.
                self.renewed.is_some_and(|t| t.elapsed() < self.ttl * 2 / 3)
            }
        }
    }
}
