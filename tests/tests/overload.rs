//! End-to-end tests of what other meshes do not build in: hedged requests, adaptive
//! concurrency and global rate limits by quota leases. The apps are Node.js's `http` module
//! (tests/peers/capacity-app.js: a fixed number of workers, a queue behind them, and a share
//! of stalls); every figure is measured by the test, through real sidecars and control plane.

use mesh_tests::etcd;
use mesh_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

type Results = Vec<Result<(u16, String, Duration), String>>;

/// Latencies of the answers with `status`.
fn latencies(rs: &Results, status: u16) -> Vec<Duration> {
    rs.iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.0 == status)
        .map(|r| r.2)
        .collect()
}

fn count(rs: &Results, status: u16, reason: &str) -> usize {
    rs.iter()
        .filter(|r| matches!(r, Ok((s, why, _)) if *s == status && why == reason))
        .count()
}

/// Requests the capacity app counted.
async fn app_count(app: SocketAddr) -> anyhow::Result<u64> {
    let r = get(&h1_client(app), "http://app/count").await?;
    Ok(r.text.trim().parse()?)
}

fn metric(text: &str, name: &str, filter: &[(&str, &str)]) -> anyhow::Result<f64> {
    Ok(samples(text, name, &[], filter)?.values().sum())
}

/// Issue 31, item 3. Two endpoints; one stalls 1 s on 5% of its requests (round robin, so
/// the balancer does not hide it). Without hedging the p99 is the stall; with `--hedge p95`
/// on the route's rule, a request still unanswered after the learned p95 goes to the other
/// endpoint and the p99 falls to about the p95 plus one more answer. Hedges stay within the
/// retry budget, each is counted in `mesh_hedged_requests_total`, and the apps see no more
/// extra requests than were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_requests_cut_the_tail_of_a_stalling_endpoint() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let steady = peers::capacity_app(&mut mesh, 1000, 5, 0.0).await?;
    let stalling = peers::capacity_app(&mut mesh, 1000, 5, 5.0).await?;
    mesh.front("api", steady, &[]).await?;
    mesh.front("api", stalling, &[]).await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("api", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://api/work").await?.status, 200);
    mesh.set_policy(c.admin, "api", &["--lb", "round-robin"], &["RoundRobin"])
        .await?;
    mesh.meshctl(&[
        "route",
        "set",
        "api",
        "--match",
        "method:GET",
        "--name",
        "reads",
    ])
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        rules_in_dump(d, "api").iter().any(|r| r == "reads")
    })
    .await?;

    let n = 1000;
    let run = |http: HttpClient| async move {
        paced_timed(&http, 200, n, |_| get_req("http://api/work")).await
    };
    let before = app_count(steady).await? + app_count(stalling).await?;
    let plain = run(http.clone()).await;
    let mut lat = latencies(&plain, 200);
    assert_eq!(lat.len(), n, "all answered: {plain:?}");
    let p95_plain = quantile(&mut lat, 0.95).unwrap_or_default();
    let p99_plain = quantile(&mut lat, 0.99).unwrap_or_default();
    let sent_plain = app_count(steady).await? + app_count(stalling).await? - before;
    eprintln!(
        "without hedging: p95 {p95_plain:?}, p99 {p99_plain:?}, {sent_plain} requests at the apps"
    );
    assert!(
        p99_plain >= Duration::from_millis(900),
        "the stall sets the p99: {p99_plain:?}"
    );
    assert_eq!(sent_plain, n as u64, "no extra requests without hedging");

    // A rule's policy is the whole policy of its requests: round robin again, so that the
    // balancer keeps sending the stalling endpoint its half (P2C would steer away from it and
    // leave the hedges little to do).
    mesh.meshctl(&[
        "policy",
        "set",
        "api",
        "--route",
        "reads",
        "--hedge",
        "p95",
        "--lb",
        "round-robin",
    ])
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        d["services"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                s["name"] == "api"
                    && s["rules"].as_array().is_some_and(|r| {
                        r.iter()
                            .any(|r| r["policy"].to_string().contains("hedge: Some"))
                    })
            })
        })
    })
    .await?;
    // The rule learns its p95 from its first answers (20 at least), then hedges.
    let _ = paced_timed(&http, 200, 100, |_| get_req("http://api/work")).await;
    let m0 = admin_get(c.admin, "/metrics").await?.text;
    let filter = [("dst_service", "api"), ("route", "reads")];
    let hedged0 = metric(&m0, "mesh_hedged_requests_total", &filter)?;
    let before = app_count(steady).await? + app_count(stalling).await?;
    let hedged = run(http.clone()).await;
    let mut lat = latencies(&hedged, 200);
    assert_eq!(lat.len(), n, "all answered: {hedged:?}");
    let p95 = quantile(&mut lat, 0.95).unwrap_or_default();
    let p99 = quantile(&mut lat, 0.99).unwrap_or_default();
    let extra = app_count(steady).await? + app_count(stalling).await? - before - n as u64;
    let m = admin_get(c.admin, "/metrics").await?.text;
    let counted = metric(&m, "mesh_hedged_requests_total", &filter)? - hedged0;
    eprintln!(
        "with --hedge p95: p95 {p95:?}, p99 {p99:?}, {extra} extra requests, {counted} hedges counted"
    );
    assert!(
        p99 <= p95 * 2 + Duration::from_millis(50),
        "p99 {p99:?} is about the p95 {p95:?} plus the hedge delay, not the stall"
    );
    assert!(
        p99 * 5 < p99_plain,
        "p99 {p99:?} against {p99_plain:?} unhedged"
    );
    // Within the budget: 20% of the requests of the last 10 s plus 10/s. A hedge cancelled
    // (its first copy answered) before it reached the app is counted but never seen there.
    assert!(
        counted > 0.0 && counted <= (n / 5 + 100) as f64,
        "{counted} hedges"
    );
    assert!(
        extra > 0 && extra as f64 <= counted,
        "{extra} extra requests at the apps, {counted} hedges sent"
    );
    // A POST is not idempotent: never hedged.
    let posts = paced_timed(&http, 200, 200, |_| {
        let mut r = get_req("http://api/work");
        *r.method_mut() = http::Method::POST;
        r
    })
    .await;
    let m2 = admin_get(c.admin, "/metrics").await?.text;
    assert_eq!(latencies(&posts, 200).len(), 200);
    assert_eq!(
        metric(&m2, "mesh_hedged_requests_total", &[("dst_service", "api")])?,
        metric(&m, "mesh_hedged_requests_total", &[("dst_service", "api")])?,
        "POSTs are outside the rule and not idempotent"
    );
    Ok(())
}

/// Issue 31, item 2. An app with 8 workers of 20 ms (capacity ~400/s) is offered 600/s. Without
/// a limit the queue grows and the p99 explodes; with `--adaptive-concurrency on` the service's
/// own proxy finds a limit from the app's latency, sheds the excess at once with 503
/// `x-mesh-error: overloaded`, keeps the p99 of admitted requests within 2× the unloaded p99,
/// and still delivers at least 90% of the app's capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_sheds_overload_and_keeps_latency() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let app = peers::capacity_app(&mut mesh, 8, 20, 0.0).await?;
    let api = mesh.front("api", app, &[]).await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("api", 1).await?;
    let http = h1_client(c.outbound);

    // The app's capacity, measured at the app itself: 8 callers at a time, closed loop.
    let direct = h1_client(app);
    let start = tokio::time::Instant::now();
    let rs = load(&direct, 400, 8, |_| get_req("http://app/work")).await;
    let capacity = 400.0 / start.elapsed().as_secs_f64();
    anyhow::ensure!(latencies(&rs, 200).len() == 400, "{rs:?}");
    // Unloaded, through the mesh: one at a time.
    let rs = load(&http, 100, 1, |_| get_req("http://api/work")).await;
    let mut lat = latencies(&rs, 200);
    anyhow::ensure!(lat.len() == 100, "{rs:?}");
    let unloaded_p99 = quantile(&mut lat, 0.99).unwrap_or_default();
    eprintln!("capacity {capacity:.0}/s, unloaded p99 {unloaded_p99:?}");

    let offered = 600;
    let secs = 4;
    let overload = |http: HttpClient| async move {
        let start = tokio::time::Instant::now();
        let rs = paced_timed(&http, offered, offered as usize * secs, |_| {
            get_req("http://api/work")
        })
        .await;
        (rs, start.elapsed())
    };
    let (rs, _) = overload(http.clone()).await;
    let mut lat = latencies(&rs, 200);
    let p99_unlimited = quantile(&mut lat, 0.99).unwrap_or_default();
    eprintln!(
        "without the limit: p99 {p99_unlimited:?} for {} answers",
        lat.len()
    );
    assert!(
        p99_unlimited > unloaded_p99 * 5,
        "the queue grows without a limit: p99 {p99_unlimited:?}"
    );

    mesh.set_policy(
        api.admin,
        "api",
        &["--adaptive-concurrency", "on"],
        &["adaptive: Some(AdaptiveConfig"],
    )
    .await?;
    // Warm-up: min_rtt is measured, the limit climbs to where the app starts to queue.
    let _ = paced_timed(&http, offered, offered as usize, |_| {
        get_req("http://api/work")
    })
    .await;
    let (rs, took) = overload(http.clone()).await;
    let mut lat = latencies(&rs, 200);
    let admitted = lat.len();
    let shed = count(&rs, 503, "overloaded");
    let p99 = quantile(&mut lat, 0.99).unwrap_or_default();
    let goodput = admitted as f64 / took.as_secs_f64();
    let m = admin_get(api.admin, "/metrics").await?.text;
    let limit = metric(
        &m,
        "mesh_adaptive_concurrency_limit",
        &[("dst_service", "api")],
    )?;
    eprintln!(
        "with the limit: p99 {p99:?} of {admitted} admitted, {shed} shed, goodput {goodput:.0}/s \
         ({:.0}% of capacity), limit now {limit}",
        goodput * 100.0 / capacity
    );
    assert_eq!(admitted + shed, rs.len(), "only answers or sheds: {rs:?}");
    assert!(shed > 0, "the excess is shed");
    assert!(
        p99 <= unloaded_p99 * 2,
        "p99 of admitted {p99:?} within 2× the unloaded {unloaded_p99:?}"
    );
    assert!(
        goodput >= 0.9 * capacity,
        "goodput {goodput:.0}/s of {capacity:.0}/s"
    );
    let counted = metric(&m, "mesh_shed_requests_total", &[("dst_service", "api")])?;
    assert!(counted >= shed as f64, "{counted} counted, {shed} seen");
    let mut sheds = latencies(&rs, 503);
    let shed_p99 = quantile(&mut sheds, 0.99).unwrap_or_default();
    assert!(
        shed_p99 < unloaded_p99,
        "shed at once, not queued: {shed_p99:?}"
    );
    Ok(())
}

/// An app and its sidecar as one replica of `api`, labelled `version`.
async fn replica(mesh: &mut Mesh, version: &str) -> anyhow::Result<Sidecar> {
    peers::capacity_workload(mesh, "api", version).await
}

/// An open-loop load at a fixed rate, in the background: when each request was sent (since
/// the load began) and its status (0: no answer).
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(f64, u16)>>,
    start: tokio::time::Instant,
}

impl Load {
    fn start(http: HttpClient, rps: u32, max: usize) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..max {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let (http, at) = (http.clone(), start.elapsed().as_secs_f64());
                tasks.spawn(async move {
                    let r = http.request(get_req("http://api/work")).await;
                    (at, r.map_or(0, |r| r.status().as_u16()))
                });
            }
            let mut out = Vec::new();
            while let Some(r) = tasks.join_next().await {
                out.extend(r.ok());
            }
            out
        });
        Load { stop, task, start }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    async fn finish(self) -> anyhow::Result<Vec<(f64, u16)>> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}

/// Admitted (200) requests per second sent in [from, to).
fn admitted_rate(rs: &[(f64, u16)], from: f64, to: f64) -> f64 {
    rs.iter()
        .filter(|(at, s)| *s == 200 && *at >= from && *at < to)
        .count() as f64
        / (to - from)
}

/// Admitted per whole second from `from`, for the log.
fn per_second(rs: &[(f64, u16)], from: f64, secs: usize) -> Vec<usize> {
    (0..secs)
        .map(|i| {
            let t = from + i as f64;
            rs.iter()
                .filter(|(at, s)| *s == 200 && *at >= t && *at < t + 1.0)
                .count()
        })
        .collect()
}

/// Issue 31, item 1. `--global-rate-limit 200/s` on `api` holds across its replicas with no
/// rate-limit service: 3 replicas under uneven load (routed 60/30/10), then 5 (two join),
/// then 4 (one is killed). Each 10 s window admits 200/s ±10%, measured from 2 s after each
/// change (and each second of it ±20%); the rest get 429. With the control plane down every
/// proxy keeps its last share: the limit still holds, and requests are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_rate_limit_holds_across_replicas_as_they_come_and_go() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let mut replicas = Vec::new();
    for v in ["v1", "v2", "v3"] {
        replicas.push(replica(&mut mesh, v).await?);
    }
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("api", 3).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://api/work").await?.status, 200);
    mesh.meshctl(&["route", "set", "api", "--weights", "v1=60,v2=30,v3=10"])
        .await?;
    for r in &replicas {
        mesh.set_policy(
            r.admin,
            "api",
            &["--global-rate-limit", "200/s"],
            &["rate_global: Some(GlobalRate"],
        )
        .await?;
    }
    wait_config(c.admin, Duration::from_secs(10), |d| {
        route_in_dump(d, "api")
            .iter()
            .any(|(v, w)| v == "v1" && *w == 60)
    })
    .await?;

    let limit = 200.0;
    let within = |rate: f64| (limit * 0.9..=limit * 1.1).contains(&rate);
    let load = Load::start(http.clone(), 400, 400 * 60);
    // Three replicas.
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Two join (a v1 and a v2: the split stays uneven).
    let joined = {
        let a = replica(&mut mesh, "v1").await?;
        let b = replica(&mut mesh, "v2").await?;
        mesh.wait_endpoints("api", 5).await?;
        wait_config(c.admin, Duration::from_secs(10), |d| {
            endpoints_in_dump(d, "api") == 5
        })
        .await?;
        replicas.extend([a, b]);
        load.now()
    };
    tokio::time::sleep(Duration::from_secs(12)).await;
    // One leaves: killed, its quota stream ends with it.
    let left = load.now();
    let gone = replicas.remove(0);
    mesh.procs[gone.proc_index].kill();
    tokio::time::sleep(Duration::from_secs(12)).await;
    // The control plane goes away: every proxy keeps its last share.
    let cp_down = load.now();
    mesh.kill_control_plane().await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let end = load.now();
    let rs = load.finish().await?;

    let windows = [
        ("3 replicas", 2.0, 12.0),
        ("5 replicas", joined + 2.0, joined + 12.0),
        ("4 replicas", left + 2.0, left + 12.0),
    ];
    let mut bad = Vec::new();
    for (what, from, to) in windows {
        let rate = admitted_rate(&rs, from, to);
        let seconds = per_second(&rs, from - 2.0, (to - from) as usize + 2);
        eprintln!(
            "{what}: {rate:.1}/s admitted over [{from:.1}, {to:.1}) s; per second from the change: {seconds:?}"
        );
        if !within(rate) {
            bad.push(format!("{what}: {rate:.1}/s"));
        }
        // Absorbed within 2 s: every whole second from then on is near the limit too.
        if let Some(s) = seconds[2..]
            .iter()
            .find(|n| !(limit * 0.8..=limit * 1.2).contains(&(**n as f64)))
        {
            bad.push(format!("{what}: a second at {s}/s"));
        }
    }
    // Without the control plane each proxy keeps its last share: never above the limit, and
    // still serving (below it as the load moves between replicas and the shares cannot).
    let down = admitted_rate(&rs, cp_down + 1.0, end - 0.5);
    eprintln!(
        "control plane down: {down:.1}/s admitted; per second {:?}",
        per_second(&rs, cp_down, (end - cp_down) as usize)
    );
    assert!(
        down <= limit * 1.1 && down >= limit * 0.25,
        "with the control plane down: {down:.1}/s"
    );
    let other: Vec<u16> = rs
        .iter()
        .map(|r| r.1)
        .filter(|s| *s != 200 && *s != 429)
        .collect();
    // The killed replica's in-flight requests may fail; nothing else may.
    assert!(other.len() < 20, "only 200 or 429: {other:?}");
    assert!(bad.is_empty(), "outside 200/s ±10%: {bad:?}");
    let m = admin_get(replicas[0].admin, "/metrics").await?.text;
    assert!(
        metric(&m, "mesh_throttled_requests_total", &[("limit", "global")])? > 0.0,
        "{m}"
    );
    Ok(())
}

/// With `--per-caller`, each caller identity has the whole budget across all replicas: two
/// callers offering 300/s each through two replicas are each admitted 100/s ±10%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_caller_global_limit_gives_each_caller_the_budget() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let mut replicas = Vec::new();
    for v in ["v1", "v1"] {
        replicas.push(replica(&mut mesh, v).await?);
    }
    let a = mesh.client("web").await?;
    let b = mesh.client("batch").await?;
    mesh.wait_endpoints("api", 2).await?;
    let (ha, hb) = (h1_client(a.outbound), h1_client(b.outbound));
    assert_eq!(get(&ha, "http://api/work").await?.status, 200);
    assert_eq!(get(&hb, "http://api/work").await?.status, 200);
    for r in &replicas {
        mesh.set_policy(
            r.admin,
            "api",
            &["--global-rate-limit", "100/s", "--per-caller"],
            &["per_caller: true"],
        )
        .await?;
    }
    let (la, lb) = (
        Load::start(ha, 300, 300 * 20),
        Load::start(hb, 300, 300 * 20),
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (ra, rb) = (la.finish().await?, lb.finish().await?);
    for (who, rs) in [("web", &ra), ("batch", &rb)] {
        let rate = admitted_rate(rs, 2.0, 8.0);
        eprintln!(
            "{who}: {rate:.1}/s admitted; per second {:?}",
            per_second(rs, 0.0, 8)
        );
        assert!((90.0..=110.0).contains(&rate), "{who}: {rate:.1}/s");
    }
    Ok(())
}

/// Two control-plane replicas on one etcd, each with one replica of `api` connected to it,
/// under uneven load (75/25): the replicas split the global limit by their proxies' demand
/// (they ask each other every 500 ms), so the whole mesh admits the limit, not the limit
/// once per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_replicas_split_a_global_limit_between_them() -> anyhow::Result<()> {
    if let Some(why) = etcd::missing() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let etcd = etcd::Etcd::start(None, "127.0.0.1", dir.path()).await?;
    let ca = shared_ca(dir.path())?;
    let mut a = Mesh::replica(&etcd.url(), &ca, "a", &[]).await?;
    let mut b = Mesh::replica(&etcd.url(), &ca, "b", &[]).await?;
    let on_a = replica(&mut a, "v1").await?;
    let on_b = replica(&mut b, "v2").await?;
    let c = a.client("web").await?;
    a.wait_endpoints("api", 2).await?;
    let http = h1_client(c.outbound);
    assert_eq!(get(&http, "http://api/work").await?.status, 200);
    a.meshctl(&["route", "set", "api", "--weights", "v1=75,v2=25"])
        .await?;
    a.set_policy(
        on_a.admin,
        "api",
        &["--global-rate-limit", "100/s"],
        &["rate_global: Some(GlobalRate"],
    )
    .await?;
    wait_config(on_b.admin, Duration::from_secs(10), |d| {
        policy_in_dump(d, "api").is_some_and(|p| p.contains("rate_global: Some(GlobalRate"))
    })
    .await?;
    wait_config(c.admin, Duration::from_secs(10), |d| {
        route_in_dump(d, "api")
            .iter()
            .any(|(v, w)| v == "v1" && *w == 75)
    })
    .await?;
    let load = Load::start(http, 300, 300 * 20);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let rs = load.finish().await?;
    let rate = admitted_rate(&rs, 2.0, 12.0);
    eprintln!(
        "two control-plane replicas: {rate:.1}/s admitted; per second {:?}",
        per_second(&rs, 0.0, 12)
    );
    assert!((90.0..=110.0).contains(&rate), "{rate:.1}/s against 100/s");
    Ok(())
}
