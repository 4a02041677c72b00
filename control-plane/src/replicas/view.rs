//! The mesh as admin answers see it: this replica's own proxies ([`Local`]) merged with what
//! the other replicas on the shared store report ([`crate::replicas::peers`]). A lone replica
//! has no peers and answers from `Local` alone.

use crate::discovery::ProxyTable;
use crate::observe::tap::TapHub;
use crate::observe::telemetry::{Edges, TelemetryStore};
use crate::replicas::peers::Peers;
use futures_util::StreamExt;
use mesh_proto::v1 as pb;
use std::sync::Arc;
use tonic::Status;

pub type TapStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TapEvent, Status>> + Send>>;

/// What this replica holds: the proxies connected to it, their telemetry and tap events.
pub struct Local {
    /// This replica's name (`--replica-id`).
    pub replica: String,
    pub proxies: Arc<ProxyTable>,
    pub telemetry: Arc<TelemetryStore>,
    pub tap: Arc<TapHub>,
    /// Demand on the global rate limits this replica's proxies enforce.
    pub quotas: Arc<crate::discovery::quota::Quotas>,
}

impl Local {
    /// The proxies connected here, by node id.
    pub fn proxies(&self) -> Vec<pb::ProxyInfo> {
        let mut out: Vec<pb::ProxyInfo> = self
            .proxies
            .proxies
            .iter()
            .map(|p| pb::ProxyInfo {
                id: p.node_id.clone(),
                identity: p.identity.clone(),
                service: p.service.clone(),
                version_label: p.version_label.clone(),
                connected_at_unix: p.connected_at_unix,
                acked_version: p.acked_version,
                nacked_version: p.nacked_version,
                nack_reason: p.nack_reason.clone(),
                subscriptions: p.subscriptions.clone(),
                replica: self.replica.clone(),
                proxy_version: p.proxy_version.clone(),
                cert_expires_unix: self.telemetry.cert_expiry(&p.node_id).unwrap_or(0),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Taps `r.service` on this replica's proxies, plus the events of `others` (other
    /// replicas' taps of it), until `r.max_events` were sent, `r.duration_ms` passed, or the
    /// client left.
    pub fn tap(&self, r: pb::TapRequest, others: Vec<tonic::Streaming<pb::TapEvent>>) -> TapStream {
        let (guard, mut events) = self.tap.open(&r.service);
        let mut others = futures_util::stream::select_all(others);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let max = if r.max_events == 0 {
            u64::MAX
        } else {
            u64::from(r.max_events)
        };
        let until = (r.duration_ms > 0)
            .then(|| tokio::time::Instant::now() + std::time::Duration::from_millis(r.duration_ms));
        tokio::spawn(async move {
            let _guard = guard;
            let deadline = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(deadline);
            let mut sent = 0u64;
            let mut others_open = !others.is_empty();
            while sent < max {
                let e = tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) if e.dst_service == r.service => (*e).clone(),
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!(missed = n, "tap client too slow; events skipped");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    e = others.next(), if others_open => match e {
                        Some(Ok(e)) => e,
                        Some(Err(s)) => {
                            tracing::debug!(status = %s, "another replica's tap ended");
                            continue;
                        }
                        None => {
                            others_open = false;
                            continue;
                        }
                    },
                    _ = &mut deadline => break,
                    _ = tx.closed() => break,
                };
                if tx.send(Ok(e)).await.is_err() {
                    break;
                }
                sent += 1;
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// The whole mesh, whichever replica is asked.
pub struct MeshView {
    pub local: Arc<Local>,
    /// The other replicas (None: a lone replica on the embedded store).
    pub peers: Option<Arc<Peers>>,
}

impl MeshView {
    /// Traffic since `since_ms` per (caller, service, version) across every replica, and the
    /// replicas that did not answer. `only` as [`TelemetryStore::edges`].
    pub async fn edges(
        &self,
        since_ms: i64,
        only: Option<(&str, Option<&str>)>,
    ) -> (Edges, Vec<String>) {
        let mut edges = self.local.telemetry.edges(since_ms, only);
        let Some(peers) = &self.peers else {
            return (edges, Vec::new());
        };
        let req = pb::WindowsRequest {
            since_unix_ms: since_ms,
            service: only.map(|(s, _)| s.to_string()).unwrap_or_default(),
            version: only
                .and_then(|(_, v)| v)
                .map(str::to_string)
                .unwrap_or_default(),
        };
        let asked = peers
            .ask(|mut c| {
                let req = req.clone();
                async move { c.windows(req).await }
            })
            .await;
        for a in &asked.answers {
            edges.add_proto(&a.windows);
        }
        (edges, asked.unreachable)
    }

    /// Every connected proxy, by node id, and the replicas that did not answer.
    pub async fn proxies(&self) -> (Vec<pb::ProxyInfo>, Vec<String>) {
        let mut out = self.local.proxies();
        let Some(peers) = &self.peers else {
            return (out, Vec::new());
        };
        let asked = peers
            .ask(|mut c| async move { c.proxies(pb::ListProxiesRequest {}).await })
            .await;
        out.extend(asked.answers.into_iter().flat_map(|a| a.proxies));
        out.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.replica.cmp(&b.replica)));
        (out, asked.unreachable)
    }

    /// Taps a service on every replica's proxies.
    pub async fn tap(&self, r: pb::TapRequest) -> TapStream {
        let others = match &self.peers {
            None => Vec::new(),
            Some(peers) => {
                peers
                    .ask(|mut c| {
                        let r = r.clone();
                        async move { c.tap(r).await }
                    })
                    .await
                    .answers
            }
        };
        self.local.tap(r, others)
    }
}
