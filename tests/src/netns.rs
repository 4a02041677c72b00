//! Network namespaces made by a test (root only): single "pods", and "hosts" on a bridge, each
//! with its own IP. Everything is deleted on drop.

use std::process::Command;

/// Why this machine cannot run namespace tests needing `tools`, if it cannot.
pub fn cannot_run(tools: &[&str]) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    for tool in tools.iter().chain(&["ip"]) {
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

/// `ip <args>`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// A new namespace with `lo` up.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace; returns (success, stdout, stderr).
    pub fn exec(
        &self,
        cmd: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<(bool, String, String)> {
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Runs `f` on a thread inside network namespace `ns` and waits for it: that thread alone
/// enters it, and the sockets it makes live there (and stay there when handed out).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// Hosts on one LAN: namespace `sw` holds the bridge (`<net>.1`), host i is `<net>.(i+2)`.
pub struct Lan {
    pub sw: Netns,
    pub hosts: Vec<Netns>,
    net: String,
}

impl Lan {
    /// `net` is the first three octets of a /24, e.g. "10.201.0"; `names` name the hosts.
    pub fn new(net: &str, names: &[&str]) -> anyhow::Result<Self> {
        let tag = std::process::id() % 100_000;
        let sw = Netns::named(&format!("mesh-sw-{tag}-{}", net.replace('.', "")))?;
        ip(&["-n", &sw.0, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &sw.0,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &sw.0, "link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let h = Netns::named(&format!("mesh-{n}-{tag}"))?;
            let (inner, outer) = (format!("p{n}{tag}"), format!("s{n}{tag}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &h.0])?;
            ip(&["link", "set", &outer, "netns", &sw.0])?;
            ip(&["-n", &sw.0, "link", "set", &outer, "master", "br0", "up"])?;
            let addr = format!("{net}.{}/24", i + 2);
            ip(&["-n", &h.0, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &h.0, "link", "set", &inner, "up"])?;
            hosts.push(h);
        }
        Ok(Self {
            sw,
            hosts,
            net: net.to_string(),
        })
    }

    /// The bridge's address (the `sw` namespace).
    pub fn sw_ip(&self) -> String {
        format!("{}.1", self.net)
    }

    /// Host i's address.
    pub fn ip_of(&self, i: usize) -> String {
        format!("{}.{}", self.net, i + 2)
    }
}

/// `ip netns exec <ns> [setpriv --reuid uid …] <bin> <args>`, started and awaited until it
/// prints its ready line.
pub async fn spawn_in(
    ns: &Netns,
    uid: Option<u32>,
    bin: &str,
    args: &[String],
    log: std::path::PathBuf,
) -> anyhow::Result<(crate::process::Process, serde_json::Value)> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]);
    if let Some(u) = uid {
        cmd.args([
            "setpriv",
            &format!("--reuid={u}"),
            &format!("--regid={u}"),
            "--clear-groups",
            "--",
        ]);
    }
    cmd.arg(crate::bin_dir().join(bin))
        .args(args)
        .env("RUST_LOG", "info,mesh_proxy=debug")
        .stderr(std::fs::File::create(log)?);
    crate::process::Process::spawn_ready(bin, cmd, crate::READY_TIMEOUT).await
}

/// A plain HTTP/1.0 GET on a new connection from the calling thread (so from inside a
/// namespace when called through [`in_netns`]); returns the body. Bounded by timeouts.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let a: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {addr}{path}: {head}"
    );
    Ok(body.to_string())
}
