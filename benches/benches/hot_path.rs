//! Per-request costs on the proxy's hot path: picking an endpoint, resolving a known service from
//! the current snapshot, and mapping a Host to a service name.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_proxy::outbound::service_key;
use mesh_proxy::snapshot::{Snapshot, Snapshots};
use std::hint::black_box;
use std::sync::Arc;

fn pick(c: &mut Criterion) {
    let svc = mesh_benches::service(10);
    c.bench_function("balancer_pick_90_10_10_endpoints", |b| {
        b.iter(|| black_box(svc.balancer.pick()))
    });
}

fn resolve(c: &mut Criterion) {
    let (snapshots, _rx) = Snapshots::new();
    let mut snap = Snapshot {
        synced: true,
        ..Snapshot::default()
    };
    for i in 0..100 {
        let mut s = mesh_benches::service(4);
        s.name = format!("svc{i}").into();
        snap.services.insert(s.name.clone(), Arc::new(s));
    }
    snapshots.store(snap);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("resolve_known_service_of_100", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(snapshots.resolve(black_box("svc42")).await.is_ok()) })
        })
    });
}

fn host(c: &mut Criterion) {
    c.bench_function("service_key_fqdn", |b| {
        b.iter(|| black_box(service_key(black_box("backend.default.svc.cluster.local"))))
    });
}

criterion_group!(benches, pick, resolve, host);
criterion_main!(benches);
