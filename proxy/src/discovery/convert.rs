//! proto → domain. The only place the proxy sees prost types; everything is validated here, and
//! anything the proxy cannot apply becomes an error that NACKs the whole response.

use crate::balance::{Balancer, Endpoint};
use crate::snapshot::Service;
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
        let balancer = Balancer::new(&endpoints, &backends);
        Ok(Service {
            name: c.name.as_str().into(),
            namespace: c.namespace.as_str().into(),
            identity: c.identity.as_str().into(),
            version: 0,
            endpoints,
            backends,
            balancer,
        })
    }
}

/// Converts one resource into its name and service.
pub fn resource(r: pb::Resource) -> Result<(String, Service), ConvertError> {
    match r.kind {
        Some(pb::resource::Kind::Service(cfg)) => {
            let mut s = Service::try_from(cfg)?;
            s.version = r.version;
            Ok((r.name, s))
        }
        None => Err(ConvertError::Empty(r.name)),
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
            }],
            route: Some(pb::Route {
                backends: vec![pb::WeightedBackend {
                    version: "v1".into(),
                    weight: 1,
                }],
            }),
        }
    }

    #[test]
    fn accepts_valid() {
        let s = Service::try_from(cfg()).unwrap();
        assert_eq!(s.balancer.pick().map(|e| e.addr.port()), Some(9000));
    }

    #[test]
    fn rejects_what_cannot_apply() {
        let mut c = cfg();
        c.route = Some(pb::Route {
            backends: vec![pb::WeightedBackend {
                version: "v1".into(),
                weight: 0,
            }],
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
