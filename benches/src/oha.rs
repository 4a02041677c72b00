//! Running a load tool and reading oha's JSON report: what every load bench here counts the
//! same way.

use anyhow::Context;
use std::path::Path;
use tokio::process::Command;

/// What one timed load run gave.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub ok: u64,
    pub errors: u64,
    pub rps: f64,
    /// p50, p90, p99 in ms.
    pub percentiles: [f64; 3],
}

/// Runs a load tool to its end; its standard output, or an error with what it printed.
pub async fn run_load_tool(cmd: &mut Command, bin: &Path) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Runs oha (`bin`) with `args` after its JSON-report flags; returns its report.
pub async fn report(bin: &Path, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(bin);
    cmd.args(["--no-tui", "--output-format", "json"]).args(args);
    let out = run_load_tool(&mut cmd, bin).await?;
    Ok(serde_json::from_slice(&out)?)
}

/// An oha report, counted. Requests still in flight when a timed run ends are cut by oha, not
/// failed by the proxy; any other error, and any status but 200, is an error.
pub fn counted(v: &serde_json::Value, what: &str) -> Counted {
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0);
    let errors = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() != "aborted due to deadline")
                .filter_map(|(_, x)| x.as_u64())
                .sum()
        })
        .unwrap_or(0)
        + (total - ok);
    if errors > 0 {
        eprintln!(
            "  errors on {what}: {} (status codes {})",
            v["errorDistribution"], v["statusCodeDistribution"]
        );
    }
    let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    Counted {
        ok,
        errors,
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        percentiles: [ms("p50"), ms("p90"), ms("p99")],
    }
}
