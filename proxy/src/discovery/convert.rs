//! proto → domain. The only place the proxy sees prost types; everything is validated here, and
//! anything the proxy cannot apply becomes an error that NACKs the whole response.

use crate::balance::outlier::{self, OutlierConfig};
use crate::balance::{Algorithm, Balancer, Endpoint, LbConfig};
use crate::http::router::Router;
use crate::policy::circuit_breaker::LimitsConfig;
use crate::policy::fault::FaultConfig;
use crate::policy::rate_limit::Rate;
use crate::policy::retry::{self, RetryConfig, RetryOn};
use crate::policy::{self as pol, Policy, PolicyState};
use crate::snapshot::Service;
use mesh_proto::v1 as pb;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("resource {0}: missing service config")]
    Empty(String),
    #[error("service {service}: {reason}")]
    Invalid { service: String, reason: String },
}

impl TryFrom<pb::ServiceConfig> for Service {
    type Error = ConvertError;

    fn try_from(c: pb::ServiceConfig) -> Result<Self, ConvertError> {
        let bad = |reason: String| ConvertError::Invalid {
            service: c.name.clone(),
            reason,
        };
        if c.name.is_empty() {
            return Err(bad("empty name".into()));
        }
        if !c.identity.starts_with("spiffe://") {
            return Err(bad(format!("identity {:?} is not a SPIFFE id", c.identity)));
        }
        let mut endpoints = Vec::with_capacity(c.endpoints.len());
        for e in &c.endpoints {
            let addr: SocketAddr = e.address.parse().map_err(|_| {
                bad(format!(
                    "endpoint {}: address {:?} is not ip:port",
                    e.id, e.address
                ))
            })?;
            if addr.port() == 0 {
                return Err(bad(format!("endpoint {}: port 0", e.id)));
            }
            endpoints.push(Endpoint {
                id: e.id.as_str().into(),
                addr,
                version: e.labels.get("version").map(|v| Arc::from(v.as_str())),
                ready: e.ready,
                app_port: u16::try_from(e.app_port).ok().filter(|p| *p != 0),
            });
        }
        let route = c.route.clone().unwrap_or_default();
        let mut backends: Vec<(Arc<str>, u32)> = Vec::with_capacity(route.backends.len());
        for b in &route.backends {
            if b.version.is_empty() {
                return Err(bad("route backend with an empty version".into()));
            }
            if backends.iter().any(|(v, _)| **v == *b.version) {
                return Err(bad(format!("route lists version {:?} twice", b.version)));
            }
            backends.push((b.version.as_str().into(), b.weight));
        }
        if !backends.is_empty() && backends.iter().all(|(_, w)| *w == 0) {
            return Err(bad("route weights sum to 0".into()));
        }
        let policy = match &c.policy {
            Some(p) => policy(p).map_err(bad)?,
            None => Policy::default(),
        };
        let rules = super::convert_route::rules(&route).map_err(bad)?;
        let mtls_permissive = match c.mtls_mode.as_str() {
            "" | "strict" => false,
            "permissive" => true,
            other => return Err(bad(format!("unknown mTLS mode {other:?}"))),
        };
        let authz = match &c.authz {
            Some(a) => {
                let a = mesh_authz::Authz::try_from(a).map_err(|e| bad(format!("authz: {e}")))?;
                (!a.allows_everything()).then(|| Arc::new(a))
            }
            None => None,
        };
        let mut vips = Vec::with_capacity(c.vips.len());
        for ip in &c.vips {
            vips.push(
                ip.parse::<std::net::IpAddr>()
                    .map_err(|_| bad(format!("virtual IP {ip:?} is not an IP")))?,
            );
        }
        let mut vip_ports = Vec::with_capacity(c.ports.len());
        for p in &c.ports {
            match (u16::try_from(p.port), u16::try_from(p.target_port)) {
                (Ok(a), Ok(b)) if a != 0 && b != 0 => vip_ports.push((a, b)),
                _ => return Err(bad(format!("service port {} → {}", p.port, p.target_port))),
            }
        }
        let mut svc = Service {
            vips,
            vip_ports,
            state: PolicyState::new(&policy),
            policy,
            authz,
            mtls_permissive,
            stack: OnceLock::new(),
            router: Router::new(rules),
            targets: Vec::new(),
            mirror: super::convert_route::mirror("default backends", &route.mirror).map_err(bad)?,
            mirror_balancer: None,
            metrics: Arc::default(),
            endpoint_states: HashMap::new(),
            balancer: Arc::new(Balancer::new(&[], &[], |_| Arc::default())),
            name: c.name.as_str().into(),
            namespace: c.namespace.as_str().into(),
            identity: c.identity.as_str().into(),
            version: 0,
            endpoints,
            backends,
        };
        svc.build_balancers(&HashMap::new());
        Ok(svc)
    }
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

fn or(v: u32, default: Duration) -> Duration {
    ms(v).unwrap_or(default)
}

fn percent(v: f64, what: &str) -> Result<f64, String> {
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{what}: {v} is not a percentage"))
    }
}

fn rate(r: &Option<pb::Rate>) -> Option<Rate> {
    r.filter(|r| r.per_second > 0)
        .map(|r| Rate::new(r.per_second, r.burst))
}

/// gRPC code names a retry policy may use.
const GRPC_CODES: &[(&str, u8)] = mesh_proto::RETRY_GRPC_CODES;

fn retry_on(conds: &[String]) -> Result<RetryOn, String> {
    let mut on = RetryOn::default();
    if conds.is_empty() {
        on.connect_failure = true;
        on.refused_stream = true;
    }
    for c in conds {
        match c.as_str() {
            "5xx" => on.any_5xx = true,
            "gateway-error" => on.gateway_error = true,
            "connect-failure" => on.connect_failure = true,
            "refused-stream" => on.refused_stream = true,
            "reset" => on.reset = true,
            "timeout" => on.timeout = true,
            other => {
                if let Some((_, code)) = GRPC_CODES.iter().find(|(n, _)| *n == other) {
                    on.grpc_codes.push(*code);
                } else if let Some(s) = other
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                {
                    on.statuses.push(s);
                } else {
                    return Err(format!("unknown retry condition {other:?}"));
                }
            }
        }
    }
    Ok(on)
}

/// The pushed policy as the proxy applies it; anything it cannot apply is an error (NACK).
pub fn policy(p: &pb::Policy) -> Result<Policy, String> {
    let mut out = Policy::default();
    if let Some(t) = &p.timeouts {
        out.request_timeout = ms(t.request_ms);
        out.per_try_timeout = ms(t.per_try_ms);
        out.connect_timeout = or(t.connect_ms, pol::DEFAULT_CONNECT_TIMEOUT);
        out.idle_timeout = or(t.idle_ms, pol::DEFAULT_IDLE_TIMEOUT);
        out.stream_idle_timeout = ms(t.stream_idle_ms);
    }
    if let Some(r) = p.retry.as_ref().filter(|r| r.max_retries > 0) {
        out.retry = Some(RetryConfig {
            max_retries: r.max_retries.min(10),
            on: retry_on(&r.retry_on)?,
            backoff_base: or(r.backoff_base_ms, retry::DEFAULT_BACKOFF_BASE),
            backoff_max: or(r.backoff_max_ms, retry::DEFAULT_BACKOFF_MAX),
            budget_percent: if r.budget_percent > 0.0 {
                r.budget_percent
            } else {
                retry::DEFAULT_BUDGET_PERCENT
            },
            budget_min_per_second: if r.budget_min_per_second > 0 {
                r.budget_min_per_second
            } else {
                retry::DEFAULT_BUDGET_MIN_PER_SECOND
            },
            non_idempotent: r.non_idempotent,
        });
    }
    if let Some(c) = &p.circuit_breaker {
        if c.consecutive_failures > 0 || c.failure_rate_percent > 0.0 {
            out.outlier = Some(OutlierConfig {
                consecutive_failures: c.consecutive_failures,
                failure_rate_percent: percent(c.failure_rate_percent, "failure_rate_percent")?,
                window: or(c.window_ms, outlier::DEFAULT_WINDOW),
                min_requests: if c.min_requests > 0 {
                    c.min_requests
                } else {
                    outlier::DEFAULT_MIN_REQUESTS
                },
                base_ejection: or(c.base_ejection_ms, outlier::DEFAULT_BASE_EJECTION),
                max_ejection_percent: if c.max_ejection_percent > 0.0 {
                    percent(c.max_ejection_percent, "max_ejection_percent")?
                } else {
                    outlier::DEFAULT_MAX_EJECTION_PERCENT
                },
            });
        }
        if c.max_concurrent > 0 {
            out.limits = Some(LimitsConfig {
                max_concurrent: c.max_concurrent,
                max_pending: c.max_pending,
            });
        }
    }
    if let Some(r) = &p.rate_limit {
        out.rate_outbound = rate(&r.outbound);
        out.rate_inbound = rate(&r.inbound);
        out.rate_inbound_per_caller = rate(&r.inbound_per_caller);
    }
    if let Some(lb) = &p.load_balancer {
        let algorithm = match lb.algorithm.as_str() {
            "" | "p2c-ewma" => Algorithm::P2cEwma,
            "round-robin" => Algorithm::RoundRobin,
            "consistent-hash" => Algorithm::ConsistentHash,
            other => return Err(format!("unknown load-balancing algorithm {other:?}")),
        };
        let hash_header = match (algorithm, lb.hash_header.as_str()) {
            (Algorithm::ConsistentHash, h) => Some(
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("hash header {h:?} is not a header name"))?,
            ),
            _ => None,
        };
        out.lb = LbConfig {
            algorithm,
            hash_header,
            warmup: or(lb.warmup_ms, Duration::ZERO),
        };
    }
    if !p.grpc_failures.is_empty() {
        let codes = p
            .grpc_failures
            .iter()
            .map(|c| {
                mesh_proto::grpc_code(c)
                    .ok_or_else(|| format!("grpc_failures: {c:?} is not a gRPC status"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.grpc_failures = crate::policy::GrpcFailures::of(&codes);
    }
    if let Some(f) = &p.fault
        && (f.delay_percent > 0.0 || f.abort_percent > 0.0)
    {
        let abort_status = u16::try_from(f.abort_status)
            .ok()
            .filter(|s| (200..=599).contains(s) || f.abort_percent == 0.0)
            .ok_or_else(|| {
                format!(
                    "fault abort status {} is not an HTTP status",
                    f.abort_status
                )
            })?;
        out.fault = Some(FaultConfig {
            delay: or(f.delay_ms, Duration::ZERO),
            delay_percent: percent(f.delay_percent, "fault delay_percent")?,
            abort_status,
            abort_percent: percent(f.abort_percent, "fault abort_percent")?,
        });
    }
    Ok(out)
}

/// Converts one resource into its name and service.
pub fn resource(r: pb::Resource) -> Result<(String, Service), ConvertError> {
    match r.kind {
        Some(pb::resource::Kind::Service(cfg)) => {
            let mut s = Service::try_from(cfg)?;
            s.version = r.version;
            Ok((r.name, s))
        }
        Some(pb::resource::Kind::Trust(_)) | None => Err(ConvertError::Empty(r.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> pb::ServiceConfig {
        pb::ServiceConfig {
            name: "web".into(),
            namespace: "default".into(),
            identity: "spiffe://mesh.local/ns/default/sa/web".into(),
            endpoints: vec![pb::Endpoint {
                id: "a".into(),
                address: "127.0.0.1:9000".into(),
                labels: [("version".to_string(), "v1".to_string())].into(),
                ready: true,
                app_port: 0,
            }],
            route: Some(pb::Route {
                backends: vec![pb::WeightedBackend {
                    version: "v1".into(),
                    weight: 1,
                }],
                rules: Vec::new(),
                mirror: None,
            }),
            policy: None,
            authz: None,
            mtls_mode: String::new(),
            vips: Vec::new(),
            ports: Vec::new(),
        }
    }

    #[test]
    fn authz_is_kept_only_when_it_can_deny_and_bad_rules_are_nacked() {
        let mut c = cfg();
        c.authz = Some(pb::Authz {
            default_action: "allow-all".into(),
            ..Default::default()
        });
        assert!(Service::try_from(c.clone()).unwrap().authz.is_none());
        c.authz = Some(pb::Authz {
            name: "web-authz".into(),
            rules: vec![pb::AuthzRule {
                name: "r".into(),
                action: "deny".into(),
                paths: vec!["/admin/*".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let a = Service::try_from(c.clone()).unwrap().authz.unwrap();
        assert!(!a.decide(None, "GET", "/admin/x").allowed);
        if let Some(a) = c.authz.as_mut() {
            a.rules[0].action = "maybe".into();
        }
        let e = Service::try_from(c).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("authz")), "{e:?}");
    }

    #[test]
    fn accepts_valid() {
        let s = Service::try_from(cfg()).unwrap();
        let lb = LbConfig::default();
        assert_eq!(
            s.balancer.pick(&lb, None, &[]).map(|e| e.addr.port()),
            Ok(9000)
        );
        assert_eq!(s.policy, Policy::default());
    }

    #[test]
    fn converts_a_policy_and_nacks_what_it_cannot_apply() {
        let mut c = cfg();
        c.policy = Some(pb::Policy {
            retry: Some(pb::Retry {
                max_retries: 3,
                retry_on: vec!["5xx".into(), "unavailable".into(), "409".into()],
                ..Default::default()
            }),
            circuit_breaker: Some(pb::CircuitBreaker {
                consecutive_failures: 5,
                max_concurrent: 10,
                ..Default::default()
            }),
            ..Default::default()
        });
        let s = Service::try_from(c.clone()).unwrap();
        let r = s.policy.retry.unwrap();
        assert!(r.on.any_5xx);
        assert_eq!((r.on.grpc_codes, r.on.statuses), (vec![14], vec![409]));
        assert_eq!(s.policy.outlier.unwrap().consecutive_failures, 5);
        assert_eq!(s.policy.limits.unwrap().max_concurrent, 10);
        c.policy.as_mut().unwrap().retry.as_mut().unwrap().retry_on = vec!["sometimes".into()];
        assert!(
            Service::try_from(c)
                .unwrap_err()
                .to_string()
                .contains("sometimes")
        );
    }

    #[test]
    fn rejects_what_cannot_apply() {
        let mut c = cfg();
        c.route = Some(pb::Route {
            backends: vec![pb::WeightedBackend {
                version: "v1".into(),
                weight: 0,
            }],
            rules: Vec::new(),
            mirror: None,
        });
        assert!(
            Service::try_from(c)
                .unwrap_err()
                .to_string()
                .contains("weights sum to 0")
        );
        let mut c = cfg();
        c.endpoints[0].address = "nowhere".into();
        assert!(Service::try_from(c).is_err());
        let mut c = cfg();
        c.endpoints[0].address = "127.0.0.1:0".into();
        assert!(
            Service::try_from(c)
                .unwrap_err()
                .to_string()
                .contains("port 0")
        );
        let mut c = cfg();
        c.identity = "web".into();
        assert!(Service::try_from(c).is_err());
    }
}
