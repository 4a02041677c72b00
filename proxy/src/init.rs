//! `mesh-proxy init`: the iptables rules (nat table) that send a pod's TCP traffic through its
//! proxy, run once by the injected init container before the app starts.
//!
//! Inbound: everything arriving for the pod goes to the inbound port, except the skipped ports
//! (the admin port, for probes). Outbound: everything the pod sends goes to the outbound port,
//! except the proxy's own traffic (matched by its uid, so it never loops), loopback, and the
//! skipped ports and CIDRs; an app calling its own pod IP goes through its inbound side.
//! Installing twice leaves one set of rules; `--cleanup` removes them.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

const CHAINS: [&str; 4] = [
    "MESH_INBOUND",
    "MESH_IN_REDIRECT",
    "MESH_OUTPUT",
    "MESH_OUT_REDIRECT",
];

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "mesh-proxy init",
    about = "Install (or --cleanup) the iptables rules that send the pod's TCP traffic through the proxy"
)]
pub struct InitArgs {
    /// The proxy's user id: its own connections are never redirected.
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports reached directly (e.g. the proxy's admin port, for probes).
    #[arg(long, value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports the app reaches directly.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Destination networks the app reaches directly, e.g. 10.0.0.0/8.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<String>,
    /// No inbound redirect (a client-only pod).
    #[arg(long)]
    pub no_inbound: bool,
    /// Remove the rules instead.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the rules (iptables-restore input) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid --skip-outbound-cidrs entry {0:?}: expected address/prefix, e.g. 10.0.0.0/8")]
    Cidr(String),
    #[error("{cmd}: {detail}")]
    Command { cmd: String, detail: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn tools(self) -> (&'static str, &'static str) {
        match self {
            Family::V4 => ("iptables", "iptables-restore"),
            Family::V6 => ("ip6tables", "ip6tables-restore"),
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

/// Checks the CIDRs; returns them with their family.
fn cidrs(a: &InitArgs) -> Result<Vec<(Family, String)>, InitError> {
    a.skip_outbound_cidrs
        .iter()
        .map(|c| {
            let c = c.trim();
            let (ip, len) = c.split_once('/').ok_or_else(|| InitError::Cidr(c.into()))?;
            let len: u8 = len.parse().map_err(|_| InitError::Cidr(c.into()))?;
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) if len <= 32 => Ok((Family::V4, c.to_string())),
                Ok(IpAddr::V6(_)) if len <= 128 => Ok((Family::V6, c.to_string())),
                _ => Err(InitError::Cidr(c.into())),
            }
        })
        .collect()
}

/// The nat table rules for one family, as iptables-restore input (applied with --noflush).
pub fn rules(a: &InitArgs, family: Family) -> Result<String, InitError> {
    let cidrs = cidrs(a)?;
    let mut r = String::from("*nat\n");
    for c in CHAINS {
        r.push_str(&format!(":{c} - [0:0]\n"));
    }
    r.push_str(&format!(
        "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.inbound_port
    ));
    r.push_str(&format!(
        "-A MESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.outbound_port
    ));
    if !a.no_inbound {
        r.push_str("-A PREROUTING -p tcp -j MESH_INBOUND\n");
        for p in &a.skip_inbound_ports {
            r.push_str(&format!("-A MESH_INBOUND -p tcp --dport {p} -j RETURN\n"));
        }
        r.push_str("-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT\n");
    }
    r.push_str("-A OUTPUT -p tcp -j MESH_OUTPUT\n");
    r.push_str(&format!(
        "-A MESH_OUTPUT -m owner --uid-owner {} -j RETURN\n",
        a.proxy_uid
    ));
    let lo = family.loopback();
    if !a.no_inbound {
        r.push_str(&format!(
            "-A MESH_OUTPUT -o lo ! -d {lo} -j MESH_IN_REDIRECT\n"
        ));
    }
    r.push_str(&format!("-A MESH_OUTPUT -d {lo} -j RETURN\n"));
    for p in &a.skip_outbound_ports {
        r.push_str(&format!("-A MESH_OUTPUT -p tcp --dport {p} -j RETURN\n"));
    }
    for (_, c) in cidrs.iter().filter(|(f, _)| *f == family) {
        r.push_str(&format!("-A MESH_OUTPUT -d {c} -j RETURN\n"));
    }
    r.push_str("-A MESH_OUTPUT -j MESH_OUT_REDIRECT\nCOMMIT\n");
    Ok(r)
}

fn run_cmd(cmd: &str, args: &[&str], input: Option<&str>) -> Result<(), InitError> {
    let err = |detail: String| InitError::Command {
        cmd: format!("{cmd} {}", args.join(" ")),
        detail,
    };
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| err(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Removes our jumps and chains (whatever of them exists).
fn cleanup(family: Family) {
    let (iptables, _) = family.tools();
    for (chain, target) in [("PREROUTING", "MESH_INBOUND"), ("OUTPUT", "MESH_OUTPUT")] {
        // A jump added twice by hand is removed twice; bounded all the same.
        for _ in 0..16 {
            let args = ["-w", "-t", "nat", "-D", chain, "-p", "tcp", "-j", target];
            if run_cmd(iptables, &args, None).is_err() {
                break;
            }
        }
    }
    for c in CHAINS {
        let _ = run_cmd(iptables, &["-w", "-t", "nat", "-F", c], None);
    }
    for c in CHAINS {
        let _ = run_cmd(iptables, &["-w", "-t", "nat", "-X", c], None);
    }
}

/// Whether the pod has IPv6 (then its traffic is redirected too, or it would bypass the proxy).
fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

/// Installs (or with `--cleanup` removes) the rules; `--dry-run` prints them.
pub fn run(a: &InitArgs) -> Result<(), InitError> {
    let mut families = vec![Family::V4];
    if has_ipv6() {
        families.push(Family::V6);
    }
    if a.dry_run {
        for f in families {
            print!("{}", rules(a, f)?);
        }
        return Ok(());
    }
    // Checked before anything changes.
    let texts = families
        .iter()
        .map(|f| rules(a, *f).map(|r| (*f, r)))
        .collect::<Result<Vec<_>, _>>()?;
    for (family, text) in texts {
        cleanup(family);
        if a.cleanup {
            continue;
        }
        let (_, restore) = family.tools();
        run_cmd(restore, &["-w", "--noflush"], Some(&text))?;
        tracing::info!(?family, "traffic redirect installed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> InitArgs {
        InitArgs::parse_from(["init"].iter().chain(extra))
    }

    #[test]
    fn rules_redirect_both_ways_with_exceptions() {
        let a = args(&[
            "--skip-inbound-ports",
            "15000,9090",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "10.96.0.0/12,fd00::/8",
        ]);
        let v4 = rules(&a, Family::V4).unwrap();
        let want = [
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A PREROUTING -p tcp -j MESH_INBOUND",
            "-A MESH_INBOUND -p tcp --dport 15000 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 9090 -j RETURN",
            "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT",
            "-A OUTPUT -p tcp -j MESH_OUTPUT",
            "-A MESH_OUTPUT -m owner --uid-owner 2102 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A MESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A MESH_OUTPUT -j MESH_OUT_REDIRECT",
        ];
        let lines: Vec<&str> = v4.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(lines, want);
        assert!(v4.starts_with("*nat\n") && v4.ends_with("COMMIT\n"));
        let v6 = rules(&a, Family::V6).unwrap();
        assert!(v6.contains("-A MESH_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(v6.contains("! -d ::1/128") && !v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn client_only_pods_get_no_inbound_redirect() {
        let r = rules(&args(&["--no-inbound"]), Family::V4).unwrap();
        assert!(!r.contains("PREROUTING") && !r.contains("-j MESH_IN_REDIRECT"));
        assert!(r.contains("-A MESH_OUTPUT -j MESH_OUT_REDIRECT"));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for c in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129"] {
            assert!(
                matches!(
                    rules(&args(&["--skip-outbound-cidrs", c]), Family::V4),
                    Err(InitError::Cidr(_))
                ),
                "{c}"
            );
        }
    }
}
