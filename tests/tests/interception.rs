//! `mesh-proxy init` in a network namespace made by the test (needs root and iptables, which
//! scripts/install-test-deps.sh installs; skipped with a message otherwise): the rules install
//! once however often init runs, redirect the pod's outbound and self-addressed traffic to the
//! proxy's ports with the original destination readable (SO_ORIGINAL_DST), leave the
//! excluded ports alone, and `--cleanup` removes them.

use mesh_tests::*;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

/// A network namespace with lo and a "pod" interface 10.200.0.2/24 (a veth; default route);
/// deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let name = format!("mesh-test-{}-{}", std::process::id(), fastrand_u32());
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        for args in [
            vec!["link", "set", "lo", "up"],
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

    /// Runs a command inside the namespace; returns (success, stdout, stderr).
    fn exec(&self, cmd: &std::path::Path, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(cmd)
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    }

    /// The nat rules (`-A ...` lines) of one family.
    fn rules(&self, save: &str) -> anyhow::Result<Vec<String>> {
        let (ok, out, err) = self.exec(std::path::Path::new(save), &["-t", "nat"])?;
        anyhow::ensure!(ok, "{save}: {err}");
        Ok(out
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(String::from)
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Why this machine cannot run the test, if it cannot.
fn cannot_run() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    for tool in ["iptables-restore", "iptables-save", "ip"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        if !found {
            return Some(format!(
                "{tool} is missing (scripts/install-test-deps.sh installs it)"
            ));
        }
    }
    None
}

/// Connects to `dst` from inside the namespace and accepts on `listener` (also in the
/// namespace): returns the destination the accepted socket was originally sent to, or None if
/// nothing arrived (the connection was not redirected).
fn redirected_to(
    ns: &str,
    listeners: &[SocketAddr],
    dst: SocketAddr,
) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    let ns = ns.to_string();
    let listeners = listeners.to_vec();
    std::thread::spawn(move || -> anyhow::Result<Vec<Option<SocketAddr>>> {
        // This thread alone enters the namespace; its sockets live there.
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
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
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// Test 2 of the Kubernetes issue, its init-step part.
#[test]
fn init_redirects_pod_traffic_in_a_network_namespace() -> anyhow::Result<()> {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED init_redirects_pod_traffic_in_a_network_namespace: {why}");
        return Ok(());
    }
    let proxy = bin_dir().join("mesh-proxy");
    let ns = Netns::new()?;
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
    let first = ns.rules("iptables-save")?;
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
    assert_eq!(ns.rules("iptables-save")?, first);

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
    assert_eq!(ns.rules("iptables-save")?, first);

    let (ok, _, err) = ns.exec(&proxy, &["init", "--cleanup"])?;
    assert!(ok, "{err}");
    let left = ns.rules("iptables-save")?;
    assert!(left.iter().all(|l| !l.contains("MESH_")), "{left:#?}");
    assert_eq!(redirected_to(&ns.0, &[out_port], dst)?, [None]);
    Ok(())
}
