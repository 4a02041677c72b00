//! proto → domain. The only place the proxy sees prost types; everything is validated here, and
//! anything the proxy cannot apply becomes an error that NACKs the whole response.

use crate::balance::Endpoint;
use crate::http::router::Router;
use crate::policy::Policy;
use crate::snapshot::{BackendService, ServiceConfig};
use mesh_proto::v1 as pb;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("resource {0}: missing service config")]
    Empty(String),
    #[error("service {service}: {reason}")]
    Invalid { service: String, reason: String },
}

impl TryFrom<pb::ServiceConfig> for ServiceConfig {
    type Error = ConvertError;

    fn try_from(c: pb::ServiceConfig) -> Result<Self, ConvertError> {
        let bad = |reason: String| ConvertError::Invalid {
            service: c.name.clone(),
            reason,
        };
        if c.name.is_empty() {
            return Err(bad("empty name".into()));
        }
        let external = c
            .external
            .as_ref()
            .map(crate::outbound::external::External::from_proto)
            .transpose()
            .map_err(bad)?
            .map(Arc::new);
        if external.is_none() && !c.identity.starts_with("spiffe://") {
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
            if !e.identity.is_empty() && !e.identity.starts_with("spiffe://") {
                return Err(bad(format!(
                    "endpoint {}: identity {:?} is not a SPIFFE id",
                    e.id, e.identity
                )));
            }
            endpoints.push(Endpoint {
                id: e.id.as_str().into(),
                addr,
                version: e.labels.get("version").map(|v| Arc::from(v.as_str())),
                ready: e.ready,
                app_port: u16::try_from(e.app_port).ok().filter(|p| *p != 0),
                identity: (!e.identity.is_empty()).then(|| Arc::from(e.identity.as_str())),
            });
        }
        // Checked by the same model the control plane admits with (`mesh-model`).
        let route = match &c.route {
            Some(r) => mesh_model::Route::try_from(r).map_err(|e| bad(e.to_string()))?,
            None => mesh_model::Route::default(),
        };
        let policy = match &c.policy {
            Some(p) => Policy::try_from(p).map_err(|e| bad(e.to_string()))?,
            None => Policy::default(),
        };
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
        let app_protocols = mesh_model::AppProtocols::try_from(&c.app_protocols[..])
            .map_err(|e| bad(e.to_string()))?;
        let backend_services = c
            .backend_services
            .iter()
            .map(|b| BackendService {
                version: b.version.as_str().into(),
                service: b.service.as_str().into(),
                identity: b.identity.as_str().into(),
                subset: b.subset.as_str().into(),
            })
            .collect();
        Ok(ServiceConfig {
            external,
            backend_services,
            vips,
            vip_ports,
            app_protocols,
            policy,
            authz,
            mtls_permissive,
            router: Router::new(route.rules),
            mirror: route.mirror,
            name: c.name.as_str().into(),
            namespace: c.namespace.as_str().into(),
            identity: c.identity.as_str().into(),
            endpoints,
            backends: route.backends,
        })
    }
}

/// Converts one resource into its name, its service's config and its version.
pub fn resource(r: pb::Resource) -> Result<(String, ServiceConfig, u64), ConvertError> {
    match r.kind {
        Some(pb::resource::Kind::Service(cfg)) => {
            let s = ServiceConfig::try_from(cfg)?;
            Ok((r.name, s, r.version))
        }
        Some(pb::resource::Kind::Trust(_) | pb::resource::Kind::Egress(_)) | None => {
            Err(ConvertError::Empty(r.name))
        }
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
                identity: String::new(),
            }],
            route: Some(pb::Route {
                backends: vec![pb::WeightedBackend {
                    version: "v1".into(),
                    weight: 1,
                    ..Default::default()
                }],
                rules: Vec::new(),
                mirror: None,
            }),
            policy: None,
            authz: None,
            mtls_mode: String::new(),
            vips: Vec::new(),
            ports: Vec::new(),
            app_protocols: Vec::new(),
            backend_services: Vec::new(),
            external: None,
        }
    }

    #[test]
    fn authz_is_kept_only_when_it_can_deny_and_bad_rules_are_nacked() {
        let mut c = cfg();
        c.authz = Some(pb::Authz {
            default_action: "allow-all".into(),
            ..Default::default()
        });
        assert!(ServiceConfig::try_from(c.clone()).unwrap().authz.is_none());
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
        let a = ServiceConfig::try_from(c.clone()).unwrap().authz.unwrap();
        assert!(!a.decide(None, "GET", "/admin/x").allowed);
        if let Some(a) = c.authz.as_mut() {
            a.rules[0].action = "maybe".into();
        }
        let e = ServiceConfig::try_from(c).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("authz")), "{e:?}");
    }

    #[test]
    fn accepts_valid() {
        let s = ServiceConfig::try_from(cfg()).unwrap();
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.endpoints[0].addr.port(), 9000);
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
        let s = ServiceConfig::try_from(c.clone()).unwrap();
        let r = s.policy.retry.unwrap();
        assert!(r.on.any_5xx);
        assert_eq!((r.on.grpc_codes, r.on.statuses), (vec![14], vec![409]));
        assert_eq!(s.policy.outlier.unwrap().consecutive_failures, 5);
        assert_eq!(s.policy.limits.unwrap().max_concurrent, 10);
        c.policy.as_mut().unwrap().retry.as_mut().unwrap().retry_on = vec!["sometimes".into()];
        assert!(
            ServiceConfig::try_from(c)
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
                ..Default::default()
            }],
            rules: Vec::new(),
            mirror: None,
        });
        assert!(
            ServiceConfig::try_from(c)
                .unwrap_err()
                .to_string()
                .contains("weights sum to 0")
        );
        let mut c = cfg();
        c.endpoints[0].address = "nowhere".into();
        assert!(ServiceConfig::try_from(c).is_err());
        let mut c = cfg();
        c.endpoints[0].address = "127.0.0.1:0".into();
        assert!(
            ServiceConfig::try_from(c)
                .unwrap_err()
                .to_string()
                .contains("port 0")
        );
        let mut c = cfg();
        c.identity = "web".into();
        assert!(ServiceConfig::try_from(c).is_err());
    }
}
