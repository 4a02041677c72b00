//! Golden metrics to the control plane: every interval, the requests, failures and latency
//! buckets this proxy's calls saw per (service, version), taken from the endpoint states and
//! sent on a client-streaming RPC. The control plane judges automated canaries on them.
//! Reports are best effort: while the control plane is away they are dropped, not queued.

use crate::balance::state::Stats;
use crate::identity::control_plane::ControlPlane;
use crate::snapshot::Snapshots;
use mesh_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What every endpoint of every known service saw since the last call, by (service, version).
pub fn collect(snapshots: &Snapshots) -> Vec<pb::BackendStats> {
    let snap = snapshots.load();
    let mut by: BTreeMap<(Arc<str>, Arc<str>), Stats> = BTreeMap::new();
    for svc in snap.services.values() {
        for e in &svc.endpoints {
            let Some(state) = svc.endpoint_states.get(&(e.id.clone(), e.addr)) else {
                continue;
            };
            let s = state.take_stats();
            if s.requests == 0 {
                continue;
            }
            let version = e.version.clone().unwrap_or_else(|| "".into());
            by.entry((svc.name.clone(), version)).or_default().add(&s);
        }
    }
    by.into_iter()
        .map(|((service, version), s)| pb::BackendStats {
            service: service.to_string(),
            version: version.to_string(),
            requests: s.requests,
            failures: s.failures,
            latency_buckets: s.latency.to_vec(),
        })
        .collect()
}

pub struct TelemetryReporter {
    pub snapshots: Arc<Snapshots>,
    pub control_plane: Arc<ControlPlane>,
    pub node_id: String,
    pub interval: Duration,
}

impl TelemetryReporter {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream: Option<mpsc::Sender<pb::TelemetryReport>> = None;
        loop {
            tick.tick().await;
            let backends = collect(&self.snapshots);
            if backends.is_empty() {
                continue;
            }
            let report = pb::TelemetryReport {
                node_id: self.node_id.clone(),
                backends,
            };
            let mut report = Some(report);
            // The open stream, or a new one if it ended (one attempt per tick).
            for _ in 0..2 {
                if stream.is_none() {
                    stream = self.open().await;
                }
                let (Some(tx), Some(r)) = (&stream, report.take()) else {
                    break;
                };
                match tx.try_send(r) {
                    Ok(()) => break,
                    Err(e) => {
                        report = Some(e.into_inner());
                        stream = None;
                    }
                }
            }
        }
    }

    async fn open(&self) -> Option<mpsc::Sender<pb::TelemetryReport>> {
        let channel = match self.control_plane.authenticated_channel().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "telemetry: control plane unreachable");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let mut client = pb::telemetry_client::TelemetryClient::new(channel);
        tokio::spawn(async move {
            let r = client
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            tracing::debug!(ok = r.is_ok(), "telemetry stream ended");
        });
        Some(tx)
    }
}
