//! Tables for people (`-o table`, `-o wide` with more columns), JSON or YAML for scripts.
//! The format is chosen once per run (`-o`), as kubectl's printers are.

use std::sync::OnceLock;

/// How meshctl prints what it reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
}

impl Format {
    /// JSON or YAML: the data, not a table.
    pub fn structured(self) -> bool {
        matches!(self, Format::Json | Format::Yaml)
    }
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Chooses the output format for this run (the first call wins).
pub fn set_format(f: Format) {
    let _ = FORMAT.set(f);
}

pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// A negative answer that scripts test by exit status (an authorization check that denies, a
/// canary rolled back or aborted): what was asked is printed as usual, then meshctl exits with
/// [`NEGATIVE_EXIT`], apart from failures (1) and usage errors (2).
#[derive(Debug)]
pub struct Negative(pub String);

impl std::fmt::Display for Negative {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Negative {}

/// meshctl's exit status for a [`Negative`] answer.
pub const NEGATIVE_EXIT: u8 = 3;

/// A left-aligned text table. Columns past `narrow` show with `-o wide` only.
pub struct Table {
    rows: Vec<Vec<String>>,
    narrow: usize,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
            narrow: header.len(),
        }
    }

    /// A table whose `wide` columns follow `header`'s, shown with `-o wide`; rows give all.
    pub fn with_wide(header: &[&str], wide: &[&str]) -> Self {
        let mut t = Self::new(header);
        t.rows[0].extend(wide.iter().map(|h| h.to_string()));
        t
    }

    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    pub fn render(&self) -> String {
        self.render_as(format())
    }
    fn render_as(&self, f: Format) -> String {
        let keep = if f == Format::Wide {
            usize::MAX
        } else {
            self.narrow
        };
        let rows: Vec<&[String]> = self.rows.iter().map(|r| &r[..r.len().min(keep)]).collect();
        let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                rows.iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Prints a prost message as JSON or YAML, as `-o` asks (field names as in the .proto).
pub fn print_json<T: std::fmt::Debug + ToJson>(v: &T) -> anyhow::Result<()> {
    print_value(&v.to_json())
}

/// Prints data as JSON (pretty) or, with `-o yaml`, as one YAML document.
pub fn print_value(v: &serde_json::Value) -> anyhow::Result<()> {
    match format() {
        Format::Yaml => print!("---\n{}", serde_saphyr::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

/// JSON views of the admin API's messages.
pub trait ToJson {
    fn to_json(&self) -> serde_json::Value;
}

use mesh_proto::v1 as pb;
use serde_json::json;

fn route_json(r: &Option<pb::Route>) -> serde_json::Value {
    json!(r.clone().unwrap_or_default())
}

impl ToJson for pb::RouteInfo {
    fn to_json(&self) -> serde_json::Value {
        json!({"service": self.service, "route": route_json(&self.route), "revision": self.revision, "updated_at_unix": self.updated_at_unix})
    }
}
impl ToJson for pb::ListRoutesResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"routes": self.routes.iter().map(ToJson::to_json).collect::<Vec<_>>()})
    }
}
impl ToJson for pb::RouteHistoryResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"history": self.history.iter().map(ToJson::to_json).collect::<Vec<_>>()})
    }
}
impl ToJson for pb::ListServicesResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"services": self.services.iter().map(|s| json!({
            "name": s.name, "namespace": s.namespace, "identity": s.identity,
            "endpoints": s.endpoints, "ready_endpoints": s.ready_endpoints, "versions": s.versions,
            "mtls_mode": s.mtls_mode,
            "app_protocols": s.app_protocols.iter()
                .map(|p| json!({"port": p.port, "protocol": p.protocol}))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    }
}
impl ToJson for pb::ListEndpointsResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"endpoints": self.endpoints.iter().map(|e| {
            let ep = e.endpoint.clone().unwrap_or_default();
            let mut v = json!({"service": e.service, "id": ep.id, "address": ep.address, "labels": ep.labels, "ready": ep.ready});
            // An endpoint under another account than its service's names it.
            if !ep.identity.is_empty() {
                v["identity"] = ep.identity.clone().into();
            }
            v
        }).collect::<Vec<_>>()})
    }
}
impl ToJson for pb::ListProxiesResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"proxies": self.proxies.iter().map(|p| json!({
            "id": p.id, "identity": p.identity, "service": p.service, "version_label": p.version_label,
            "connected_at_unix": p.connected_at_unix, "acked_version": p.acked_version,
            "nacked_version": p.nacked_version, "nack_reason": p.nack_reason, "subscriptions": p.subscriptions,
            "replica": p.replica, "cert_expires_unix": p.cert_expires_unix,
            "proxy_version": p.proxy_version,
        })).collect::<Vec<_>>(), "unreachable_replicas": self.unreachable_replicas})
    }
}
impl ToJson for pb::CreateTokenResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"token": self.token, "id": self.id, "identity": self.identity, "expires_at_unix": self.expires_at_unix})
    }
}

impl ToJson for pb::TopResponse {
    fn to_json(&self) -> serde_json::Value {
        json!({"window_seconds": self.window_seconds, "rows": self.rows.iter().map(|r| json!({
            "service": r.service, "version": r.version, "requests": r.requests, "rps": r.rps,
            "success_percent": r.success_percent, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
        })).collect::<Vec<_>>(), "unreachable_replicas": self.unreachable_replicas})
    }
}

impl ToJson for pb::CanaryInfo {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "service": self.service, "from": self.from, "to": self.to, "steps": self.steps,
            "step_index": self.step_index, "state": self.state, "reason": self.reason,
            "weight": self.weight, "step_requests": self.step_requests,
            "step_error_percent": self.step_error_percent, "step_p99_ms": self.step_p99_ms,
        })
    }
}

impl ToJson for pb::PolicyInfo {
    fn to_json(&self) -> serde_json::Value {
        json!({"service": self.service, "policy": self.policy, "revision": self.revision})
    }
}

/// `section.field = value` lines for every field of a policy that is set (non-default).
pub fn policy_lines(p: &pb::Policy) -> Vec<(String, String)> {
    fn is_default(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Null => true,
            serde_json::Value::Bool(b) => !b,
            serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
            serde_json::Value::String(s) => s.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::Object(m) => m.values().all(is_default),
        }
    }
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            // A switch set with every field at its default (hedging at the p95): shown as set.
            serde_json::Value::Object(m)
                if m.values().all(is_default)
                    && matches!(prefix, "hedge" | "adaptive_concurrency") =>
            {
                out.push((prefix.to_string(), "on (defaults)".into()));
            }
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => {}
            serde_json::Value::String(s) if s.is_empty() => {}
            serde_json::Value::Array(a) if a.is_empty() => {}
            serde_json::Value::Array(a) => out.push((
                prefix.to_string(),
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
            )),
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", &json!(p), &mut out);
    out
}

/// Says on stderr which control-plane replicas did not answer, so a partial view is never
/// taken for the whole mesh.
pub fn unreachable_replicas(replicas: &[String]) {
    if !replicas.is_empty() {
        eprintln!(
            "warning: replica {} did not answer: the proxies connected to it are missing",
            replicas.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let mut t = super::Table::new(&["A", "LONGER"]);
        t.row(vec!["xxxx".into(), "y".into()]);
        assert_eq!(t.render(), "A     LONGER\nxxxx  y\n");
    }

    #[test]
    fn wide_columns_show_with_wide_only() {
        use super::Format;
        let mut t = super::Table::with_wide(&["A"], &["MORE"]);
        t.row(vec!["x".into(), "extra".into()]);
        assert_eq!(t.render_as(Format::Table), "A\nx\n");
        assert_eq!(t.render_as(Format::Wide), "A  MORE\nx  extra\n");
    }
}
