//! The soak: 1,000 requests a second through the mTLS pair for a long time, with a route change
//! every so often and certificates short-lived enough to be renewed several times, while the
//! test samples each sidecar's RSS and open descriptors. CI runs it for 60 s; the 30-minute run
//! of issue 32 is the same test with `MESH_SOAK_SECS=1800` (README, BENCHMARKS.md), which also
//! writes its samples to `target/soak.csv` for `benches/plot_soak.py`.
//!
//! It asserts what a long run must show: no failed request, RSS that stops growing once warm,
//! no descriptor left over (each sidecar holds as many at rest after the load as before it),
//! and that the route changes and renewals really happened under load.

use mesh_tests::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The sidecar's resident set and open descriptors, from /proc.
fn rss_and_fds(pid: u32) -> anyhow::Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((kib, fds))
}

/// The open descriptors of each of `pids`.
fn fds_now(pids: &[(&str, u32)]) -> anyhow::Result<Vec<usize>> {
    pids.iter().map(|(_, p)| Ok(rss_and_fds(*p)?.1)).collect()
}

/// One workload of `backend`: the Node.js app and its sidecar, labelled `version`.
async fn backend(mesh: &mut Mesh, version: &str) -> anyhow::Result<Sidecar> {
    peers::capacity_workload(mesh, "backend", version).await
}

/// Requests answered 200, and every other outcome (status or transport error), counted.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        if let Ok(mut f) = self.first_failures.lock()
            && f.len() < 10
        {
            f.push(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_holds_up_under_load_route_changes_and_renewals() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("MESH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let long = secs >= 600;
    // Renewals every few minutes in the long run (at ~70% of the lifetime), every ~15 s in CI.
    let ttl = if long { "300" } else { "20" };
    let route_every = Duration::from_secs(if long { 60 } else { 10 });
    let sample_every = Duration::from_secs(if long { 10 } else { 2 });
    // RSS is compared from here on (minute 5 of the long run; a third of the short one).
    let warm = Duration::from_secs(if long { 300 } else { secs / 3 });
    let rps = 1000;

    let mut mesh = Mesh::start_with(&["--cert-ttl-secs", ttl]).await?;
    let b1 = backend(&mut mesh, "v1").await?;
    let b2 = backend(&mut mesh, "v2").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://backend/work").await?.status, 200);
    set_weights(&mesh, c.admin, 50, 50, Duration::from_secs(10)).await?;
    let pids = [
        ("web", mesh.procs[c.proc_index].pid()),
        ("backend-v1", mesh.procs[b1.proc_index].pid()),
        ("backend-v2", mesh.procs[b2.proc_index].pid()),
    ];
    let pids: Vec<(&str, u32)> = pids
        .into_iter()
        .map(|(n, p)| {
            p.map(|p| (n, p))
                .ok_or_else(|| anyhow::anyhow!("{n} has no pid"))
        })
        .collect::<anyhow::Result<_>>()?;
    // Each sidecar's descriptors at rest, once both backends have been reached: listeners,
    // the control-plane stream, one connection between the sidecars per peer. A leak never
    // gives its descriptors back, so after the load they must come back to this.
    for _ in 0..20 {
        assert_eq!(get(&http, "http://backend/work").await?.status, 200);
    }
    let at_rest = fds_now(&pids)?;

    // The load: one request every 1 ms whatever the answers take (bounded in flight).
    let tally = Arc::new(Tally::default());
    let room = Arc::new(tokio::sync::Semaphore::new(2_000));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load = {
        let (tally, room, http) = (tally.clone(), room.clone(), http.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let Ok(permit) = room.clone().try_acquire_owned() else {
                    tally.failed("2,000 requests in flight: the pair stopped answering".into());
                    continue;
                };
                sent += 1;
                let (tally, http) = (tally.clone(), http.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match http.request(get_req("http://backend/work")).await {
                        Ok(r) if r.status() == 200 => {
                            use http_body_util::BodyExt;
                            match r.into_body().collect().await {
                                Ok(_) => tally.ok.fetch_add(1, Relaxed),
                                Err(e) => {
                                    tally.failed(format!("body: {e}"));
                                    0
                                }
                            };
                        }
                        Ok(r) => tally.failed(format!("status {}", r.status())),
                        Err(e) => tally.failed(format!("{e}")),
                    }
                });
            }
            sent
        })
    };

    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut samples: Vec<(f64, Vec<(u64, usize)>)> = Vec::new();
    let mut expiries = std::collections::BTreeSet::new();
    let mut next_route = start + route_every;
    let mut next_sample = start;
    let mut flips = 0u32;
    while tokio::time::Instant::now() < end {
        let now = tokio::time::Instant::now();
        if now >= next_sample {
            let row = pids
                .iter()
                .map(|(_, p)| rss_and_fds(*p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            samples.push((now.duration_since(start).as_secs_f64(), row));
            for admin in [c.admin, b1.admin, b2.admin] {
                let d = admin_get(admin, "/config_dump").await?.json;
                if let Some(e) = d["certificate"]["expires_at_unix"].as_i64() {
                    expiries.insert((admin.port(), e));
                }
            }
            next_sample += sample_every;
        }
        if now >= next_route {
            flips += 1;
            let (v1, v2) = [(100, 0), (50, 50), (0, 100), (50, 50)][flips as usize % 4];
            set_weights(&mesh, c.admin, v1, v2, Duration::from_secs(10)).await?;
            next_route += route_every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    let sent = load.await?;
    // Every request sent gets its answer (bounded wait).
    let drained = tokio::time::Instant::now() + Duration::from_secs(30);
    while room.available_permits() < 2_000 && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The load's client goes, and with it its connections to `web`; the sidecars close their
    // connections to the apps once idle (3 s, swept every second). A bounded wait; what is
    // left after it is asserted below.
    drop(http);
    let _ = until(Duration::from_secs(20), "descriptors at rest", || async {
        Ok(fds_now(&pids)?.iter().zip(&at_rest).all(|(a, r)| a <= r))
    })
    .await;
    let after = fds_now(&pids)?;

    // The samples, for the plot (the long run) and the log.
    let mut csv = String::from("secs");
    for (n, _) in &pids {
        csv.push_str(&format!(",{n}_rss_kib,{n}_fds"));
    }
    csv.push('\n');
    for (t, row) in &samples {
        csv.push_str(&format!("{t:.1}"));
        for (kib, fds) in row {
            csv.push_str(&format!(",{kib},{fds}"));
        }
        csv.push('\n');
    }
    let out = bin_dir().parent().map(|d| d.join("soak.csv"));
    if let Some(out) = &out {
        std::fs::write(out, &csv)?;
    }
    let ok = tally.ok.load(Relaxed);
    let failed = tally.failed.load(Relaxed);
    let renewals = expiries.len().saturating_sub(3);
    eprintln!(
        "soak {secs} s: {sent} sent, {ok} ok, {failed} failed, {flips} route changes, \
         {renewals} certificate renewals; samples in {out:?}"
    );
    let first_warm = samples
        .iter()
        .find(|(t, _)| *t >= warm.as_secs_f64())
        .ok_or_else(|| anyhow::anyhow!("no sample after warm-up"))?;
    let last = samples.last().ok_or_else(|| anyhow::anyhow!("no sample"))?;
    let mut bad = Vec::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let (rss0, fds0) = first_warm.1[i];
        let (rss1, fds1) = last.1[i];
        let peak_fds = samples.iter().map(|(_, r)| r[i].1).max().unwrap_or(0);
        let (rest, idle) = (at_rest[i], after[i]);
        eprintln!(
            "{name}: RSS {rss0} KiB at {:.0} s, {rss1} KiB at the end ({:+} KiB); descriptors \
             {rest} at rest before the load, {fds0} → {fds1} under it (peak {peak_fds}), \
             {idle} at rest after it",
            first_warm.0,
            rss1 as i64 - rss0 as i64
        );
        if rss1 > rss0 + 2048 {
            bad.push(format!(
                "{name}'s RSS grew {} KiB after warm-up",
                rss1 - rss0
            ));
        }
        // Under load the pools hold as many connections as requests were in flight lately,
        // which bursts decide; at rest a leak is what is left over.
        if idle > rest {
            bad.push(format!(
                "{name} holds {idle} descriptors at rest after the load, {rest} before it"
            ));
        }
    }
    let first = tally
        .first_failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    assert_eq!(failed, 0, "failed requests, the first: {first:?}");
    assert_eq!(ok, sent, "every request sent was answered");
    assert!(
        sent >= rps as u64 * secs * 9 / 10,
        "the load ran: {sent} in {secs} s"
    );
    assert!(flips >= 3, "route changes under load: {flips}");
    assert!(
        renewals >= 3,
        "certificates renewed under load: {expiries:?}"
    );
    assert!(bad.is_empty(), "{bad:?}");
    Ok(())
}
