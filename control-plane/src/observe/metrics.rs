//! The control plane's own Prometheus metrics (`/metrics` on its HTTP port): connected
//! proxies, config pushes and how long a write takes to be ACKed by each proxy, NACKs, CSRs
//! signed and refused, telemetry reports received.

use crate::ca::service::CaStats;
use crate::discovery::ProxyTable;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Bounds of the push-latency histogram, seconds.
const PUSH_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counters written by the discovery and telemetry services.
#[derive(Debug)]
pub struct CpMetrics {
    /// Commit of a write → ACK of the response carrying it, per proxy.
    pub push_latency: Histogram,
    pub pushes: Counter,
    pub nacks: Counter,
    pub telemetry_reports: Counter,
}

impl Default for CpMetrics {
    fn default() -> Self {
        Self {
            push_latency: Histogram::new(PUSH_BUCKETS),
            pushes: Counter::default(),
            nacks: Counter::default(),
            telemetry_reports: Counter::default(),
        }
    }
}

static METRICS: LazyLock<CpMetrics> = LazyLock::new(CpMetrics::default);

/// The process's control-plane metrics.
pub fn cp_metrics() -> &'static CpMetrics {
    &METRICS
}

impl CpMetrics {
    pub fn acked(&self, since_commit: Duration) {
        self.push_latency.observe(since_commit.as_secs_f64());
    }
}

/// Reads the live tables at scrape time.
struct TableCollector {
    proxies: Arc<ProxyTable>,
    ca: Arc<CaStats>,
    registry: Arc<crate::state::registry::Registry>,
    leader: crate::replicas::leader::Leadership,
}

impl fmt::Debug for TableCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TableCollector")
    }
}

impl Collector for TableCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let n = self.proxies.proxies.len() as i64;
        let nacking = self
            .proxies
            .proxies
            .iter()
            .filter(|p| p.nacked_version != 0)
            .count() as i64;
        for (name, help, v) in [
            (
                "mesh_cp_connected_proxies",
                "Proxies with an open discovery stream",
                n,
            ),
            (
                "mesh_cp_nacking_proxies",
                "Connected proxies whose last answer was a NACK",
                nacking,
            ),
            (
                "mesh_cp_store_up",
                "1 while the store answers (a shared store's watch is open)",
                i64::from(self.registry.store_up()),
            ),
            (
                "mesh_cp_leader",
                "1 while this replica runs the singleton work (canary controller, lease sweeper)",
                i64::from(self.leader.is_leader()),
            ),
            (
                "mesh_cp_store_revision",
                "Store revision this replica's state is at",
                i64::try_from(self.registry.state().revision).unwrap_or(i64::MAX),
            ),
        ] {
            let e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(e)?;
        }
        let mut e = enc.encode_descriptor(
            "mesh_cp_csr",
            "Certificate signing requests, by result",
            None,
            MetricType::Counter,
        )?;
        for (result, c) in [("signed", &self.ca.signed), ("refused", &self.ca.refused)] {
            ConstCounter::new(c.load(Ordering::Relaxed))
                .encode(e.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// The control plane's `/metrics` registry.
pub fn registry(
    proxies: Arc<ProxyTable>,
    ca: Arc<CaStats>,
    state: Arc<crate::state::registry::Registry>,
    leader: crate::replicas::leader::Leadership,
) -> Registry {
    let m = cp_metrics();
    let mut r = Registry::default();
    r.register(
        "mesh_cp_push_latency_seconds",
        "Time from a write's commit to each proxy's ACK of the config carrying it",
        m.push_latency.clone(),
    );
    r.register(
        "mesh_cp_pushes",
        "Config responses sent to proxies",
        m.pushes.clone(),
    );
    r.register(
        "mesh_cp_nacks",
        "Config responses proxies refused (NACK)",
        m.nacks.clone(),
    );
    r.register(
        "mesh_cp_telemetry_reports",
        "Telemetry reports received from proxies",
        m.telemetry_reports.clone(),
    );
    r.register_collector(Box::new(TableCollector {
        proxies,
        ca,
        registry: state,
        leader,
    }));
    r
}

/// The text exposition of `r`.
pub fn encode(r: &Registry) -> Result<String, fmt::Error> {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, r)?;
    Ok(s)
}
