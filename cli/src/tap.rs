//! `meshctl tap <service>`: the live requests of a service as its callers' proxies (outbound)
//! and its own (inbound) see them, relayed by the control plane from the proxies' telemetry.

use super::client::Admin;
use mesh_proto::v1 as pb;

#[derive(clap::Args, Debug, Clone)]
pub struct TapArgs {
    pub service: String,
    /// Stop after this many requests.
    #[arg(long)]
    pub max: Option<u32>,
    /// Stop after this long, e.g. 30s (default: until interrupted).
    #[arg(long)]
    pub duration: Option<String>,
}

/// One event as a JSON object (the `-o json` line).
pub fn event_json(e: &pb::TapEvent) -> serde_json::Value {
    serde_json::json!({
        "node_id": e.node_id,
        "direction": e.direction,
        "method": e.method,
        "authority": e.authority,
        "path": e.path,
        "status": e.status,
        "grpc_status": (e.grpc_status >= 0).then_some(e.grpc_status),
        "latency_ms": e.latency_us as f64 / 1000.0,
        "src_identity": e.src_identity,
        "dst_identity": e.dst_identity,
        "dst_service": e.dst_service,
        "route": e.route,
        "backend_version": e.backend_version,
        "upstream": e.upstream,
        "error": e.error,
        "start_unix_ms": e.start_unix_ms,
        "trace_id": e.trace_id,
    })
}

/// One event as a line of text.
pub fn event_line(e: &pb::TapEvent) -> String {
    let who = |id: &str| id.rsplit('/').next().unwrap_or(id).to_string();
    let mut s = format!(
        "{:<8} {} -> {} {} {} {} {:.1}ms",
        e.direction,
        who(&e.src_identity),
        who(&e.dst_identity),
        e.method,
        e.path,
        e.status,
        e.latency_us as f64 / 1000.0,
    );
    if e.grpc_status >= 0 {
        s.push_str(&format!(" grpc={}", e.grpc_status));
    }
    if !e.route.is_empty() {
        s.push_str(&format!(" route={}", e.route));
    }
    if !e.backend_version.is_empty() {
        s.push_str(&format!(" version={}", e.backend_version));
    }
    if !e.error.is_empty() {
        s.push_str(&format!(" error={}", e.error));
    }
    s
}

pub async fn run(c: &mut Admin, a: TapArgs, json: bool) -> anyhow::Result<()> {
    let duration_ms = match &a.duration {
        Some(d) => {
            u64::from(super::policy::parse_ms(d).map_err(|e| anyhow::anyhow!("--duration: {e}"))?)
        }
        None => 0,
    };
    let mut events = c
        .tap(pb::TapRequest {
            service: a.service,
            max_events: a.max.unwrap_or(0),
            duration_ms,
        })
        .await?
        .into_inner();
    while let Some(e) = events.message().await? {
        if crate::output::format() == crate::output::Format::Yaml {
            crate::output::print_value(&event_json(&e))?;
        } else if json {
            // One object per line, for `jq` and line-by-line readers.
            println!("{}", event_json(&e));
        } else {
            println!("{}", event_line(&e));
        }
    }
    Ok(())
}
