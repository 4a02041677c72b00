//! `meshctl authz`: who may call a service. Rules are given in order as
//! `--rule "allow|deny [name=N] [from=…] [methods=…] [paths=…]"`; the first that matches a
//! request decides, else the namespace default (`meshctl authz default <ns> <action>`).

use super::client::Admin;
use super::output::Table;
use clap::Subcommand;
use mesh_proto::v1 as pb;
use serde_json::json;

#[derive(Subcommand, Debug, Clone)]
pub enum AuthzCmd {
    /// Replace a service's rules (in order; the first match decides).
    Set {
        service: String,
        /// `allow|deny [name=N] [from=ns/<ns>/sa/<sa>,ns/<ns>/*,*] [methods=GET,…] [paths=/x,/api/*]`
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
        /// The policy's name, reported in denials (default: <service>-authz).
        #[arg(long)]
        name: Option<String>,
        /// Log would-be denials instead of enforcing them.
        #[arg(long)]
        audit: bool,
    },
    /// Show a service's rules and its namespace default.
    Get { service: String },
    /// Remove a service's rules (its namespace default then decides).
    Clear { service: String },
    /// Set a namespace's default: allow-all, deny-all or allow-mesh-only.
    Default { namespace: String, action: String },
    /// Explain, offline, what the service's proxies would decide for one request.
    Check {
        /// The caller: ns/<ns>/sa/<sa> or <ns>/<sa> (omit for a plaintext caller).
        #[arg(long, default_value = "")]
        from: String,
        /// The service called.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
    },
}

fn authz_json(i: &pb::AuthzInfo) -> serde_json::Value {
    let a = i.authz.clone().unwrap_or_default();
    json!({"service": i.service, "revision": i.revision, "authz": a})
}

fn print_authz(i: &pb::AuthzInfo) {
    let a = i.authz.clone().unwrap_or_default();
    println!(
        "authorization of {}: policy {:?}{}, namespace default {}",
        i.service,
        a.name,
        if a.audit { " (audit mode)" } else { "" },
        a.default_action
    );
    let mut t = Table::new(&["RULE", "ACTION", "FROM", "METHODS", "PATHS"]);
    let any = |v: &[String]| {
        if v.is_empty() {
            "*".to_string()
        } else {
            v.join(",")
        }
    };
    for r in &a.rules {
        t.row(vec![
            r.name.clone(),
            r.action.clone(),
            any(&r.from),
            any(&r.methods),
            any(&r.paths),
        ]);
    }
    t.print();
}

pub async fn run(c: &mut Admin, cmd: AuthzCmd, json: bool) -> anyhow::Result<()> {
    let show = |i: pb::AuthzInfo| {
        if json {
            if let Err(e) = crate::output::print_value(&authz_json(&i)) {
                eprintln!("error: {e}");
            }
        } else {
            print_authz(&i);
        }
    };
    match cmd {
        AuthzCmd::Set {
            service,
            rules,
            name,
            audit,
        } => {
            let rules = rules
                .iter()
                .enumerate()
                .map(|(i, s)| mesh_authz::parse_rule(s, i + 1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--rule: {e}"))?;
            let authz = pb::Authz {
                name: name.unwrap_or_else(|| format!("{service}-authz")),
                rules,
                audit,
                ..Default::default()
            };
            show(
                c.set_authz(pb::SetAuthzRequest {
                    service,
                    authz: Some(authz),
                })
                .await?
                .into_inner(),
            );
        }
        AuthzCmd::Get { service } => {
            show(
                c.get_authz(pb::GetAuthzRequest { service })
                    .await?
                    .into_inner(),
            );
        }
        AuthzCmd::Clear { service } => {
            show(
                c.set_authz(pb::SetAuthzRequest {
                    service,
                    authz: Some(pb::Authz::default()),
                })
                .await?
                .into_inner(),
            );
        }
        AuthzCmd::Default { namespace, action } => {
            let r = c
                .set_authz_default(pb::SetAuthzDefaultRequest {
                    namespace: namespace.clone(),
                    default_action: action.clone(),
                })
                .await?
                .into_inner();
            println!(
                "authorization default of namespace {namespace} set to {action} (revision {})",
                r.revision
            );
        }
        AuthzCmd::Check {
            from,
            to,
            path,
            method,
        } => {
            let r = c
                .check_authz(pb::CheckAuthzRequest {
                    from: from.clone(),
                    service: to.clone(),
                    method: method.clone(),
                    path: path.clone(),
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    json!({"allowed": r.allowed, "decided_by": r.decided_by, "audit": r.audit})
                );
            } else {
                let caller = if from.is_empty() {
                    "plaintext caller"
                } else {
                    &from
                };
                println!(
                    "{} {caller} -> {to} {method} {path}: decided by {}{}",
                    if r.allowed { "ALLOW" } else { "DENY" },
                    r.decided_by,
                    if r.audit {
                        " (audit mode: logged, let through)"
                    } else {
                        ""
                    }
                );
            }
            if !r.allowed {
                return Err(crate::output::Negative(format!("denied by {}", r.decided_by)).into());
            }
        }
    }
    Ok(())
}
