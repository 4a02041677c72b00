//! The `/metrics` exposition: at each scrape, encodes the proxy's counters (`metrics`), Istio's
//! standard families (`standard`), and what it reads from the rest of the proxy (retries from
//! the policy states of the config in force, pooled peer connections, dropped telemetry). Kept
//! apart from the counters so that they depend on nothing the request path is built from.

use super::metrics::*;
use crate::http::errors::REASONS;
use crate::snapshot::Snapshots;
use mesh_proto::LATENCY_BUCKETS_MS;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Encodes everything at scrape time; holds what it reads besides the global counters.
struct ProxyCollector {
    snapshots: Arc<Snapshots>,
    pool: Arc<crate::outbound::pool::Pool>,
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (impl EncodeLabelSet, u64)>,
) -> fmt::Result {
    let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (impl EncodeLabelSet, i64)>,
) -> fmt::Result {
    let mut e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = metrics();
        let mut sets: Vec<(RequestLabels, Arc<RequestMetrics>)> = m
            .requests
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        sets.sort_by(|a, b| {
            let k = |l: &RequestLabels| {
                (
                    l.direction.as_str(),
                    l.dst_service.clone(),
                    l.route.clone(),
                    l.backend_version.clone(),
                    l.src_identity.clone(),
                )
            };
            k(&a.0).cmp(&k(&b.0))
        });
        let overflow = RequestLabels {
            direction: Direction::Outbound,
            src_identity: "overflow".into(),
            dst_service: "overflow".into(),
            dst_identity: "overflow".into(),
            route: "overflow".into(),
            backend_version: "overflow".into(),
        };
        if m.overflow.status.iter().any(|c| c.load(Relaxed) > 0) {
            sets.push((overflow, m.overflow.clone()));
        }
        let load = |a: &AtomicU64| a.load(Relaxed);
        counter(
            &mut enc,
            "mesh_requests",
            "Requests answered, by status class",
            sets.iter().flat_map(|(l, r)| {
                r.status
                    .iter()
                    .zip(STATUS_CLASSES)
                    .filter(|(c, _)| load(c) > 0)
                    .map(move |(c, class)| ((l.clone(), [("status_class", class)]), load(c)))
            }),
        )?;
        counter(
            &mut enc,
            "mesh_grpc_responses",
            "gRPC responses, by grpc-status code",
            sets.iter().flat_map(|(l, r)| {
                r.grpc
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| load(c) > 0)
                    .map(move |(i, c)| {
                        let code = if i < GRPC_SLOTS - 1 {
                            i.to_string()
                        } else {
                            "unknown".to_string()
                        };
                        ((l.clone(), [("grpc_status", code)]), load(c))
                    })
            }),
        )?;
        counter(
            &mut enc,
            "mesh_proxy_errors",
            "Responses the proxy made itself, by x-mesh-error reason (timeouts, rate limits, open breakers...)",
            sets.iter().flat_map(|(l, r)| {
                r.errors
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| load(c) > 0)
                    .map(move |(i, c)| {
                        let reason = REASONS.get(i).copied().unwrap_or("other");
                        ((l.clone(), [("reason", reason)]), load(c))
                    })
            }),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "mesh_response_latency_seconds",
                "Time from the request to the end of the response",
                None,
                MetricType::Histogram,
            )?;
            for (l, r) in &sets {
                // Per-bucket counts: the encoder makes them cumulative itself.
                let mut total = 0;
                let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS_MS.len() + 1);
                for (i, b) in r.latency.iter().enumerate() {
                    let n = load(b);
                    total += n;
                    let le = LATENCY_BUCKETS_MS
                        .get(i)
                        .map_or(f64::INFINITY, |ms| *ms as f64 / 1000.0);
                    buckets.push((le, n));
                }
                if total == 0 {
                    continue;
                }
                let sum = load(&r.latency_sum_us) as f64 / 1e6;
                e.encode_family(l)?
                    .encode_histogram::<NoLabelSet>(sum, total, &buckets, None)?;
            }
        }
        counter(
            &mut enc,
            "mesh_request_bytes",
            "Request body bytes received from the client",
            sets.iter()
                .filter(|(_, r)| r.status.iter().any(|c| load(c) > 0))
                .map(|(l, r)| (l.clone(), load(&r.request_bytes))),
        )?;
        counter(
            &mut enc,
            "mesh_response_bytes",
            "Response body bytes sent to the client",
            sets.iter()
                .filter(|(_, r)| r.status.iter().any(|c| load(c) > 0))
                .map(|(l, r)| (l.clone(), load(&r.response_bytes))),
        )?;
        let snap = self.snapshots.load();
        // (labels, retries, hedges) of each service's policy and each rule with its own.
        let mut sent = Vec::new();
        for s in snap.services.values() {
            let name = s.name.clone();
            sent.push((
                [("dst_service", name.clone()), ("route", "".into())],
                s.state.budget.retried(),
                s.state.recent.as_ref().map_or(0, |r| r.total()),
            ));
            for r in &s.routes.rules {
                if let Some(st) = &r.target.state {
                    sent.push((
                        [
                            ("dst_service", name.clone()),
                            ("route", r.rule.name.clone()),
                        ],
                        st.budget.retried(),
                        st.recent.as_ref().map_or(0, |r| r.total()),
                    ));
                }
            }
        }
        sent.sort_by(|a, b| a.0.cmp(&b.0));
        let labels = |l: &[(&'static str, Arc<str>); 2]| l.clone().map(|(k, v)| (k, v.to_string()));
        counter(
            &mut enc,
            "mesh_retries",
            "Retries sent, by destination and the route whose own policy retried (empty: the service's policy)",
            sent.iter().map(|(l, v, _)| (labels(l), *v)),
        )?;
        counter(
            &mut enc,
            "mesh_hedged_requests",
            "Second copies sent of requests slower than their rule's hedge delay, by destination and route",
            sent.iter().map(|(l, _, v)| (labels(l), *v)),
        )?;
        // The app's adaptive concurrency limit: this proxy's own service only.
        let own = m
            .local()
            .and_then(|l| snap.services.get(&*l.service))
            .and_then(|s| s.state.adaptive.as_ref().map(|a| (s.name.to_string(), a)));
        let own_global = m
            .local()
            .and_then(|l| snap.services.get(&*l.service))
            .and_then(|s| Some((s.name.to_string(), s.state.global.as_ref()?.throttled())));
        counter(
            &mut enc,
            "mesh_throttled_requests",
            "Requests refused (429) by this proxy's share of the service's global rate limit",
            own_global
                .into_iter()
                .map(|(n, v)| ([("dst_service", n), ("limit", "global".to_string())], v)),
        )?;
        counter(
            &mut enc,
            "mesh_shed_requests",
            "Requests shed by the adaptive concurrency limit (503, x-mesh-error: overloaded)",
            own.iter()
                .map(|(n, a)| ([("dst_service", n.clone())], a.shed())),
        )?;
        gauge(
            &mut enc,
            "mesh_adaptive_concurrency_limit",
            "Requests allowed in flight to the app now, as the adaptive limit found",
            own.iter()
                .map(|(n, a)| ([("dst_service", n.clone())], i64::from(a.limit()))),
        )?;
        let mut ej: Vec<(Arc<str>, u64)> = m
            .ejections
            .iter()
            .map(|e| (e.key().clone(), load(e.value())))
            .collect();
        ej.sort();
        counter(
            &mut enc,
            "mesh_endpoint_ejections",
            "Endpoints ejected by outlier detection (circuit breaker), by service",
            ej.into_iter()
                .map(|(s, v)| ([("dst_service", s.to_string())], v)),
        )?;
        counter(
            &mut enc,
            "mesh_tls_handshakes",
            "mTLS handshakes, by direction and result",
            [Direction::Inbound, Direction::Outbound]
                .into_iter()
                .flat_map(|d| {
                    HANDSHAKE_LABELS.iter().enumerate().map(move |(i, r)| {
                        (
                            [("direction", d.as_str()), ("result", r)],
                            load(&m.tls_handshakes[d as usize][i]),
                        )
                    })
                }),
        )?;
        let mut open: Vec<([(&str, &str); 2], i64)> = CONN_LABELS
            .iter()
            .enumerate()
            .map(|(i, (d, p))| {
                (
                    [("direction", *d), ("peer", *p)],
                    m.open_connections[i].load(Relaxed),
                )
            })
            .collect();
        open.push((
            [("direction", "outbound"), ("peer", "mesh")],
            self.pool.len() as i64,
        ));
        gauge(
            &mut enc,
            "mesh_open_connections",
            "Connections open now: the app's to the outbound listener, peers' to the inbound one, and this proxy's pooled mTLS connections to peers",
            open,
        )?;
        counter(
            &mut enc,
            "mesh_connections",
            "Connections accepted",
            CONN_LABELS.iter().enumerate().map(|(i, (d, p))| {
                (
                    [("direction", *d), ("peer", *p)],
                    load(&m.connections_total[i]),
                )
            }),
        )?;
        ConstCounter::new(load(&m.connections_refused)).encode(enc.encode_descriptor(
            "mesh_connections_refused",
            "Connections closed at once because their listener was at --max-connections",
            None,
            MetricType::Counter,
        )?)?;
        counter(
            &mut enc,
            "mesh_telemetry_dropped",
            "Spans, access-log lines and tap events dropped because their bounded queue was full",
            [
                ("spans", super::trace::dropped()),
                ("access_log", load(&m.access_log_dropped)),
                ("tap", load(&m.tap_dropped)),
            ]
            .map(|(k, v)| ([("kind", k)], v)),
        )?;
        super::standard::encode(&mut enc, &sets, m.local())?;
        let mut tcp: Vec<(RequestLabels, Arc<TcpMetrics>)> = m
            .tcp
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        tcp.sort_by(|a, b| {
            let k = |l: &RequestLabels| {
                (
                    l.direction as u8,
                    l.src_identity.clone(),
                    l.dst_service.clone(),
                )
            };
            k(&a.0).cmp(&k(&b.0))
        });
        super::standard::encode_tcp(&mut enc, &tcp, m.local())
    }
}

/// The `/metrics` registry: built once, encodes the live counters on each scrape.
pub fn registry(snapshots: Arc<Snapshots>, pool: Arc<crate::outbound::pool::Pool>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProxyCollector { snapshots, pool }));
    r
}

/// The text exposition of `r`.
pub fn encode(r: &Registry) -> Result<String, fmt::Error> {
    let mut s = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut s, r)?;
    Ok(s)
}
