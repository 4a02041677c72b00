//! The endpoints of the services a route sends to (`mesh_model::backends`): proxies get them
//! as versions of the routed service.

use crate::state::registry::State;
pub use mesh_model::backends::{ServiceBackend, expand, key_of, references, version_name};
use mesh_proto::v1 as pb;

/// The endpoints proxies get for the backend services of a route: each backend's endpoints
/// (of its version, if narrowed), labelled with the version name proxies route by, named
/// `<service>/<id>` so ids stay unique, and carrying the identity callers must verify.
pub fn endpoints(state: &State, backends: &[ServiceBackend]) -> Vec<pb::Endpoint> {
    let mut out = Vec::new();
    for b in backends {
        let identity = state
            .services
            .get(&b.service)
            .map(|s| s.identity.clone())
            .unwrap_or_default();
        let eps = state.endpoints.get(&b.service).into_iter().flatten();
        for e in eps.map(|(_, e)| e) {
            if !b.subset.is_empty() && e.version() != Some(b.subset.as_str()) {
                continue;
            }
            let mut p = crate::discovery::endpoint_to_proto(e);
            p.id = format!("{}/{}", b.service, p.id);
            p.labels.insert("version".into(), b.version.clone());
            if p.identity.is_empty() {
                p.identity = identity.clone();
            }
            out.push(p);
        }
    }
    out
}
