//! `mesh-proxy init` in a network namespace made by the test (needs root and iptables, which
//! scripts/install-test-deps.sh installs; skipped with a message otherwise): the rules install
//! once however often init runs, redirect the pod's outbound and self-addressed traffic to the
//! proxy's ports with the original destination readable (SO_ORIGINAL_DST), leave the
//! excluded ports alone, and `--cleanup` removes them.

use mesh_tests::netns::{Lan, Netns, cannot_run, in_netns, ip, spawn_in};
use mesh_tests::*;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A namespace with lo and a "pod" interface 10.200.0.2/24 (a veth; default route).
fn pod_netns() -> anyhow::Result<Netns> {
    let ns = Netns::named(&format!("mesh-test-{}", std::process::id()))?;
    for args in [
        vec![
            "link",
            "add",
            "pod0",
            "type",
            "veth",
            "peer",
            "name",
            "pod0-peer",
        ],
        vec!["addr", "add", "10.200.0.2/24", "dev", "pod0"],
        vec!["link", "set", "pod0", "up"],
        vec!["link", "set", "pod0-peer", "up"],
        vec!["route", "add", "default", "dev", "pod0"],
    ] {
        let mut a = vec!["-n", ns.0.as_str()];
        a.extend(args);
        ip(&a)?;
    }
    Ok(ns)
}

/// The nat rules (`-A ...` lines) of one family.
fn rules(ns: &Netns, save: &str) -> anyhow::Result<Vec<String>> {
    let (ok, out, err) = ns.exec(std::path::Path::new(save), &["-t", "nat"])?;
    anyhow::ensure!(ok, "{save}: {err}");
    Ok(out
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(String::from)
        .collect())
}

const TOOLS: &[&str] = &["iptables-restore", "iptables-save"];

/// Connects to `dst` from inside the namespace and accepts on `listener` (also in the
/// namespace): returns the destination the accepted socket was originally sent to, or None if
/// nothing arrived (the connection was not redirected).
fn redirected_to(
    ns: &str,
    listeners: &[SocketAddr],
    dst: SocketAddr,
) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    let listeners = listeners.to_vec();
    in_netns(ns, move || {
        let ls: Vec<TcpListener> = listeners
            .iter()
            .map(|a| {
                let l = TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect::<anyhow::Result<_>>()?;
        let _client = TcpStream::connect_timeout(&dst, Duration::from_millis(500));
        let mut got = Vec::new();
        for l in &ls {
            let mut orig = None;
            for _ in 0..20 {
                match l.accept() {
                    Ok((s, _)) => {
                        let o = nix::sys::socket::getsockopt(
                            &s,
                            nix::sys::socket::sockopt::OriginalDst,
                        )?;
                        let ip = std::net::Ipv4Addr::from(u32::from_be(o.sin_addr.s_addr));
                        orig = Some(SocketAddr::from((ip, u16::from_be(o.sin_port))));
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            got.push(orig);
        }
        Ok(got)
    })
}

/// Test 2 of the Kubernetes issue, its init-step part.
#[test]
fn init_redirects_pod_traffic_in_a_network_namespace() -> anyhow::Result<()> {
    if let Some(why) = cannot_run(TOOLS) {
        eprintln!("SKIPPED init_redirects_pod_traffic_in_a_network_namespace: {why}");
        return Ok(());
    }
    let proxy = bin_dir().join("mesh-proxy");
    let ns = pod_netns()?;
    let init = |extra: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let mut a = vec![
            "init",
            "--skip-inbound-ports",
            "15000",
            "--skip-outbound-ports",
            "5432",
        ];
        a.extend(extra);
        ns.exec(&proxy, &a)
    };
    let (ok, _, err) = init(&[])?;
    assert!(ok, "{err}");
    let first = rules(&ns, "iptables-save")?;
    for want in [
        "-A OUTPUT -p tcp -j MESH_OUTPUT",
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A MESH_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A MESH_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A MESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(first.iter().any(|l| l == want), "{want} not in {first:#?}");
    }
    // Again: the same rules, once.
    let (ok, _, err) = init(&[])?;
    assert!(ok, "{err}");
    assert_eq!(rules(&ns, "iptables-save")?, first);

    let (out_port, in_port): (SocketAddr, SocketAddr) =
        ("127.0.0.1:15001".parse()?, "0.0.0.0:15006".parse()?);
    // The app calls another pod: to the outbound port, original destination intact.
    let dst: SocketAddr = "10.200.0.9:80".parse()?;
    assert_eq!(
        redirected_to(&ns.0, &[out_port, in_port], dst)?,
        [Some(dst), None]
    );
    // The app calls its own pod IP: through the inbound side.
    let own: SocketAddr = "10.200.0.2:8080".parse()?;
    assert_eq!(
        redirected_to(&ns.0, &[out_port, in_port], own)?,
        [None, Some(own)]
    );
    // An excluded port is not redirected.
    let db: SocketAddr = "10.200.0.9:5432".parse()?;
    assert_eq!(
        redirected_to(&ns.0, &[out_port, in_port], db)?,
        [None, None]
    );

    // A bad CIDR: refused before anything changes.
    let (ok, _, err) = init(&["--skip-outbound-cidrs", "10.0.0.0/40"])?;
    assert!(!ok && err.contains("10.0.0.0/40"), "{err}");
    assert_eq!(rules(&ns, "iptables-save")?, first);

    let (ok, _, err) = ns.exec(&proxy, &["init", "--cleanup"])?;
    assert!(ok, "{err}");
    let left = rules(&ns, "iptables-save")?;
    assert!(left.iter().all(|l| !l.contains("MESH_")), "{left:#?}");
    assert_eq!(redirected_to(&ns.0, &[out_port], dst)?, [None]);
    Ok(())
}

/// Three namespaces on a bridge: `sw` (the bridge, 10.201.0.1, runs the control plane) and two
/// "pods", `a` (10.201.0.2) and `b` (10.201.0.3).
struct Pods<'a> {
    sw: &'a Netns,
    a: &'a Netns,
    b: &'a Netns,
}

/// Sends `req` from inside `ns` until the answer is a 200 (the proxy learns the destination
/// from the control plane shortly after it starts), for at most 10 s; returns the last answer.
async fn get_until_ok(ns: &str, dst: &str, req: &'static [u8]) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = exchange(ns, dst, req)?;
        if r.starts_with("HTTP/1.1 200") || tokio::time::Instant::now() > deadline {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `req` on a new connection from inside `ns` and reads until the server closes (or 5 s).
fn exchange(ns: &str, dst: &str, req: &'static [u8]) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let dst: SocketAddr = dst.parse()?;
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req)?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Ok(String::from_utf8_lossy(&out).to_string())
    })
}

/// A server-first app on `port` in namespace `ns`: greets each of `n` connections, then echoes
/// one read. Bound before it returns; gives up after 30 s without a connection.
fn banner_server(
    ns: &str,
    port: u16,
    n: usize,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    use std::io::{Read, Write};
    let l = in_netns(ns, move || Ok(TcpListener::bind(("0.0.0.0", port))?))?;
    l.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for _ in 0..n {
            let mut c = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        anyhow::ensure!(
                            std::time::Instant::now() < deadline,
                            "no connection to :{port}"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            c.set_nonblocking(false)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"HELLO from b\n")?;
            let mut buf = [0u8; 64];
            let got = c.read(&mut buf)?;
            c.write_all(&buf[..got])?;
        }
        Ok(())
    }))
}

/// Connects to a [`banner_server`] from inside `ns` without sending anything: checks the
/// greeting and the echo; returns how long the greeting took.
fn banner_via(ns: &str, dst: &str) -> anyhow::Result<Duration> {
    use std::io::{Read, Write};
    let dst: SocketAddr = dst.parse()?;
    in_netns(ns, move || {
        let start = std::time::Instant::now();
        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf)?;
        let took = start.elapsed();
        anyhow::ensure!(&buf[..n] == b"HELLO from b\n", "{dst}: {:?}", &buf[..n]);
        c.write_all(b"ping\n")?;
        let n = c.read(&mut buf)?;
        anyhow::ensure!(&buf[..n] == b"ping\n", "{dst} echo: {:?}", &buf[..n]);
        Ok(took)
    })
}

/// Test 2 of the Kubernetes issue: two "pods" on a bridge, each with its app, `mesh-proxy`
/// running as the proxy user and the redirect of `mesh-proxy init`. The apps use each other's
/// plain IP:port: HTTP is served through both sidecars over mTLS (the server app sees the
/// caller's SPIFFE identity; the server's sidecar counts an mTLS handshake and an inbound
/// request from it), a server-first opaque TCP protocol on another port passes without
/// stalling, a destination outside the mesh is passed through, and a client outside the mesh
/// cannot reach the server app in plaintext. Egress (issue 30): HTTP to a declared external's
/// address goes through the sidecar as a call of it; under registry-only egress an undeclared
/// destination gets 502 `egress-denied` (HTTP) or a closed stream (TCP) while the external
/// still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_talk_by_plain_ip_with_mtls_on_the_wire() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    if let Some(why) = cannot_run(TOOLS) {
        eprintln!("SKIPPED pods_talk_by_plain_ip_with_mtls_on_the_wire: {why}");
        return Ok(());
    }
    let lan = Lan::new("10.201.0", &["a", "b"])?;
    let pods = Pods {
        sw: &lan.sw,
        a: &lan.hosts[0],
        b: &lan.hosts[1],
    };
    let dir = tempfile::tempdir()?;
    // The proxies run as uid 2102: what they read must be readable by it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    // The API server (in the control plane's namespace) knows one Service, backend, with
    // ClusterIP 10.96.0.50: port 80 reaches the app's 8080; 5000 and 5001 reach two
    // server-first apps, on 9000 (undeclared) and 9001 (declared opaque by `appProtocol`).
    let l = in_netns(&pods.sw.0, || {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let api = mesh_tests::kube_api::FakeKubeApi::start_on(
        l,
        vec![(
            mesh_tests::kube_api::Kind::Service,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "backend", "namespace": "default", "uid": "svc-b"},
                "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                         "ports": [
                             {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                             {"name": "banner", "port": 5000, "targetPort": 9000, "protocol": "TCP"},
                             {"name": "db", "port": 5001, "targetPort": 9001, "protocol": "TCP",
                              "appProtocol": "linkerd.io/opaque"}]}
            }),
        )],
    )
    .await?;
    // Pods reach ClusterIPs by their default route (the redirect takes them before it).
    ip(&[
        "-n",
        &pods.a.0,
        "route",
        "add",
        "default",
        "via",
        "10.201.0.1",
    ])?;
    let (_cp, _) = spawn_in(
        pods.sw,
        None,
        "mesh-control-plane",
        &s(&[
            "--data-dir",
            &d("cp"),
            "--grpc-addr",
            "10.201.0.1:15010",
            "--admin-addr",
            "10.201.0.1:15011",
            "--http-addr",
            "10.201.0.1:15014",
            "--kube-api",
            &api.url,
        ]),
        dir.path().join("cp.log"),
    )
    .await?;
    std::fs::copy(
        dir.path().join("cp/ca/bundle.pem"),
        dir.path().join("bundle.pem"),
    )?;
    for sa in ["web", "backend"] {
        let (ok, out, err) = pods.sw.exec(
            &bin_dir().join("meshctl"),
            &[
                "--server",
                "https://10.201.0.1:15011",
                "--data-dir",
                &d("cp"),
                "token",
                "create",
                "--identity",
                &format!("default/{sa}"),
            ],
        )?;
        anyhow::ensure!(ok, "token: {err}");
        std::fs::write(dir.path().join(format!("{sa}.token")), out.trim())?;
    }

    // Pod b: the backend app on :8080, a server-first protocol on :9000, its proxy.
    let (_app, _) = spawn_in(
        pods.b,
        None,
        "mesh-example",
        &s(&[
            "serve",
            "--service",
            "backend",
            "--version",
            "v1",
            "--listen",
            "0.0.0.0:8080",
        ]),
        dir.path().join("app-b.log"),
    )
    .await?;
    // Server-first apps: 9000 is called three times (by plain IP, then twice by ClusterIP),
    // 9001 once.
    let banner = banner_server(&pods.b.0, 9000, 3)?;
    let declared = banner_server(&pods.b.0, 9001, 1)?;
    let proxy_args = |sa: &str, extra: &[&str]| {
        let mut v = s(&[
            "--control-plane",
            "https://10.201.0.1:15010",
            "--ca-file",
            &d("bundle.pem"),
            "--token-file",
            &d(&format!("{sa}.token")),
            "--service-account",
            sa,
            "--transparent",
            "--outbound-addr",
            "127.0.0.1:15001",
            "--admin-addr",
            "0.0.0.0:15000",
        ]);
        v.extend(s(extra));
        v
    };
    for (pod, extra) in [
        (&pods.b, vec!["--skip-inbound-ports", "15000"]),
        (&pods.a, vec!["--no-inbound"]),
    ] {
        let mut a = vec!["init", "--proxy-uid", "2102"];
        a.extend(extra);
        let (ok, _, err) = pod.exec(&bin_dir().join("mesh-proxy"), &a)?;
        anyhow::ensure!(ok, "init: {err}");
    }
    let (_pb, _) = spawn_in(
        pods.b,
        Some(2102),
        "mesh-proxy",
        &proxy_args(
            "backend",
            &[
                "--service",
                "backend",
                "--service-version",
                "v1",
                "--app-port",
                "8080",
                "--inbound-addr",
                "0.0.0.0:15006",
                "--advertise-addr",
                "10.201.0.3:15006",
            ],
        ),
        dir.path().join("proxy-b.log"),
    )
    .await?;
    let (_pa, _) = spawn_in(
        pods.a,
        Some(2102),
        "mesh-proxy",
        &proxy_args("web", &[]),
        dir.path().join("proxy-a.log"),
    )
    .await?;

    // HTTP by plain IP, once a's proxy knows b's endpoint.
    let reply = get_until_ok(
        &pods.a.0,
        "10.201.0.3:8080",
        b"GET /hello HTTP/1.1\r\nHost: 10.201.0.3:8080\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains("spiffe://mesh.local/ns/default/sa/web"),
        "the app saw the caller's identity: {reply}"
    );

    // A slow HTTP client on a port seen speaking HTTP: its first bytes come 500 ms after it
    // connected, past the 300 ms detection window, and it is still served as HTTP through
    // both sidecars (the app sees the caller's identity, which an opaque tunnel would not
    // carry) rather than tunnelled.
    let slow = in_netns(&pods.a.0, || {
        let dst: SocketAddr = "10.201.0.3:8080".parse()?;
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        std::thread::sleep(Duration::from_millis(500));
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: 10.201.0.3:8080\r\nConnection: close\r\n\r\n")?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Ok(String::from_utf8_lossy(&out).to_string())
    })?;
    assert!(
        slow.starts_with("HTTP/1.1 200") && slow.contains("spiffe://mesh.local/ns/default/sa/web"),
        "slow client: {slow}"
    );

    // A WebSocket by plain IP (tungstenite as the client, the app's tokio-tungstenite echo):
    // the upgrade crosses the transparent outbound, a dedicated mTLS connection and the
    // inbound, then messages flow both ways.
    let echoed = in_netns(&pods.a.0, || {
        use tokio_tungstenite::tungstenite::{Message, client::client};
        let tcp = TcpStream::connect_timeout(&"10.201.0.3:8080".parse()?, Duration::from_secs(3))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (mut ws, resp) = client("ws://10.201.0.3:8080/ws", tcp)
            .map_err(|e| anyhow::anyhow!("WebSocket handshake: {e}"))?;
        anyhow::ensure!(resp.status() == 101, "{resp:?}");
        let mut got = Vec::new();
        for m in ["hello", "again"] {
            ws.send(Message::text(m))?;
            got.push(ws.read()?.into_text()?.as_str().to_string());
        }
        Ok(got)
    })?;
    assert_eq!(echoed, ["echo:hello", "echo:again"]);

    // HTTP to the Service's ClusterIP: the same call, routed as service backend.
    let reply = get_until_ok(
        &pods.a.0,
        "10.96.0.50:80",
        b"GET /by-vip HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains("spiffe://mesh.local/ns/default/sa/web") && reply.contains("/by-vip"),
        "the app saw the caller's identity: {reply}"
    );

    // Server-first opaque TCP on another port than the app's: opaque without detection, the
    // banner arrives though the client sent nothing.
    banner_via(&pods.a.0, "10.201.0.3:9000")?;
    // By ClusterIP, where HTTP could be expected (issue 24 item 5): the undeclared port pays
    // the detection window once, then is known to be server-first; the port the Service
    // declares opaque (`appProtocol: linkerd.io/opaque`) never waits.
    let window = Duration::from_millis(300);
    let first = banner_via(&pods.a.0, "10.96.0.50:5000")?;
    let second = banner_via(&pods.a.0, "10.96.0.50:5000")?;
    let opaque = banner_via(&pods.a.0, "10.96.0.50:5001")?;
    assert!(first >= window, "first connection waited {first:?}");
    assert!(
        second < window && opaque < window,
        "learned: {second:?}, declared: {opaque:?}"
    );
    for t in [banner, declared] {
        t.join().map_err(|_| anyhow::anyhow!("banner thread"))??;
    }
    // Those four opaque streams in Istio's TCP families, on both sidecars (issue 28 item 1):
    // each carried "ping\n" from the caller, and "HELLO from b\n" plus the echo back to it.
    for (admin, reporter) in [
        ("10.201.0.2:15000", "source"),
        ("10.201.0.3:15000", "destination"),
    ] {
        let read = || -> anyhow::Result<[f64; 3]> {
            let m = exchange(
                &pods.sw.0,
                admin,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )?;
            let filter = [("reporter", reporter), ("destination_workload", "backend")];
            let sum = |family: &str| -> anyhow::Result<f64> {
                Ok(samples(&m, family, &[], &filter)?.values().sum())
            };
            Ok([
                sum("istio_tcp_connections_closed_total")?,
                sum("istio_tcp_received_bytes_total")?,
                sum("istio_tcp_sent_bytes_total")?,
            ])
        };
        // A stream is counted once both sides have closed it.
        let mut last = read()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while last[0] < 4.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            last = read()?;
        }
        assert!(
            last[0] >= 4.0 && last[1] >= 4.0 * 5.0 && last[2] >= 4.0 * 18.0,
            "{reporter}: closed, received, sent = {last:?}"
        );
    }

    // Outside the mesh (the bridge's own address): passed through.
    let l = in_netns(&pods.sw.0, || Ok(TcpListener::bind("10.201.0.1:7000")?))?;
    let outside = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut c, _) = l.accept()?;
        c.write_all(b"plain\n")?;
        Ok(())
    });
    assert_eq!(exchange(&pods.a.0, "10.201.0.1:7000", b"")?, "plain\n");
    outside
        .join()
        .map_err(|_| anyhow::anyhow!("outside thread"))??;

    // A client outside the mesh gets nothing from b's app: its port only takes mTLS.
    let r = exchange(
        &pods.sw.0,
        "10.201.0.3:8080",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )?;
    assert!(r.is_empty(), "plaintext answered: {r}");

    // b's sidecar: an inbound mTLS handshake and a request from web.
    let m = exchange(
        &pods.sw.0,
        "10.201.0.3:15000",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )?;
    let ok = samples(
        &m,
        "mesh_tls_handshakes_total",
        &[],
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    assert!(ok.values().sum::<f64>() >= 1.0, "{m}");
    let inbound = samples(
        &m,
        "mesh_requests_total",
        &[],
        &[
            ("direction", "inbound"),
            ("src_identity", "spiffe://mesh.local/ns/default/sa/web"),
        ],
    )?;
    assert!(inbound.values().sum::<f64>() >= 1.0, "{m}");

    // Issue 30, egress. A plaintext HTTP server outside the mesh (the bridge's address, :7001)
    // declared as external `status.partner.example`: the pod's HTTP to it is served through
    // its sidecar as calls of the external (its route's response header shows it).
    let meshctl = |args: &[&str]| -> anyhow::Result<String> {
        let data = d("cp");
        let mut a = vec!["--server", "https://10.201.0.1:15011", "--data-dir", &data];
        a.extend_from_slice(args);
        let (ok, out, err) = pods.sw.exec(&bin_dir().join("meshctl"), &a)?;
        anyhow::ensure!(ok, "meshctl {args:?}: {err}");
        Ok(out)
    };
    let http_outside = outside_http(&pods.sw.0, "10.201.0.1:7001")?;
    meshctl(&[
        "external",
        "add",
        "status.partner.example",
        "--port",
        "7001",
        "--address",
        "10.201.0.1:7001",
    ])?;
    meshctl(&[
        "route",
        "set",
        "status.partner.example",
        "--match",
        "prefix:/",
        "--name",
        "all",
        "--set-response-header",
        "x-via=mesh",
    ])?;
    const EXT: &[u8] =
        b"GET /ext HTTP/1.1\r\nHost: status.partner.example:7001\r\nConnection: close\r\n\r\n";
    let via_mesh = |ns: &str| -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = exchange(ns, "10.201.0.1:7001", EXT)?;
            if r.to_ascii_lowercase().contains("x-via: mesh") {
                return Ok(r);
            }
            if std::time::Instant::now() >= deadline {
                let dump = exchange(
                    &pods.sw.0,
                    "10.201.0.2:15000",
                    b"GET /config_dump HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .unwrap_or_default();
                anyhow::bail!("not through the mesh: {r}\nconfig: {dump}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let r = via_mesh(&pods.a.0)?;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("GET /ext"),
        "{r}"
    );

    // Registry-only: HTTP to an undeclared destination is answered 502 egress-denied, a TCP
    // stream to one is closed without reaching it; the declared external still answers.
    meshctl(&["egress", "default", "registry-only"])?;
    let denied = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = exchange(
                &pods.a.0,
                "10.201.0.1:7003",
                b"GET / HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
            )?;
            if r.starts_with("HTTP/1.1 502") {
                break r;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "not denied: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(denied.contains("x-mesh-error: egress-denied"), "{denied}");
    let l = in_netns(&pods.sw.0, || Ok(TcpListener::bind("10.201.0.1:7002")?))?;
    l.set_nonblocking(true)?;
    assert_eq!(
        exchange(&pods.a.0, "10.201.0.1:7002", b"")?,
        "",
        "a denied stream is closed"
    );
    assert!(
        matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a denied stream must not reach its destination"
    );
    via_mesh(&pods.a.0)?;
    drop(http_outside);
    Ok(())
}

/// A plaintext HTTP server in namespace `ns` on `addr` (outside the mesh): answers every
/// request 200 with its request head as the body, until the returned listener's thread ends
/// with the process.
fn outside_http(ns: &str, addr: &'static str) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::io::{BufRead, Write};
    let l = in_netns(ns, move || Ok(TcpListener::bind(addr)?))?;
    Ok(std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut r = std::io::BufReader::new(&c);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut w = &c;
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                head.len()
            );
        }
    }))
}
