//! `meshctl ca`: the mesh's roots, and root rotation. `ca rotate` runs the three steps in
//! order and waits between them until every connected proxy is ready for the next, so no
//! request fails: the new root is trusted everywhere before it signs, and the old root is
//! dropped only once no proxy holds a certificate from it.

use super::client::Admin;
use super::output::Table;
use clap::{Args, Subcommand};
use mesh_proto::v1 as pb;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug, Clone)]
pub enum CaCmd {
    /// Roots in the bundle, the rotation phase, and each proxy's certificate root.
    Status,
    /// Rotate the root: prepare (new root trusted), activate (new root signs; proxies renew),
    /// finish (old root removed), waiting for the proxies between steps.
    Rotate(RotateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RotateArgs {
    /// Run one step only: prepare, activate or finish (default: all remaining steps).
    #[arg(long)]
    step: Option<String>,
    /// Longest wait for the proxies before each step, e.g. 2m.
    #[arg(long, default_value = "2m")]
    timeout: String,
    /// Run a step even if a connected proxy is not ready for it.
    #[arg(long)]
    force: bool,
}

pub async fn run(c: &mut Admin, cmd: CaCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Status => {
            let info = c.get_ca(pb::GetCaRequest {}).await?.into_inner();
            print_info(&info, json);
        }
        CaCmd::Rotate(a) => {
            let timeout = Duration::from_secs(
                super::parse_duration_secs(&a.timeout).map_err(|e| anyhow::anyhow!(e))?,
            );
            let info = c.get_ca(pb::GetCaRequest {}).await?.into_inner();
            let steps: Vec<&str> = match a.step.as_deref() {
                Some(s) => vec![s],
                None => remaining(&info.phase).to_vec(),
            };
            let mut info = info;
            for step in steps {
                if !a.force {
                    wait_ready(c, step, timeout).await?;
                }
                info = c
                    .rotate_ca(pb::RotateCaRequest {
                        step: step.into(),
                        force: a.force,
                    })
                    .await?
                    .into_inner();
                if !json {
                    println!("{step}: done (phase {})", info.phase);
                }
            }
            // After finish, wait until every proxy trusts the new root alone.
            if a.step.is_none() && !a.force {
                info = wait_ready(c, "", timeout).await?;
            }
            print_info(&info, json);
        }
    }
    Ok(())
}

/// The steps left from `phase` to a completed rotation.
fn remaining(phase: &str) -> &'static [&'static str] {
    match phase {
        "prepared" => &["activate", "finish"],
        "overlap" => &["finish"],
        _ => &["prepare", "activate", "finish"],
    }
}

/// Connected proxies not ready for `step` ("": not yet on the current bundle).
fn not_ready(info: &pb::CaInfo, step: &str) -> Vec<String> {
    let signer = info
        .roots
        .iter()
        .find(|r| r.signing)
        .map(|r| r.fingerprint.as_str())
        .unwrap_or_default();
    info.proxies
        .iter()
        .filter(|p| match step {
            "finish" => p.cert_signer != signer,
            "activate" | "" => !p.bundle_applied,
            _ => false,
        })
        .map(|p| p.node_id.clone())
        .collect()
}

/// Polls until every connected proxy is ready for `step`, bounded by `timeout`. Progress
/// goes to stderr as it changes (stdout stays the result, for `-o json`).
async fn wait_ready(c: &mut Admin, step: &str, timeout: Duration) -> anyhow::Result<pb::CaInfo> {
    let deadline = Instant::now() + timeout;
    let what = if step.is_empty() {
        "the new bundle alone".to_string()
    } else {
        step.to_string()
    };
    let mut said = None;
    loop {
        let info = c.get_ca(pb::GetCaRequest {}).await?.into_inner();
        let waiting = not_ready(&info, step);
        let now = (waiting.len(), info.proxies.len());
        if said != Some(now) {
            eprintln!(
                "{what}: {} of {} proxies ready{}",
                now.1 - now.0,
                now.1,
                if waiting.is_empty() {
                    String::new()
                } else {
                    format!(", waiting for {}", waiting.join(", "))
                }
            );
            said = Some(now);
        }
        if waiting.is_empty() {
            return Ok(info);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "after {timeout:?}, {} proxies are not ready{}: {} (see `meshctl ca status`)",
                waiting.len(),
                if step.is_empty() {
                    String::new()
                } else {
                    format!(" for {step}")
                },
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn short(fp: &str) -> &str {
    fp.get(..16).unwrap_or(fp)
}

fn print_info(info: &pb::CaInfo, json: bool) {
    if json {
        let roots: Vec<_> = info
            .roots
            .iter()
            .map(|r| json!({"fingerprint": r.fingerprint, "subject": r.subject, "not_after_unix": r.not_after_unix, "signing": r.signing}))
            .collect();
        let proxies: Vec<_> = info
            .proxies
            .iter()
            .map(|p| json!({"node_id": p.node_id, "identity": p.identity, "cert_signer": p.cert_signer, "bundle_applied": p.bundle_applied}))
            .collect();
        let v = json!({"phase": info.phase, "external": info.external, "roots": roots, "proxies": proxies});
        if let Err(e) = crate::output::print_value(&v) {
            eprintln!("error: {e}");
        }
        return;
    }
    println!(
        "phase: {}{}",
        info.phase,
        if info.external {
            " (operator-provided root)"
        } else {
            ""
        }
    );
    let mut t = Table::new(&["ROOT", "SUBJECT", "EXPIRES", "SIGNING"]);
    for r in &info.roots {
        t.row(vec![
            short(&r.fingerprint).into(),
            r.subject.clone(),
            super::fmt_time(r.not_after_unix),
            if r.signing { "yes" } else { "no" }.into(),
        ]);
    }
    t.print();
    let mut t = Table::new(&["PROXY", "IDENTITY", "CERT ROOT", "BUNDLE"]);
    for p in &info.proxies {
        t.row(vec![
            p.node_id.clone(),
            p.identity.clone(),
            if p.cert_signer.is_empty() {
                "-".into()
            } else {
                short(&p.cert_signer).into()
            },
            if p.bundle_applied {
                "current"
            } else {
                "pending"
            }
            .into(),
        ]);
    }
    t.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(phase: &str, proxies: Vec<(&str, bool)>) -> pb::CaInfo {
        pb::CaInfo {
            roots: vec![
                pb::CaRoot {
                    fingerprint: "old".into(),
                    signing: false,
                    ..Default::default()
                },
                pb::CaRoot {
                    fingerprint: "new".into(),
                    signing: true,
                    ..Default::default()
                },
            ],
            phase: phase.into(),
            proxies: proxies
                .into_iter()
                .enumerate()
                .map(|(i, (signer, applied))| pb::ProxyCa {
                    node_id: format!("p{i}"),
                    cert_signer: signer.into(),
                    bundle_applied: applied,
                    ..Default::default()
                })
                .collect(),
            external: false,
        }
    }

    #[test]
    fn readiness_per_step() {
        let i = info(
            "overlap",
            vec![("old", true), ("new", false), ("new", true)],
        );
        assert_eq!(not_ready(&i, "activate"), vec!["p1"]);
        assert_eq!(not_ready(&i, "finish"), vec!["p0"]);
        assert!(not_ready(&i, "prepare").is_empty());
        assert_eq!(remaining("steady"), ["prepare", "activate", "finish"]);
        assert_eq!(remaining("overlap"), ["finish"]);
    }
}
