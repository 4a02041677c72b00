//! Fixtures shared by the benchmarks.

use mesh_proto::v1 as pb;
use mesh_proxy::snapshot::Service;

/// A service with `n` endpoints split across v1 and v2, routed 90/10.
pub fn service(n: usize) -> Service {
    let endpoints = (0..n)
        .map(|i| pb::Endpoint {
            id: format!("ep{i}"),
            address: format!("127.0.0.1:{}", 20000 + i),
            labels: [(
                "version".to_string(),
                if i % 2 == 0 { "v1" } else { "v2" }.to_string(),
            )]
            .into(),
            ready: true,
        })
        .collect();
    let cfg = pb::ServiceConfig {
        name: "backend".into(),
        namespace: "default".into(),
        identity: "spiffe://mesh.local/ns/default/sa/backend".into(),
        endpoints,
        route: Some(pb::Route {
            backends: vec![
                pb::WeightedBackend {
                    version: "v1".into(),
                    weight: 90,
                },
                pb::WeightedBackend {
                    version: "v2".into(),
                    weight: 10,
                },
            ],
        }),
    };
    match Service::try_from(cfg) {
        Ok(s) => s,
        Err(e) => panic!("fixture is valid: {e}"),
    }
}
