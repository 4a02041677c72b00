//! The registry on its own, over the file store in a temporary directory: what it refuses,
//! what one write changes, and the upgrade of stores written before namespaces. Multi-threaded
//! runtimes: the file store writes in `block_in_place`.

use super::*;
use crate::ca::spiffe::SpiffeId;
use crate::state::records::EndpointRecord;
use crate::state::store::file::FileStore;
use mesh_proto::v1 as pb;

async fn open(dir: &std::path::Path) -> Registry {
    let store = Arc::new(FileStore::open(dir).expect("file store"));
    Registry::open(store, "mesh.local".into())
        .await
        .expect("registry")
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("mesh.local", ns, sa).expect("identity")
}

fn ep(id: &str, port: u16, version: &str) -> EndpointRecord {
    EndpointRecord {
        id: id.into(),
        address: format!("127.0.0.1:{port}"),
        labels: [("version".to_string(), version.to_string())].into(),
        ready: true,
        leased: false,
        app_port: 0,
        kubernetes: false,
        identity: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_make_services_and_identities_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let before = r.state().revision;
    r.upsert_endpoint("api.team-a", &id("team-a", "api"), ep("a1", 1, "v1"))
        .await
        .unwrap();
    let st = r.state();
    assert!(st.revision > before);
    let svc = &st.services["api.team-a"];
    assert_eq!(
        (svc.name.as_str(), svc.namespace.as_str()),
        ("api", "team-a")
    );
    assert_eq!(st.versions_of("api.team-a"), ["v1"]);
    // The same write again changes nothing (no new revision).
    let rev = st.revision;
    r.upsert_endpoint("api.team-a", &id("team-a", "api"), ep("a1", 1, "v1"))
        .await
        .unwrap();
    assert_eq!(r.state().revision, rev);
    // Another account, or another namespace's identity: refused, nothing written.
    for (who, why) in [
        (id("team-a", "intruder"), "has identity"),
        (id("team-b", "api"), "is in namespace"),
    ] {
        let e = r
            .upsert_endpoint("api.team-a", &who, ep("x", 2, "v1"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
    assert_eq!(r.state().revision, rev);
    // An endpoint the Kubernetes view vouches for may run under another account.
    let mut k = ep("pod-b.team-a", 3, "v2");
    k.kubernetes = true;
    r.upsert_endpoint("api.team-a", &id("team-a", "canary"), k)
        .await
        .unwrap();
    let st = r.state();
    assert_eq!(
        st.endpoints["api.team-a"]["pod-b.team-a"].identity,
        "spiffe://mesh.local/ns/team-a/sa/canary"
    );
    // Removal by the service's identity only.
    let e = r
        .remove_endpoint("api.team-a", "a1", Some(&id("team-a", "intruder")))
        .await;
    assert!(e.is_err());
    r.remove_endpoint("api.team-a", "a1", Some(&id("team-a", "api")))
        .await
        .unwrap();
    assert!(!r.state().endpoints["api.team-a"].contains_key("a1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_checked_against_the_model_and_the_versions() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    r.upsert_endpoint("api.default", &id("default", "api"), ep("a1", 1, "v1"))
        .await
        .unwrap();
    let route = |v: &str, w: u32| pb::Route {
        backends: vec![pb::WeightedBackend {
            version: v.into(),
            weight: w,
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = r
        .set_route("api.default", route("v9", 1), true, 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown version \"v9\""), "{e}");
    let e = r
        .set_route("api.default", route("v1", 0), true, 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("weights sum to 0"), "{e}");
    let e = r
        .set_route("nosuch.default", route("v1", 1), true, 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown service"), "{e}");
    let v = r
        .set_route("api.default", route("v1", 1), true, 0)
        .await
        .unwrap();
    // Optimistic concurrency: a stale expected revision is refused.
    let e = r
        .set_route("api.default", route("v1", 2), true, v.revision + 100)
        .await;
    assert!(e.is_err());
    // Skipping validation stores what the model would refuse (proxies NACK it).
    r.set_route("api.default", route("v1", 0), false, 0)
        .await
        .unwrap();
    assert_eq!(
        r.state().route_of("api.default").route.backends[0].weight,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_default_touches_each_service_of_the_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    r.upsert_endpoint("a.team-a", &id("team-a", "a"), ep("1", 1, "v1"))
        .await
        .unwrap();
    r.upsert_endpoint("b.team-b", &id("team-b", "b"), ep("2", 2, "v1"))
        .await
        .unwrap();
    let st = r.state();
    let (a, b) = (
        st.service_versions["a.team-a"],
        st.service_versions["b.team-b"],
    );
    r.set_authz_default("team-a", "deny-all").await.unwrap();
    let st = r.state();
    assert!(
        st.service_versions["a.team-a"] > a,
        "team-a's service is pushed again"
    );
    assert_eq!(st.service_versions["b.team-b"], b, "team-b's is not");
}

#[test]
fn a_store_without_namespaces_gets_renamed_keys() {
    let rec = |ns: &str| {
        serde_json::to_vec(&ServiceRecord {
            name: "api".into(),
            namespace: ns.into(),
            identity: format!("spiffe://mesh.local/ns/{ns}/sa/api"),
            external: None,
        })
        .unwrap()
    };
    let contents = crate::state::store::Contents {
        revision: 3,
        entries: vec![
            ("services/api".into(), rec("shop"), 1),
            ("endpoints/api/e1".into(), b"{}".to_vec(), 2),
            ("routes/api".into(), b"{}".to_vec(), 3),
            ("services/web.default".into(), rec("default"), 1),
            ("tokens/abc".into(), b"{}".to_vec(), 1),
        ],
    };
    let ops = namespace_upgrade(&contents);
    let puts: Vec<&str> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Put(k, _) => Some(k.as_str()),
            Op::Delete(_) => None,
        })
        .collect();
    let deletes: Vec<&str> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Delete(k) => Some(k.as_str()),
            Op::Put(..) => None,
        })
        .collect();
    assert_eq!(
        puts,
        [
            "services/api.shop",
            "endpoints/api.shop/e1",
            "routes/api.shop"
        ]
    );
    assert_eq!(deletes, ["services/api", "endpoints/api/e1", "routes/api"]);
    // An upgraded store needs nothing more.
    let done = crate::state::store::Contents {
        revision: 4,
        entries: vec![("services/api.shop".into(), rec("shop"), 4)],
    };
    assert!(namespace_upgrade(&done).is_empty());
}
