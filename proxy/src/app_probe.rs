//! The kubelet's probes of the app, answered on the admin port. The injector rewrites an app
//! container's httpGet, tcpSocket and grpc probes to `GET /app-health/<container>/<kind>` on
//! the admin port (which is never redirected) and hands the proxy the original probes
//! (`--app-probes`, JSON by path); the proxy runs the original against the app on localhost
//! and answers 200 when it passes, 503 with the reason when it does not. So probes keep
//! working when the app's port accepts nothing but mesh mTLS.

use crate::health::Check;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Paths the injector writes: `/app-health/<container>/livez|readyz|startupz`.
pub const PREFIX: &str = "/app-health/";

/// One probe as Kubernetes spells it (only what the proxy needs; ports already numbers).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProbeSpec {
    http_get: Option<HttpGet>,
    tcp_socket: Option<Port>,
    grpc: Option<Grpc>,
    timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGet {
    port: u16,
    path: Option<String>,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<NameValue>,
}

#[derive(Debug, Deserialize)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
struct Port {
    port: u16,
}

#[derive(Debug, Deserialize)]
struct Grpc {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

/// One rewritten probe: what to run, where, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub check: Check,
    pub port: u16,
    pub timeout: Duration,
}

/// The probes by admin path.
#[derive(Debug, Default, Clone)]
pub struct AppProbes(HashMap<String, AppProbe>);

impl AppProbes {
    /// Parses `--app-probes`: `{"/app-health/app/readyz": {"httpGet": {...}}, ...}`.
    pub fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let raw: HashMap<String, ProbeSpec> =
            serde_json::from_str(json).map_err(|e| format!("--app-probes: {e}"))?;
        let mut out = HashMap::with_capacity(raw.len());
        for (path, p) in raw {
            if !path.starts_with(PREFIX) {
                return Err(format!("--app-probes: path {path:?} is not under {PREFIX}"));
            }
            let timeout = Duration::from_secs(u64::from(p.timeout_seconds.unwrap_or(1).max(1)));
            let (check, port) = match (p.http_get, p.tcp_socket, p.grpc) {
                (Some(h), None, None) => {
                    let https = match h.scheme.as_deref().unwrap_or("HTTP") {
                        "HTTP" | "http" => false,
                        "HTTPS" | "https" => true,
                        s => return Err(format!("--app-probes {path}: scheme {s:?}")),
                    };
                    let headers = h
                        .http_headers
                        .iter()
                        .map(|nv| {
                            Ok((
                                http::HeaderName::from_bytes(nv.name.as_bytes()).map_err(|_| {
                                    format!("--app-probes {path}: header {:?}", nv.name)
                                })?,
                                http::HeaderValue::from_str(&nv.value).map_err(|_| {
                                    format!("--app-probes {path}: header value {:?}", nv.value)
                                })?,
                            ))
                        })
                        .collect::<Result<_, String>>()?;
                    let probe_path = h.path.unwrap_or_else(|| "/".into());
                    if !probe_path.starts_with('/') {
                        return Err(format!("--app-probes {path}: path {probe_path:?}"));
                    }
                    (
                        Check::Http {
                            path: probe_path,
                            https,
                            headers,
                        },
                        h.port,
                    )
                }
                (None, Some(t), None) => (Check::Tcp, t.port),
                (None, None, Some(g)) => (
                    Check::Grpc {
                        service: g.service.unwrap_or_default(),
                    },
                    g.port,
                ),
                _ => {
                    return Err(format!(
                        "--app-probes {path}: exactly one of httpGet, tcpSocket, grpc"
                    ));
                }
            };
            if port == 0 {
                return Err(format!("--app-probes {path}: port 0"));
            }
            out.insert(
                path,
                AppProbe {
                    check,
                    port,
                    timeout,
                },
            );
        }
        Ok(Self(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs the probe behind `path`: None for a path no probe has, else its result.
    pub async fn run(&self, path: &str) -> Option<Result<(), String>> {
        let p = self.0.get(path)?;
        let app = SocketAddr::from((Ipv4Addr::LOCALHOST, p.port));
        Some(crate::health::probe(&p.check, app, p.timeout).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_injector_writes_and_refuses_the_rest() {
        let p = AppProbes::parse(
            r#"{"/app-health/app/readyz": {"httpGet": {"port": 8080, "path": "/healthz",
                  "scheme": "HTTP", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                  "timeoutSeconds": 3},
                "/app-health/app/livez": {"tcpSocket": {"port": 8080}},
                "/app-health/grpc/readyz": {"grpc": {"port": 9090, "service": "echo"}}}"#,
        )
        .unwrap();
        let r = &p.0["/app-health/app/readyz"];
        assert_eq!((r.port, r.timeout), (8080, Duration::from_secs(3)));
        assert!(
            matches!(&r.check, Check::Http { path, headers, https: false }
            if path == "/healthz" && headers.len() == 1)
        );
        assert_eq!(p.0["/app-health/app/livez"].check, Check::Tcp);
        assert_eq!(
            p.0["/app-health/grpc/readyz"].check,
            Check::Grpc {
                service: "echo".into()
            }
        );
        for bad in [
            r#"{"/other": {"tcpSocket": {"port": 1}}}"#,
            r#"{"/app-health/a/livez": {}}"#,
            r#"{"/app-health/a/livez": {"tcpSocket": {"port": 0}}}"#,
            r#"{"/app-health/a/livez": {"exec": {"command": ["true"]}}}"#,
            r#"{"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#,
            "not json",
        ] {
            assert!(AppProbes::parse(bad).is_err(), "{bad}");
        }
        assert!(AppProbes::parse("").unwrap().is_empty());
    }
}
