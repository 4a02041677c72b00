//! Golden metrics to the control plane: every interval, the requests, failures and latency
//! buckets this proxy's calls saw per (service, version), taken from the endpoint states and
//! sent on a client-streaming RPC. The control plane judges automated canaries on them.
//! Reports are best effort: while the control plane is away they are dropped, not queued.
//! The same stream carries tap events (see `tap`) and brings back the control plane's
//! directives.

use super::metrics::{Direction, metrics};
use super::tap::{TapEntry, tap};
use crate::balance::state::Stats;
use crate::http::errors::REASONS;
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
    /// For the certificate expiry the dashboard shows.
    pub tls: Arc<crate::tls::TlsContext>,
    pub node_id: String,
    pub interval: Duration,
}

/// Most tap events sent in one report.
const TAP_BATCH: usize = 256;
/// Without traffic, a report still goes out every this many intervals (certificate expiry).
const HEARTBEAT_TICKS: u64 = 10;

fn tap_event(node_id: &str, (d, o): TapEntry) -> pb::TapEvent {
    pb::TapEvent {
        node_id: node_id.to_string(),
        direction: d.direction.as_str().to_string(),
        method: d.method.to_string(),
        authority: d.authority,
        path: d.path,
        status: u32::from(o.status),
        grpc_status: o.grpc.filter(|g| *g != u16::MAX).map_or(-1, i32::from),
        latency_us: o.latency.as_micros() as u64,
        src_identity: match d.direction {
            Direction::Inbound => d.peer.to_string(),
            Direction::Outbound => metrics()
                .local()
                .map_or_else(String::new, |l| l.identity.to_string()),
        },
        dst_identity: match d.direction {
            Direction::Inbound => metrics()
                .local()
                .map_or_else(String::new, |l| l.identity.to_string()),
            Direction::Outbound => d.peer.to_string(),
        },
        dst_service: d.service.to_string(),
        route: d.route.to_string(),
        backend_version: d.version.as_deref().unwrap_or("").to_string(),
        upstream: d.upstream.map(|a| a.to_string()).unwrap_or_default(),
        error: o
            .error
            .map(|i| REASONS.get(i).copied().unwrap_or("other").to_string())
            .unwrap_or_default(),
        start_unix_ms: d
            .start
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as i64),
        trace_id: d.trace_id.unwrap_or_default(),
    }
}

impl TelemetryReporter {
    /// Keeps a stream to the control plane open (reopened at most once per interval), sends
    /// the golden metrics every interval and tap events as they come.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tap_rx = tap().take_receiver();
        let mut stream: Option<mpsc::Sender<pb::TelemetryReport>> = None;
        let mut ticks = 0u64;
        loop {
            let report = tokio::select! {
                _ = tick.tick() => {
                    ticks += 1;
                    if stream.as_ref().is_none_or(|s| s.is_closed()) {
                        stream = self.open().await;
                    }
                    let backends = collect(&self.snapshots);
                    if backends.is_empty() && ticks % HEARTBEAT_TICKS != 1 {
                        continue;
                    }
                    self.report(backends, Vec::new())
                }
                Some(first) = async {
                    match tap_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let mut events = vec![tap_event(&self.node_id, first)];
                    while events.len() < TAP_BATCH {
                        match tap_rx.as_mut().map(|rx| rx.try_recv()) {
                            Some(Ok(e)) => events.push(tap_event(&self.node_id, e)),
                            _ => break,
                        }
                    }
                    self.report(Vec::new(), events)
                }
            };
            // Best effort: a report that finds no open stream (or a full one) is dropped.
            if let Some(tx) = &stream
                && tx.try_send(report).is_err()
            {
                tracing::debug!("telemetry report dropped");
            }
        }
    }

    fn report(
        &self,
        backends: Vec<pb::BackendStats>,
        tap: Vec<pb::TapEvent>,
    ) -> pb::TelemetryReport {
        let (source_service, source_version) = match metrics().local() {
            Some(l) if !l.service.is_empty() => (l.service.to_string(), l.version.to_string()),
            Some(l) => (
                l.identity.rsplit('/').next().unwrap_or("").to_string(),
                String::new(),
            ),
            None => (String::new(), String::new()),
        };
        pb::TelemetryReport {
            node_id: self.node_id.clone(),
            backends,
            tap,
            source_service,
            source_version,
            cert_expires_unix: self.tls.leaf().map_or(0, |l| l.expires_at),
        }
    }

    /// Opens the stream; a task reads the control plane's directives (tap on/off) until it
    /// ends, and turns tapping off then (nobody would receive the events).
    async fn open(&self) -> Option<mpsc::Sender<pb::TelemetryReport>> {
        let channel = match self.control_plane.authenticated_channel().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "telemetry: control plane unreachable");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(16);
        let mut client = pb::telemetry_client::TelemetryClient::new(channel);
        tokio::spawn(async move {
            match client
                .report(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(resp) => {
                    let mut directives = resp.into_inner();
                    while let Ok(Some(d)) = directives.message().await {
                        tap().set(
                            d.tap_services
                                .iter()
                                .map(|s| Arc::from(s.as_str()))
                                .collect(),
                        );
                    }
                }
                Err(e) => tracing::debug!(error = %e, "telemetry stream refused"),
            }
            tap().set(Vec::new());
            tracing::debug!("telemetry stream ended");
        });
        Some(tx)
    }
}
