//! The request metrics again under Istio's standard names and labels
//! (`istio_requests_total`, `istio_request_duration_milliseconds`), because that is the scheme
//! the tools teams already run speak: Kiali's graph, Flagger's built-in `request-success-rate`
//! and `request-duration` checks, and the published Istio Grafana dashboards query exactly
//! these series. They are encoded at scrape time from the same counters as the `mesh_*`
//! families (nothing more is done per request than counting the exact status code), with the
//! same bounded label sets.
//!
//! Mapping: `reporter` is `source` at the caller's proxy and `destination` at the callee's;
//! workloads are named by their service (or, for a caller without one, its service account);
//! `*_principal` are SPIFFE ids; `destination_service` is the Kubernetes FQDN
//! (`name.ns.svc.cluster.local`); `response_code` is exact for up to 8 codes per label set,
//! then the class (`5xx`).

use super::metrics::{Direction, Local, RequestLabels, RequestMetrics, SIZE_BUCKETS, TcpMetrics};
use mesh_proto::LATENCY_BUCKETS_MS;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use std::fmt;
use std::sync::Arc;

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "0"];

/// (namespace, service account) of a SPIFFE id (`spiffe://td/ns/<ns>/sa/<sa>`).
fn ns_sa(id: &str) -> (&str, &str) {
    let mut parts = id.split('/');
    let mut ns = "";
    let mut sa = "";
    while let Some(p) = parts.next() {
        match p {
            "ns" => ns = parts.next().unwrap_or(""),
            "sa" => sa = parts.next().unwrap_or(""),
            _ => {}
        }
    }
    (ns, sa)
}

/// (name, namespace) of a service as this proxy names it (bare in its own namespace).
fn service_ns<'a>(key: &'a str, own_ns: &'a str) -> (&'a str, &'a str) {
    match key.split_once('.') {
        Some((name, ns)) => (name, ns),
        None => (key, own_ns),
    }
}

/// The Istio label set of one of our label sets (all but `response_code`).
fn labels(
    l: &RequestLabels,
    local: Option<&Local>,
    protocol: &'static str,
) -> Vec<(&'static str, String)> {
    let (own_id, own_service, own_version) =
        local.map_or(("", "", ""), |l| (&*l.identity, &*l.service, &*l.version));
    let (own_ns, own_sa) = ns_sa(own_id);
    let own_workload = if own_service.is_empty() {
        own_sa
    } else {
        own_service
    };
    let (reporter, src, dst, dst_version, security) = match l.direction {
        Direction::Outbound => {
            let (name, ns) = service_ns(&l.dst_service, own_ns);
            (
                "source",
                (own_workload, own_ns, own_id, own_version),
                (name, ns, &*l.dst_identity),
                &*l.backend_version,
                "unknown",
            )
        }
        Direction::Inbound => {
            let (ns, sa) = ns_sa(&l.src_identity);
            (
                "destination",
                (sa, ns, &*l.src_identity, ""),
                (own_workload, own_ns, own_id),
                own_version,
                "mutual_tls",
            )
        }
    };
    // A destination without a mesh identity is a service outside the mesh, named by its host
    // (as Istio names a ServiceEntry's): `api.example.com`, not a Kubernetes service name.
    let external = l.direction == Direction::Outbound
        && l.dst_identity.is_empty()
        && !l.dst_service.is_empty();
    let (dst, fqdn) = if external {
        ((&*l.dst_service, "", ""), l.dst_service.to_string())
    } else if dst.0.is_empty() {
        (dst, "unknown".to_string())
    } else {
        (dst, format!("{}.{}.svc.cluster.local", dst.0, dst.1))
    };
    let or_unknown = |s: &str| {
        if s.is_empty() {
            "unknown".to_string()
        } else {
            s.to_string()
        }
    };
    vec![
        ("reporter", reporter.to_string()),
        ("source_workload", or_unknown(src.0)),
        ("source_workload_namespace", or_unknown(src.1)),
        ("source_principal", or_unknown(src.2)),
        ("source_app", or_unknown(src.0)),
        ("source_version", or_unknown(src.3)),
        ("destination_workload", or_unknown(dst.0)),
        ("destination_workload_namespace", or_unknown(dst.1)),
        ("destination_principal", or_unknown(dst.2)),
        ("destination_app", or_unknown(dst.0)),
        ("destination_version", or_unknown(dst_version)),
        ("destination_service", fqdn),
        ("destination_service_name", or_unknown(dst.0)),
        ("destination_service_namespace", or_unknown(dst.1)),
        ("request_protocol", protocol.to_string()),
        ("connection_security_policy", security.to_string()),
    ]
}

/// Encodes `istio_requests_total`, `istio_request_duration_milliseconds`,
/// `istio_request_bytes` and `istio_response_bytes` for `sets`.
pub fn encode(
    enc: &mut DescriptorEncoder,
    sets: &[(RequestLabels, Arc<RequestMetrics>)],
    local: Option<&Local>,
) -> fmt::Result {
    let rows: Vec<(Vec<(&'static str, String)>, &RequestMetrics)> = sets
        .iter()
        .map(|(l, r)| {
            let protocol = if r.saw_grpc() { "grpc" } else { "http" };
            (labels(l, local, protocol), &**r)
        })
        .collect();
    {
        let mut e = enc.encode_descriptor(
            "istio_requests",
            "Requests, by response code (Istio's standard metric)",
            None,
            MetricType::Counter,
        )?;
        for (l, r) in &rows {
            let (exact, rest) = r.codes();
            let mut counts: Vec<(String, u64)> =
                exact.into_iter().map(|(c, n)| (c.to_string(), n)).collect();
            counts.extend(
                rest.iter()
                    .zip(CLASSES)
                    .filter(|(n, _)| **n > 0)
                    .map(|(n, c)| (c.to_string(), *n)),
            );
            for (code, n) in counts {
                let mut set = l.clone();
                set.push(("response_code", code));
                set.push(("response_flags", "-".to_string()));
                ConstCounter::new(n).encode(e.encode_family(&set)?)?;
            }
        }
    }
    // Three histograms: (name, help, per label set: per-bucket counts, sum, bucket bounds).
    type Histogram = (
        &'static str,
        &'static str,
        fn(&RequestMetrics) -> (Vec<u64>, f64),
        &'static [u64],
    );
    let histograms: [Histogram; 3] = [
        (
            "istio_request_duration_milliseconds",
            "Time from the request to the end of the response, in milliseconds (Istio's standard metric)",
            |r| {
                let (counts, sum_us) = r.latency();
                (counts, sum_us as f64 / 1000.0)
            },
            &LATENCY_BUCKETS_MS,
        ),
        (
            "istio_request_bytes",
            "Request body sizes, bytes (Istio's standard metric)",
            |r| {
                let [(counts, sum), _] = r.sizes();
                (counts, sum as f64)
            },
            &SIZE_BUCKETS,
        ),
        (
            "istio_response_bytes",
            "Response body sizes, bytes (Istio's standard metric)",
            |r| {
                let [_, (counts, sum)] = r.sizes();
                (counts, sum as f64)
            },
            &SIZE_BUCKETS,
        ),
    ];
    for (name, help, values, bounds) in histograms {
        let mut e = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (l, r) in &rows {
            let (counts, sum) = values(r);
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            // Per-bucket counts: the encoder makes them cumulative itself.
            let buckets: Vec<(f64, u64)> = counts
                .iter()
                .enumerate()
                .map(|(i, n)| (bounds.get(i).map_or(f64::INFINITY, |b| *b as f64), *n))
                .collect();
            e.encode_family(l)?
                .encode_histogram::<NoLabelSet>(sum, total, &buckets, None)?;
        }
    }
    Ok(())
}

/// Opaque TCP streams under Istio's names: `istio_tcp_connections_opened_total`,
/// `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total` (from the caller) and
/// `istio_tcp_sent_bytes_total` (to it), with the request families' labels
/// (`request_protocol="tcp"`).
pub fn encode_tcp(
    enc: &mut DescriptorEncoder,
    sets: &[(RequestLabels, Arc<TcpMetrics>)],
    local: Option<&Local>,
) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    /// (name, help, the counter's value)
    type Family = (&'static str, &'static str, fn(&TcpMetrics) -> u64);
    let families: [Family; 4] = [
        (
            "istio_tcp_connections_opened",
            "Opaque TCP streams opened (Istio's standard metric)",
            |m| m.opened.load(Relaxed),
        ),
        (
            "istio_tcp_connections_closed",
            "Opaque TCP streams closed (Istio's standard metric)",
            |m| m.closed.load(Relaxed),
        ),
        (
            "istio_tcp_received_bytes",
            "Bytes from the caller on opaque TCP streams, counted when a stream ends",
            |m| m.received.load(Relaxed),
        ),
        (
            "istio_tcp_sent_bytes",
            "Bytes to the caller on opaque TCP streams, counted when a stream ends",
            |m| m.sent.load(Relaxed),
        ),
    ];
    let rows: Vec<(Vec<(&'static str, String)>, &TcpMetrics)> = sets
        .iter()
        .map(|(l, m)| {
            let mut set = labels(l, local, "tcp");
            set.push(("response_flags", "-".to_string()));
            (set, &**m)
        })
        .collect();
    for (name, help, value) in families {
        let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, m) in &rows {
            ConstCounter::new(value(m)).encode(e.encode_family(l)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_identities_and_service_keys() {
        assert_eq!(
            ns_sa("spiffe://mesh.local/ns/team-a/sa/web"),
            ("team-a", "web")
        );
        assert_eq!(ns_sa(""), ("", ""));
        assert_eq!(service_ns("api", "team-a"), ("api", "team-a"));
        assert_eq!(service_ns("api.team-b", "team-a"), ("api", "team-b"));
    }
}
