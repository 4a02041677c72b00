//! What an app speaks on one of its ports, as a service declares it. Declared once per app
//! port, it tells the inbound proxy how to talk to the app (HTTP/1.1 or h2c, whatever the caller
//! spoke) and tells callers' proxies in transparent mode to skip protocol detection (an opaque
//! port is tunnelled at once, so a server-first protocol never waits for the detection window).

use std::fmt;

/// A declared app protocol. An undeclared port is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1 only: every request reaches the app as HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC): every request reaches the app as HTTP/2.
    Http2,
    /// Not HTTP (or not to be inspected): connections are tunnelled as opaque TCP.
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
            AppProtocol::Opaque => "opaque",
        }
    }

    /// The mesh's own spelling (what meshctl accepts and what is pushed).
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        match s {
            "http1" => Ok(AppProtocol::Http1),
            "http2" => Ok(AppProtocol::Http2),
            "opaque" => Ok(AppProtocol::Opaque),
            other => Err(ProtocolError(format!(
                "unknown app protocol {other:?}: use http1, http2 or opaque"
            ))),
        }
    }

    /// A Kubernetes Service port's protocol: its `appProtocol` field when it names one this
    /// mesh knows (`http`, `http2`, `grpc`, `kubernetes.io/h2c`, `kubernetes.io/ws`, `tcp`,
    /// `tls`, `https`, `linkerd.io/opaque`, `mysql`, …, as Istio and Linkerd read it), else the
    /// port name's prefix by Istio's convention (`http-`, `grpc-`, `tcp-`, …); None: detect.
    pub fn of_kubernetes_port(app_protocol: Option<&str>, name: Option<&str>) -> Option<Self> {
        match app_protocol.map(|p| p.trim().to_ascii_lowercase()) {
            Some(p) if !p.is_empty() => Self::of_name(&p, true),
            _ => Self::of_name(&name?.trim().to_ascii_lowercase(), false),
        }
    }

    /// `exact`: a whole `appProtocol` value; otherwise a port name (`<protocol>[-<suffix>]`).
    fn of_name(n: &str, exact: bool) -> Option<Self> {
        const H1: &[&str] = &[
            "http",
            "kubernetes.io/http",
            "kubernetes.io/ws",
            "websocket",
        ];
        const H2: &[&str] = &["http2", "grpc", "h2c", "kubernetes.io/h2c"];
        const OPAQUE: &[&str] = &[
            "tcp",
            "tls",
            "https",
            "kubernetes.io/wss",
            "linkerd.io/opaque",
            "mongo",
            "mysql",
            "redis",
            "postgres",
            "postgresql",
        ];
        // gRPC-Web is HTTP/1.1 from browsers and sometimes HTTP/2: detected.
        if n == "grpc-web" || (!exact && n.starts_with("grpc-web-")) {
            return None;
        }
        let head = if exact {
            n
        } else {
            n.split('-').next().unwrap_or(n)
        };
        if H2.contains(&head) {
            Some(AppProtocol::Http2)
        } else if H1.contains(&head) {
            Some(AppProtocol::Http1)
        } else if OPAQUE.contains(&head) {
            Some(AppProtocol::Opaque)
        } else {
            None
        }
    }
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The declared protocols of a service's app ports, as pushed (`ServiceConfig.app_protocols`):
/// checked once, looked up by port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProtocols(Vec<(u16, AppProtocol)>);

impl AppProtocols {
    pub fn of(&self, port: u16) -> Option<AppProtocol> {
        self.0.iter().find(|(p, _)| *p == port).map(|(_, a)| *a)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, AppProtocol)> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<&[mesh_proto::v1::AppPort]> for AppProtocols {
    type Error = ProtocolError;

    fn try_from(ports: &[mesh_proto::v1::AppPort]) -> Result<Self, ProtocolError> {
        let mut out: Vec<(u16, AppProtocol)> = Vec::with_capacity(ports.len());
        for p in ports {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ProtocolError(format!("app port {} is not a port", p.port)))?;
            if out.iter().any(|(q, _)| *q == port) {
                return Err(ProtocolError(format!("app port {port} is declared twice")));
            }
            out.push((port, AppProtocol::parse(&p.protocol)?));
        }
        out.sort_unstable_by_key(|(p, _)| *p);
        Ok(AppProtocols(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_ports_map_like_istio_and_linkerd() {
        use AppProtocol::*;
        let k = AppProtocol::of_kubernetes_port;
        assert_eq!(k(Some("kubernetes.io/h2c"), None), Some(Http2));
        assert_eq!(
            k(Some("grpc"), Some("http-x")),
            Some(Http2),
            "appProtocol wins"
        );
        assert_eq!(k(Some("HTTP"), None), Some(Http1));
        assert_eq!(k(Some("kubernetes.io/ws"), None), Some(Http1));
        assert_eq!(k(Some("linkerd.io/opaque"), None), Some(Opaque));
        assert_eq!(k(Some("tcp"), None), Some(Opaque));
        assert_eq!(
            k(Some("example.com/custom"), Some("http")),
            None,
            "unknown: detect"
        );
        assert_eq!(k(None, Some("grpc-api")), Some(Http2));
        assert_eq!(k(None, Some("grpc-web")), None, "gRPC-Web: detected");
        assert_eq!(k(None, Some("http-metrics")), Some(Http1));
        assert_eq!(k(None, Some("tcp-db")), Some(Opaque));
        assert_eq!(k(None, Some("https")), Some(Opaque));
        assert_eq!(k(None, Some("web")), None);
        assert_eq!(k(Some(""), Some("redis")), Some(Opaque));
        assert_eq!(k(None, None), None);
    }

    #[test]
    fn pushed_ports_are_checked() {
        let p = |port, protocol: &str| mesh_proto::v1::AppPort {
            port,
            protocol: protocol.into(),
        };
        let ok = AppProtocols::try_from(&[p(9000, "opaque"), p(8080, "http2")][..]).unwrap();
        assert_eq!(ok.of(8080), Some(AppProtocol::Http2));
        assert_eq!(ok.of(9000), Some(AppProtocol::Opaque));
        assert_eq!(ok.of(1), None);
        for (bad, why) in [
            (vec![p(0, "http1")], "not a port"),
            (vec![p(70000, "http1")], "not a port"),
            (vec![p(80, "h3")], "unknown app protocol"),
            (vec![p(80, "http1"), p(80, "http2")], "declared twice"),
        ] {
            let e = AppProtocols::try_from(&bad[..]).unwrap_err();
            assert!(e.0.contains(why), "{e}");
        }
    }
}
