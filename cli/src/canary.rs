//! `meshctl canary …` and `meshctl top`: the automated canary and the live golden metrics,
//! both fed by the proxies' telemetry.

use super::client::Admin;
use super::output::{Table, print_json};
use super::policy;
use clap::Subcommand;
use mesh_proto::v1 as pb;

#[derive(Subcommand, Debug, Clone)]
pub enum CanaryCmd {
    /// e.g. `canary start web --to v2 --steps 5,25,50,100 --interval 30s --max-error-rate 1%
    /// --max-p99 300ms`
    Start {
        service: String,
        #[arg(long)]
        to: String,
        /// The stable version (default: the heaviest in the route).
        #[arg(long)]
        from: Option<String>,
        /// Weight percentages of the new version, ending at 100.
        #[arg(long, default_value = "5,25,50,100")]
        steps: String,
        #[arg(long, default_value = "30s")]
        interval: String,
        #[arg(long, default_value = "1%")]
        max_error_rate: String,
        /// p99 latency gate (e.g. 300ms; 0 turns it off).
        #[arg(long, default_value = "0")]
        max_p99: String,
        /// Requests the new version must serve in a step before it is judged.
        #[arg(long, default_value_t = 20)]
        min_requests: u32,
        /// Follow the canary until it is promoted, rolled back or aborted, printing each step
        /// as it happens; exits 3 unless it was promoted.
        #[arg(long)]
        watch: bool,
    },
    /// Where a canary stands, and why.
    Status {
        service: String,
    },
    Pause {
        service: String,
    },
    Resume {
        service: String,
    },
    /// Stop and send all traffic back to the stable version.
    Abort {
        service: String,
    },
}

async fn canary_action(
    c: &mut Admin,
    service: String,
    action: &str,
) -> Result<tonic::Response<pb::CanaryInfo>, tonic::Status> {
    c.canary_action(pb::CanaryActionRequest {
        service,
        action: action.into(),
    })
    .await
}

/// A canary that ended badly, for the exit status.
fn verdict(r: &pb::CanaryInfo) -> anyhow::Result<()> {
    match r.state.as_str() {
        "rolled-back" | "aborted" => Err(crate::output::Negative(format!(
            "canary of {} to {} {}: {}",
            r.service, r.to, r.state, r.reason
        ))
        .into()),
        _ => Ok(()),
    }
}

/// One line per change of a watched canary.
fn progress(r: &pb::CanaryInfo) -> String {
    let mut line = format!(
        "{} step {}/{}: {}% to {}, {} requests, {:.1}% errors, p99 ≤ {} ms",
        r.state,
        r.step_index + 1,
        r.steps.len(),
        r.weight,
        r.to,
        r.step_requests,
        r.step_error_percent,
        r.step_p99_ms
    );
    if !r.reason.is_empty() {
        line.push_str(&format!(" ({})", r.reason));
    }
    line
}

/// Follows a canary until it ends; prints each change of step, state or reason.
async fn watch(c: &mut Admin, first: pb::CanaryInfo) -> anyhow::Result<pb::CanaryInfo> {
    let key = |r: &pb::CanaryInfo| (r.step_index, r.state.clone(), r.reason.clone());
    let mut r = first;
    eprintln!("{}", progress(&r));
    let mut last = key(&r);
    while matches!(r.state.as_str(), "running" | "paused") {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        r = c
            .get_canary(pb::GetCanaryRequest {
                service: r.service.clone(),
            })
            .await?
            .into_inner();
        if key(&r) != last {
            eprintln!("{}", progress(&r));
            last = key(&r);
        }
    }
    Ok(r)
}

/// `meshctl canary …`.
pub async fn run(c: &mut Admin, cmd: CanaryCmd, json: bool) -> anyhow::Result<()> {
    let mut follow = false;
    // Only reads and watches answer with the canary's fate; `abort` succeeding is not a
    // failure.
    let judged = matches!(cmd, CanaryCmd::Start { .. } | CanaryCmd::Status { .. });
    let r = match cmd {
        CanaryCmd::Start {
            service,
            to,
            from,
            steps,
            interval,
            max_error_rate,
            max_p99,
            min_requests,
            watch,
        } => {
            follow = watch;
            let steps = steps
                .split(',')
                .map(|s| s.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| anyhow::anyhow!("--steps: e.g. 5,25,50,100"))?;
            fn e(f: &'static str) -> impl Fn(String) -> anyhow::Error {
                move |m| anyhow::anyhow!("--{f}: {m}")
            }
            c.start_canary(pb::StartCanaryRequest {
                service,
                to,
                from: from.unwrap_or_default(),
                steps,
                interval_ms: policy::parse_ms(&interval).map_err(e("interval"))?,
                max_error_percent: policy::parse_percent(&max_error_rate)
                    .map_err(e("max-error-rate"))?,
                max_p99_ms: policy::parse_ms(&max_p99).map_err(e("max-p99"))?,
                min_requests,
            })
            .await?
        }
        CanaryCmd::Status { service } => c.get_canary(pb::GetCanaryRequest { service }).await?,
        CanaryCmd::Pause { service } => canary_action(c, service, "pause").await?,
        CanaryCmd::Resume { service } => canary_action(c, service, "resume").await?,
        CanaryCmd::Abort { service } => canary_action(c, service, "abort").await?,
    }
    .into_inner();
    let r = if follow { watch(c, r).await? } else { r };
    let verdict = |r: &pb::CanaryInfo| if judged { verdict(r) } else { Ok(()) };
    if json {
        print_json(&r)?;
        return verdict(&r);
    }
    let mut t = Table::new(&[
        "SERVICE",
        "FROM",
        "TO",
        "STATE",
        "STEP",
        "WEIGHT",
        "STEP REQS",
        "ERR %",
        "P99 ≤ MS",
    ]);
    t.row(vec![
        r.service.clone(),
        r.from.clone(),
        r.to.clone(),
        r.state.clone(),
        format!("{}/{}", r.step_index + 1, r.steps.len()),
        format!("{}%", r.weight),
        r.step_requests.to_string(),
        format!("{:.1}", r.step_error_percent),
        r.step_p99_ms.to_string(),
    ]);
    t.print();
    if !r.reason.is_empty() {
        println!("reason: {}", r.reason);
    }
    verdict(&r)
}

/// `meshctl top`.
pub async fn top(
    c: &mut Admin,
    window: &str,
    refresh: &str,
    count: Option<u32>,
    json: bool,
    in_scope: &dyn Fn(&str) -> bool,
    shown: &dyn Fn(&str) -> String,
) -> anyhow::Result<()> {
    let window_seconds = policy::parse_ms(window)
        .map_err(|e| anyhow::anyhow!("--window: {e}"))?
        .div_ceil(1000);
    let refresh = std::time::Duration::from_millis(u64::from(
        policy::parse_ms(refresh).map_err(|e| anyhow::anyhow!("--refresh: {e}"))?,
    ));
    let count = count.unwrap_or(if json { 1 } else { u32::MAX });
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(refresh).await;
        }
        let mut r = c.top(pb::TopRequest { window_seconds }).await?.into_inner();
        r.rows.retain(|row| in_scope(&row.service));
        if json {
            print_json(&r)?;
            continue;
        }
        let mut t = Table::new(&[
            "SERVICE",
            "VERSION",
            "RPS",
            "SUCCESS",
            "P50 ≤ MS",
            "P99 ≤ MS",
            "REQUESTS",
        ]);
        for row in &r.rows {
            t.row(vec![
                shown(&row.service),
                row.version.clone(),
                format!("{:.1}", row.rps),
                format!("{:.2}%", row.success_percent),
                row.p50_ms.to_string(),
                row.p99_ms.to_string(),
                row.requests.to_string(),
            ]);
        }
        println!("last {} s:", r.window_seconds);
        t.print();
        crate::output::unreachable_replicas(&r.unreachable_replicas);
    }
    Ok(())
}
