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
}

impl Leadership {
    /// A lone replica: always the leader.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        // Keep the sender alive so `changed` never fails.
        std::mem::forget(tx);
        Self { rx }
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
        Self { rx }
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
