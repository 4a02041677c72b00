//! The proxies' golden metrics, as they report them (`mesh.v1.Telemetry`), kept in memory for a
//! few minutes per (service, version) so the canary controller can judge a time window.
//! Lost on restart by design: a resumed canary judges its current step on fresh data.

use crate::discovery::peer_identity;
use mesh_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// How long samples are kept, milliseconds.
pub const RETENTION_MS: i64 = 5 * 60 * 1000;
const BUCKETS: usize = mesh_proto::LATENCY_BUCKETS_MS.len() + 1;

/// Requests, failures and latency over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub failures: u64,
    pub latency: [u64; BUCKETS],
}

impl Window {
    pub fn error_percent(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 * 100.0 / self.requests as f64
        }
    }

    /// The upper bound of the bucket holding the 99th percentile, ms (None: no data; u32::MAX:
    /// slower than the last bound).
    pub fn p99_ms(&self) -> Option<u32> {
        self.quantile_ms(99)
    }

    /// The upper bound of the bucket holding the `pct`th percentile, ms (as `p99_ms`).
    pub fn quantile_ms(&self, pct: u64) -> Option<u32> {
        let n: u64 = self.latency.iter().sum();
        if n == 0 {
            return None;
        }
        let target = (n * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(
                    mesh_proto::LATENCY_BUCKETS_MS
                        .get(i)
                        .map_or(u32::MAX, |b| *b as u32),
                );
            }
        }
        Some(u32::MAX)
    }
}

type Key = (String, String);

impl Window {
    /// Adds another window's counts (windows from several proxies or replicas merge exactly:
    /// the buckets are counts, not quantiles).
    pub fn merge(&mut self, w: &Window) {
        self.requests += w.requests;
        self.failures += w.failures;
        for (a, b) in self.latency.iter_mut().zip(w.latency.iter()) {
            *a += b;
        }
    }
}

/// Traffic per (caller, service, version) over a window, from one replica's store or merged
/// from several.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Edges(BTreeMap<(Source, String, String), Window>);

impl Edges {
    pub fn add(&mut self, source: Source, service: &str, version: &str, w: &Window) {
        self.0
            .entry((source, service.to_string(), version.to_string()))
            .or_default()
            .merge(w);
    }

    /// Each edge: (caller, service, version, window), sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&Source, &str, &str, &Window)> {
        self.0
            .iter()
            .map(|((src, s, v), w)| (src, s.as_str(), v.as_str(), w))
    }

    /// Every (service, version) with requests, whoever called, sorted.
    pub fn by_version(&self) -> Vec<(String, String, Window)> {
        let mut out: BTreeMap<(&str, &str), Window> = BTreeMap::new();
        for (_, s, v, w) in self.iter() {
            out.entry((s, v)).or_default().merge(w);
        }
        out.into_iter()
            .filter(|(_, w)| w.requests > 0)
            .map(|((s, v), w)| (s.to_string(), v.to_string(), w))
            .collect()
    }

    /// Everything `service`/`version` received.
    pub fn window(&self, service: &str, version: &str) -> Window {
        let mut out = Window::default();
        for (_, _, _, w) in self
            .iter()
            .filter(|(_, s, v, _)| *s == service && *v == version)
        {
            out.merge(w);
        }
        out
    }

    pub fn to_proto(&self) -> Vec<pb::EdgeWindow> {
        self.iter()
            .map(|((ss, sv), s, v, w)| pb::EdgeWindow {
                source_service: ss.clone(),
                source_version: sv.clone(),
                service: s.to_string(),
                version: v.to_string(),
                requests: w.requests,
                failures: w.failures,
                latency_buckets: w.latency.to_vec(),
            })
            .collect()
    }

    /// Adds a peer replica's windows.
    pub fn add_proto(&mut self, windows: &[pb::EdgeWindow]) {
        for e in windows {
            let mut w = Window {
                requests: e.requests,
                failures: e.failures.min(e.requests),
                ..Window::default()
            };
            for (a, b) in w.latency.iter_mut().zip(&e.latency_buckets) {
                *a = *b;
            }
            let src = (e.source_service.clone(), e.source_version.clone());
            self.add(src, &e.service, &e.version, &w);
        }
    }
}

/// A calling workload: its service and version (the dashboard's edge source).
pub type Source = (String, String);

/// One report's counts: (received at, unix ms; who called; what it counted).
type Sample = (i64, Arc<Source>, Window);

/// Samples per (service, version).
#[derive(Debug, Default)]
pub struct TelemetryStore {
    samples: Mutex<HashMap<Key, VecDeque<Sample>>>,
    /// Certificate expiry per proxy node id, unix seconds, as last reported.
    cert_expiry: Mutex<HashMap<String, i64>>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl TelemetryStore {
    pub fn record(&self, s: &pb::BackendStats, at_ms: i64, source: &Arc<Source>) {
        let mut w = Window {
            requests: s.requests,
            failures: s.failures.min(s.requests),
            ..Window::default()
        };
        for (a, b) in w.latency.iter_mut().zip(&s.latency_buckets) {
            *a = *b;
        }
        let Ok(mut m) = self.samples.lock() else {
            return;
        };
        let q = m.entry((s.service.clone(), s.version.clone())).or_default();
        q.push_back((at_ms, source.clone(), w));
        while q.front().is_some_and(|(t, _, _)| *t < at_ms - RETENTION_MS) {
            q.pop_front();
        }
    }

    /// Traffic at or after `since_ms` per (caller, service, version): the topology's edges.
    /// `only`: one service (absolute name), and one version of it if given.
    pub fn edges(&self, since_ms: i64, only: Option<(&str, Option<&str>)>) -> Edges {
        let mut out = Edges::default();
        let Ok(m) = self.samples.lock() else {
            return out;
        };
        let wanted =
            |(s, v): &Key| only.is_none_or(|(os, ov)| os == s && ov.is_none_or(|ov| ov == v));
        for ((service, version), q) in m.iter().filter(|(k, _)| wanted(k)) {
            for (_, src, w) in q.iter().filter(|(t, _, _)| *t >= since_ms) {
                out.add((**src).clone(), service, version, w);
            }
        }
        out
    }

    pub fn set_cert_expiry(&self, node: &str, unix: i64) {
        if let Ok(mut m) = self.cert_expiry.lock() {
            m.insert(node.to_string(), unix);
        }
    }

    /// The certificate expiry `node` last reported, unix seconds.
    pub fn cert_expiry(&self, node: &str) -> Option<i64> {
        self.cert_expiry.lock().ok()?.get(node).copied()
    }
}

pub struct TelemetryService {
    pub store: Arc<TelemetryStore>,
    pub tap: Arc<crate::observe::tap::TapHub>,
}

type DirectiveStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::TelemetryDirective, Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::telemetry_server::Telemetry for TelemetryService {
    type ReportStream = DirectiveStream;

    /// Records reports and relays tap events as they come; tells the proxy which services are
    /// tapped now and whenever that changes.
    async fn report(
        &self,
        req: Request<Streaming<pb::TelemetryReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let who = peer_identity(&req)?;
        let mut stream = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (store, tap) = (self.store.clone(), self.tap.clone());
        let mut taps = tap.watch();
        tokio::spawn(async move {
            // Proxies name services relative to their namespace; the store keys them absolute.
            let ns = who.namespace.clone();
            let directive =
                |t: &std::collections::BTreeMap<String, usize>| pb::TelemetryDirective {
                    tap_services: t
                        .keys()
                        .map(|k| mesh_model::service::relative(k, &ns).to_string())
                        .collect(),
                };
            let first = directive(&taps.borrow_and_update());
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = stream.next() => {
                        let Some(Ok(r)) = r else { break };
                        crate::observe::metrics::cp_metrics().telemetry_reports.inc();
                        let at = now_ms();
                        if r.cert_expires_unix > 0 {
                            store.set_cert_expiry(&r.node_id, r.cert_expires_unix);
                        }
                        let abs = |s: &str| if s.is_empty() {
                            String::new()
                        } else {
                            mesh_model::service::absolute(s, &ns)
                        };
                        let source = Arc::new((abs(&r.source_service), r.source_version.clone()));
                        for b in &r.backends {
                            let b = pb::BackendStats { service: abs(&b.service), ..b.clone() };
                            store.record(&b, at, &source);
                        }
                        for mut e in r.tap {
                            e.dst_service = abs(&e.dst_service);
                            tap.publish(e);
                        }
                        tracing::trace!(proxy = %who, node = %r.node_id, backends = r.backends.len(), "telemetry");
                    }
                    c = taps.changed() => {
                        if c.is_err() { break; }
                        let d = directive(&taps.borrow_and_update());
                        if tx.send(Ok(d)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_sum_samples_and_find_p99() {
        let s = TelemetryStore::default();
        let mut b = pb::BackendStats {
            service: "web".into(),
            version: "v2".into(),
            requests: 100,
            failures: 5,
            latency_buckets: vec![0; BUCKETS],
        };
        b.latency_buckets[3] = 98; // < 10 ms
        b.latency_buckets[7] = 2; // < 250 ms
        let (front, batch) = (
            Arc::new(("front".to_string(), "v1".to_string())),
            Arc::new(("batch".to_string(), String::new())),
        );
        s.record(&b, 1_000, &front);
        s.record(&b, 2_000, &batch);
        let w = s.edges(1_500, None).window("web", "v2");
        assert_eq!((w.requests, w.failures), (100, 5));
        assert_eq!(w.error_percent(), 5.0);
        assert_eq!(w.p99_ms(), Some(250));
        assert_eq!(w.quantile_ms(50), Some(10));
        let all = s.edges(0, None);
        assert_eq!(all.by_version().len(), 1);
        assert_eq!(all.window("web", "v2").requests, 200);
        assert_eq!(all.window("web", "v1"), Window::default());
        assert_eq!(s.edges(0, Some(("web", Some("v1")))), Edges::default());
        assert_eq!(s.edges(0, Some(("web", None))), all);
        // Edges keep the callers apart; the window drops the older one.
        let edges: Vec<_> = all
            .iter()
            .map(|(src, svc, v, w)| (src.0.as_str(), svc, v, w.requests))
            .collect();
        assert_eq!(
            edges,
            [("batch", "web", "v2", 100), ("front", "web", "v2", 100)]
        );
        assert_eq!(s.edges(1_500, None).iter().count(), 1);
        // A peer's windows, through the wire form, merge exactly: counts add, the p99 is that
        // of all the requests.
        let mut merged = s.edges(1_500, None);
        let mut slow = pb::BackendStats {
            latency_buckets: vec![0; BUCKETS],
            ..b.clone()
        };
        slow.latency_buckets[9] = 100; // < 1 s
        let peer = TelemetryStore::default();
        peer.record(&slow, 2_000, &front);
        merged.add_proto(&peer.edges(0, None).to_proto());
        let w = merged.window("web", "v2");
        assert_eq!((w.requests, w.failures), (200, 10));
        assert_eq!(w.p99_ms(), Some(1000));
        assert_eq!(w.quantile_ms(50), Some(250));
    }
}
