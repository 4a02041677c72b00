//! Prometheus metrics of the proxy, served as text on the admin port's `/metrics` (encoded by
//! `prometheus-client`). The request path never takes a lock: a request's counters are one
//! `Arc<RequestMetrics>` of atomics, looked up when the config is applied (outbound) or when a
//! connection is accepted (inbound), and read only at scrape time. Label values come from config
//! and certificates, never from paths; past `MAX_LABEL_SETS` new sets share one `overflow` set.

use crate::http::errors::REASONS;
use dashmap::DashMap;
use mesh_proto::LATENCY_BUCKETS_MS;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

/// Most distinct request label sets kept; later ones are counted under `overflow`.
pub const MAX_LABEL_SETS: usize = 2_000;
/// gRPC status codes 0..=16, then one slot for "unknown".
pub(super) const GRPC_SLOTS: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Who called whom, by which route, answered by which version: the labels of request metrics.
/// `route` is the route rule's name (`default` when no rule matched; empty inbound),
/// `backend_version` the version of the endpoint that answered (empty when none did).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub direction: Direction,
    pub src_identity: Arc<str>,
    pub dst_service: Arc<str>,
    pub dst_identity: Arc<str>,
    pub route: Arc<str>,
    pub backend_version: Arc<str>,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, enc: &mut LabelSetEncoder) -> fmt::Result {
        for kv in [
            ("direction", self.direction.as_str()),
            ("src_identity", &self.src_identity),
            ("dst_service", &self.dst_service),
            ("dst_identity", &self.dst_identity),
            ("route", &self.route),
            ("backend_version", &self.backend_version),
        ] {
            kv.encode(enc.encode_label())?;
        }
        Ok(())
    }
}

/// How one request ended, as the metrics count it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub status: u16,
    /// gRPC status, for gRPC requests (from trailers, or headers of a trailers-only answer).
    pub grpc: Option<u16>,
    /// Index in `REASONS` of the `x-mesh-error` reason, when the proxy answered itself.
    pub error: Option<usize>,
    pub latency: Duration,
    /// Body bytes of the request and of the answer.
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Upper bounds of the request and response body size buckets, bytes: powers of ten from 1 B
/// to 10 MB (then unbounded), the buckets Istio's `istio_request_bytes` and
/// `istio_response_bytes` distributions were defined with.
pub const SIZE_BUCKETS: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];

/// The size bucket of `n` bytes.
fn size_bucket(n: u64) -> usize {
    SIZE_BUCKETS
        .iter()
        .position(|b| n <= *b)
        .unwrap_or(SIZE_BUCKETS.len())
}

/// The counters of one label set: plain atomics, written by requests, read by scrapes.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    /// By status class: 1xx, 2xx, 3xx, 4xx, 5xx, other.
    pub(super) status: [AtomicU64; 6],
    pub(super) grpc: [AtomicU64; GRPC_SLOTS],
    /// By `REASONS` index, then one slot for a reason not in the table.
    pub(super) errors: [AtomicU64; REASONS.len() + 1],
    /// Cumulative-free bucket counts (bucket i: latency ≤ LATENCY_BUCKETS_MS[i]; last: above).
    pub(super) latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub(super) latency_sum_us: AtomicU64,
    pub(super) request_bytes: AtomicU64,
    pub(super) response_bytes: AtomicU64,
    /// Requests and answers per body size bucket (`SIZE_BUCKETS`, then one above).
    pub(super) request_sizes: [AtomicU64; SIZE_BUCKETS.len() + 1],
    pub(super) response_sizes: [AtomicU64; SIZE_BUCKETS.len() + 1],
    /// Exact status codes (code + 1; 0: free), a few per label set, first come first served;
    /// a code past them is counted by its class only (`standard`).
    pub(super) codes: [AtomicU32; CODE_SLOTS],
    pub(super) code_counts: [AtomicU64; CODE_SLOTS],
}

/// Distinct exact status codes kept per label set (a service answers few).
pub(super) const CODE_SLOTS: usize = 8;

pub(super) const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl RequestMetrics {
    pub fn record(&self, o: &Outcome) {
        let class = match o.status {
            100..=599 => usize::from(o.status / 100) - 1,
            _ => 5,
        };
        self.status[class].fetch_add(1, Relaxed);
        self.count_code(o.status);
        if let Some(g) = o.grpc {
            self.grpc[usize::from(g).min(GRPC_SLOTS - 1)].fetch_add(1, Relaxed);
        }
        if let Some(e) = o.error {
            self.errors[e.min(REASONS.len())].fetch_add(1, Relaxed);
        }
        // At microsecond precision: a 1.9 ms request is not ≤ 1 ms.
        let us = o.latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| us <= *b * 1000)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(o.latency.as_micros() as u64, Relaxed);
        self.request_bytes.fetch_add(o.request_bytes, Relaxed);
        self.response_bytes.fetch_add(o.response_bytes, Relaxed);
        self.request_sizes[size_bucket(o.request_bytes)].fetch_add(1, Relaxed);
        self.response_sizes[size_bucket(o.response_bytes)].fetch_add(1, Relaxed);
    }

    /// Counts `code` in its slot, taking a free one the first time (no lock: a lost race for a
    /// free slot moves on to the next).
    fn count_code(&self, code: u16) {
        let want = u32::from(code) + 1;
        for (slot, n) in self.codes.iter().zip(&self.code_counts) {
            let mut c = slot.load(Relaxed);
            if c == 0 {
                // Take the free slot, or learn which code did.
                c = match slot.compare_exchange(0, want, Relaxed, Relaxed) {
                    Ok(_) => want,
                    Err(now) => now,
                };
            }
            if c == want {
                n.fetch_add(1, Relaxed);
                return;
            }
        }
    }

    /// (status code, count) of the exact codes kept, and the count of each class's other
    /// answers (by `STATUS_CLASSES` index).
    pub(super) fn codes(&self) -> (Vec<(u16, u64)>, [u64; 6]) {
        let mut exact = Vec::new();
        let mut rest = [0u64; 6];
        for (i, c) in self.status.iter().enumerate() {
            rest[i] = c.load(Relaxed);
        }
        for (slot, n) in self.codes.iter().zip(&self.code_counts) {
            let (c, n) = (slot.load(Relaxed), n.load(Relaxed));
            if c == 0 || n == 0 {
                continue;
            }
            let code = (c - 1) as u16;
            let class = match code {
                100..=599 => usize::from(code / 100) - 1,
                _ => 5,
            };
            rest[class] = rest[class].saturating_sub(n);
            exact.push((code, n));
        }
        exact.sort_unstable();
        (exact, rest)
    }

    /// Per-bucket latency counts (bucket i: ≤ `LATENCY_BUCKETS_MS[i]`; last: above) and the
    /// sum in microseconds.
    pub(super) fn latency(&self) -> (Vec<u64>, u64) {
        (
            self.latency.iter().map(|b| b.load(Relaxed)).collect(),
            self.latency_sum_us.load(Relaxed),
        )
    }

    /// Per-bucket request and answer size counts (`SIZE_BUCKETS`) with their sums.
    pub(super) fn sizes(&self) -> [(Vec<u64>, u64); 2] {
        let load = |b: &[AtomicU64]| b.iter().map(|n| n.load(Relaxed)).collect();
        [
            (load(&self.request_sizes), self.request_bytes.load(Relaxed)),
            (
                load(&self.response_sizes),
                self.response_bytes.load(Relaxed),
            ),
        ]
    }

    /// Whether any answer was a gRPC one.
    pub(super) fn saw_grpc(&self) -> bool {
        self.grpc.iter().any(|c| c.load(Relaxed) > 0)
    }
}

/// Kinds of connections counted by `mesh_open_connections`.
#[derive(Debug, Clone, Copy)]
pub enum ConnKind {
    /// From the local app to the outbound listener.
    OutboundApp = 0,
    /// From a peer sidecar to the inbound listener (after mTLS).
    InboundPeer = 1,
}

pub(super) const CONN_LABELS: [(&str, &str); 2] = [("outbound", "app"), ("inbound", "mesh")];

/// Counts a connection as open while it lives.
#[derive(Debug)]
pub struct ConnGuard(ConnKind);

impl ConnGuard {
    pub fn new(kind: ConnKind) -> Self {
        let m = metrics();
        m.open_connections[kind as usize].fetch_add(1, Relaxed);
        m.connections_total[kind as usize].fetch_add(1, Relaxed);
        Self(kind)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics().open_connections[self.0 as usize].fetch_sub(1, Relaxed);
    }
}

/// Result of a TLS handshake, for `mesh_tls_handshakes_total`.
#[derive(Debug, Clone, Copy)]
pub enum Handshake {
    Ok = 0,
    Failed = 1,
    TimedOut = 2,
}

pub(super) const HANDSHAKE_LABELS: [&str; 3] = ["ok", "failed", "timeout"];

/// Every counter of the proxy that is not kept in the config snapshot.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(super) requests: DashMap<RequestLabels, Arc<RequestMetrics>>,
    pub(super) overflow: Arc<RequestMetrics>,
    pub(super) ejections: DashMap<Arc<str>, Arc<AtomicU64>>,
    /// [direction][Handshake]
    pub(super) tls_handshakes: [[AtomicU64; 3]; 2],
    pub(super) open_connections: [AtomicI64; 2],
    pub(super) connections_total: [AtomicU64; 2],
    /// Connections closed at once because a listener was at its limit.
    pub(super) connections_refused: AtomicU64,
    /// Access-log lines and tap events dropped because their queue was full (spans: `trace`).
    pub access_log_dropped: AtomicU64,
    pub tap_dropped: AtomicU64,
    /// This proxy: its identity, service and version (the inbound side of its labels).
    pub(super) local: OnceLock<Local>,
    pub(super) unresolved: OnceLock<Arc<RequestMetrics>>,
    /// Opaque TCP streams, by the same label sets as requests (route and version empty).
    pub(super) tcp: DashMap<RequestLabels, Arc<TcpMetrics>>,
    pub(super) tcp_overflow: Arc<TcpMetrics>,
}

/// Opaque TCP streams of one label set (Istio's `istio_tcp_*`): streams opened and closed, and
/// bytes from the caller (`received`) and to it (`sent`), added when a stream ends.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    pub(super) opened: AtomicU64,
    pub(super) closed: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) sent: AtomicU64,
}

/// One opaque stream, counted as opened now; [`TcpStream::closed`] counts its end.
#[derive(Debug)]
pub struct TcpStream(Arc<TcpMetrics>);

impl TcpStream {
    pub fn open(m: Arc<TcpMetrics>) -> Self {
        m.opened.fetch_add(1, Relaxed);
        TcpStream(m)
    }

    /// The stream ended, `received` bytes having come from the caller and `sent` gone to it.
    pub fn closed(self, received: u64, sent: u64) {
        self.0.closed.fetch_add(1, Relaxed);
        self.0.received.fetch_add(received, Relaxed);
        self.0.sent.fetch_add(sent, Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Local {
    pub identity: Arc<str>,
    pub service: Arc<str>,
    pub version: Arc<str>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process's metrics (one proxy per process).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Sets who this proxy is (once, at start).
    pub fn set_local(&self, local: Local) {
        let _ = self.local.set(local);
    }

    pub fn local(&self) -> Option<&Local> {
        self.local.get()
    }

    /// The counters for `labels` (made on first use; `overflow` past the bound).
    pub fn requests(&self, labels: RequestLabels) -> Arc<RequestMetrics> {
        if let Some(m) = self.requests.get(&labels) {
            return m.clone();
        }
        if self.requests.len() >= MAX_LABEL_SETS {
            return self.overflow.clone();
        }
        self.requests.entry(labels).or_default().clone()
    }

    /// The counters of opaque streams: outbound to `service` (whose endpoints present
    /// `identity`), or inbound from `caller` (`service` and `identity` empty).
    pub fn tcp(
        &self,
        direction: Direction,
        caller: &Arc<str>,
        service: &Arc<str>,
        identity: &Arc<str>,
    ) -> Arc<TcpMetrics> {
        let empty: Arc<str> = Arc::from("");
        let l = self.local.get();
        let labels = match direction {
            Direction::Outbound => RequestLabels {
                direction,
                src_identity: l.map_or_else(|| empty.clone(), |l| l.identity.clone()),
                dst_service: service.clone(),
                dst_identity: identity.clone(),
                route: empty.clone(),
                backend_version: empty,
            },
            Direction::Inbound => RequestLabels {
                direction,
                src_identity: caller.clone(),
                dst_service: l.map_or_else(|| empty.clone(), |l| l.service.clone()),
                dst_identity: l.map_or_else(|| empty.clone(), |l| l.identity.clone()),
                route: empty.clone(),
                backend_version: l.map_or(empty, |l| l.version.clone()),
            },
        };
        if let Some(m) = self.tcp.get(&labels) {
            return m.clone();
        }
        if self.tcp.len() >= MAX_LABEL_SETS {
            return self.tcp_overflow.clone();
        }
        self.tcp.entry(labels).or_default().clone()
    }

    /// The counters of an inbound connection from `caller` to this proxy's app.
    pub fn inbound(&self, caller: &Arc<str>) -> Arc<RequestMetrics> {
        let empty: Arc<str> = Arc::from("");
        let l = self.local.get();
        self.requests(RequestLabels {
            direction: Direction::Inbound,
            src_identity: caller.clone(),
            dst_service: l.map_or_else(|| empty.clone(), |l| l.service.clone()),
            dst_identity: l.map_or_else(|| empty.clone(), |l| l.identity.clone()),
            route: empty.clone(),
            backend_version: l.map_or(empty, |l| l.version.clone()),
        })
    }

    /// The counters of outbound requests that named no known service (one set for all of
    /// them: unknown names must not make label sets).
    pub fn unresolved(&self) -> Arc<RequestMetrics> {
        self.unresolved
            .get_or_init(|| {
                let empty: Arc<str> = Arc::from("");
                self.requests(RequestLabels {
                    direction: Direction::Outbound,
                    src_identity: self
                        .local
                        .get()
                        .map_or_else(|| empty.clone(), |l| l.identity.clone()),
                    dst_service: empty.clone(),
                    dst_identity: empty.clone(),
                    route: empty.clone(),
                    backend_version: empty,
                })
            })
            .clone()
    }

    /// The cumulative ejection counter of `service`'s endpoints.
    pub fn ejections(&self, service: &Arc<str>) -> Arc<AtomicU64> {
        self.ejections.entry(service.clone()).or_default().clone()
    }

    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    pub fn handshake(&self, d: Direction, h: Handshake) {
        self.tls_handshakes[d as usize][h as usize].fetch_add(1, Relaxed);
    }
}

/// Per-version counters of one outbound target, made when the config is applied so requests
/// only compare a version and clone an `Arc`.
#[derive(Debug, Default)]
pub struct TargetMetrics {
    by_version: Vec<(Arc<str>, Arc<RequestMetrics>)>,
    /// When no endpoint answered.
    none: Option<Arc<RequestMetrics>>,
}

impl TargetMetrics {
    /// Counters of `service` (with its `identity`) for each of its `versions`; a version that
    /// is another service (`backends`) is counted as that service's.
    pub fn new<'a>(
        (service, identity): (&Arc<str>, &Arc<str>),
        route: &Arc<str>,
        versions: impl Iterator<Item = &'a Arc<str>>,
        backends: &[crate::snapshot::BackendService],
    ) -> Self {
        let m = metrics();
        let src = m
            .local()
            .map_or_else(|| Arc::from(""), |l| l.identity.clone());
        let labels = |v: &Arc<str>| match backends.iter().find(|b| b.version == *v) {
            Some(b) => RequestLabels {
                direction: Direction::Outbound,
                src_identity: src.clone(),
                dst_service: b.service.clone(),
                dst_identity: b.identity.clone(),
                route: route.clone(),
                backend_version: b.subset.clone(),
            },
            None => RequestLabels {
                direction: Direction::Outbound,
                src_identity: src.clone(),
                dst_service: service.clone(),
                dst_identity: identity.clone(),
                route: route.clone(),
                backend_version: v.clone(),
            },
        };
        let mut by_version: Vec<(Arc<str>, Arc<RequestMetrics>)> = Vec::new();
        for v in versions {
            if !by_version.iter().any(|(x, _)| x == v) {
                by_version.push((v.clone(), m.requests(labels(v))));
            }
        }
        Self {
            by_version,
            none: Some(m.requests(labels(&Arc::from("")))),
        }
    }

    /// The counters for an answer from `version` (None: no endpoint answered).
    pub fn get(&self, version: Option<&Arc<str>>) -> Option<&Arc<RequestMetrics>> {
        match version {
            Some(v) => self
                .by_version
                .iter()
                .find(|(x, _)| Arc::ptr_eq(x, v) || x == v)
                .map(|(_, m)| m)
                .or(self.none.as_ref()),
            None => self.none.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_land_in_their_class_code_reason_and_bucket() {
        let m = RequestMetrics::default();
        m.record(&Outcome {
            status: 200,
            grpc: Some(0),
            latency: Duration::from_millis(3),
            response_bytes: 10,
            ..Outcome::default()
        });
        m.record(&Outcome {
            status: 504,
            error: REASONS.iter().position(|r| *r == "timeout"),
            latency: Duration::from_secs(9),
            ..Outcome::default()
        });
        m.record(&Outcome {
            status: 200,
            grpc: Some(99),
            ..Outcome::default()
        });
        assert_eq!(m.status[1].load(Relaxed), 2);
        assert_eq!(m.status[4].load(Relaxed), 1);
        assert_eq!(m.grpc[0].load(Relaxed), 1);
        assert_eq!(m.grpc[GRPC_SLOTS - 1].load(Relaxed), 1);
        let timeout = REASONS.iter().position(|r| *r == "timeout").unwrap_or(99);
        assert_eq!(m.errors[timeout].load(Relaxed), 1);
        // 3 ms → the 5 ms bucket (index 2); 9 s → above the last bound.
        assert_eq!(m.latency[2].load(Relaxed), 1);
        // 1.9 ms is above 1 ms: the 2 ms bucket (index 1), not the 1 ms one.
        m.record(&Outcome {
            status: 200,
            latency: Duration::from_micros(1900),
            ..Outcome::default()
        });
        assert_eq!(m.latency[0].load(Relaxed), 1, "the 0 ms request");
        assert_eq!(m.latency[1].load(Relaxed), 1);
        assert_eq!(m.latency[LATENCY_BUCKETS_MS.len()].load(Relaxed), 1);
        assert_eq!(m.response_bytes.load(Relaxed), 10);
        // Sizes: 0 and 1 B in the 1 B bucket, 10 B in the 10 B one; 11 B is above it.
        m.record(&Outcome {
            status: 200,
            request_bytes: 11,
            response_bytes: 20_000_000,
            ..Outcome::default()
        });
        let [(req, req_sum), (resp, resp_sum)] = m.sizes();
        assert_eq!(req, [4, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(req_sum, 11);
        assert_eq!(resp, [3, 1, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(resp_sum, 20_000_010);
    }

    #[test]
    fn label_sets_are_bounded() {
        let m = Metrics::default();
        let labels = |i: usize| RequestLabels {
            direction: Direction::Outbound,
            src_identity: "a".into(),
            dst_service: format!("s{i}").into(),
            dst_identity: "b".into(),
            route: "default".into(),
            backend_version: "".into(),
        };
        for i in 0..MAX_LABEL_SETS + 10 {
            m.requests(labels(i));
        }
        assert_eq!(m.requests.len(), MAX_LABEL_SETS);
        assert!(Arc::ptr_eq(
            &m.requests(labels(MAX_LABEL_SETS + 5)),
            &m.overflow
        ));
        assert!(!Arc::ptr_eq(&m.requests(labels(1)), &m.overflow));
    }

    #[test]
    fn target_metrics_find_versions_and_fall_back_to_none() {
        let (s, i, r) = ("svc".into(), "id".into(), "default".into());
        let v1: Arc<str> = "v1".into();
        let t = TargetMetrics::new((&s, &i), &r, [&v1, &v1].into_iter(), &[]);
        let a = t.get(Some(&v1)).map(Arc::as_ptr);
        let b = t.get(Some(&Arc::from("v1"))).map(Arc::as_ptr);
        assert!(a.is_some() && a == b);
        assert_eq!(
            t.get(Some(&Arc::from("v9"))).map(Arc::as_ptr),
            t.get(None).map(Arc::as_ptr)
        );
        assert_ne!(a, t.get(None).map(Arc::as_ptr));
    }
}
