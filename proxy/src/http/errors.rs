//! The one table from proxy errors to responses. Every response the proxy makes itself carries
//! `x-mesh-error: <reason>`; gRPC callers get a gRPC status instead of an HTTP one.

use super::{Body, GRPC_STATUS, MESH_ERROR, full};
use http::{HeaderValue, Response, StatusCode};

/// Which side a failure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request names no destination: send Host/:authority, or use an absolute URI")]
    NoAuthority,
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("discovery did not answer for {0:?} in time")]
    DiscoveryUnavailable(String),
    #[error("too many distinct destinations")]
    TooManyServices,
    /// The namespace's egress mode is registry-only and the destination is in no registry.
    #[error("{0} is outside the mesh and not declared (egress is registry-only)")]
    EgressDenied(String),
    /// A gateway's route has no rule for the request's host and path (and no default).
    #[error("no route for {0:?}")]
    NoRoute(String),
    #[error("no healthy endpoint for service {0:?}")]
    NoEndpoints(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("upstream refused the request before processing it: {0}")]
    Refused(String),
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("{} after {after:?}", if *per_try { "attempt timed out" } else if *deadline { "client's grpc-timeout deadline passed" } else { "request timed out" })]
    Timeout {
        after: std::time::Duration,
        per_try: bool,
        /// The client's own gRPC deadline was the shorter one.
        deadline: bool,
    },
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    #[error("circuit open: {0}")]
    CircuitOpen(String),
    /// The adaptive concurrency limit of the service's own proxy is reached: shed at once
    /// rather than queued behind an app that is already slowing down.
    #[error("overloaded: {0} requests in flight to the app, its current limit")]
    Overloaded(u32),
    #[error("fault injected by policy: status {0}")]
    FaultAbort(u16),
    #[error("local app unavailable: {0}")]
    App(String),
    #[error("denied by authorization policy {0}")]
    Denied(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Framing refused before routing (`http::framing`); the connection is closed after it.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The inbound proxy does not know its own service's settings yet (fail closed).
    #[error("not ready: {0}")]
    NotReady(&'static str),
}

/// Every `x-mesh-error` reason the proxy sends (metrics count by index into it).
pub const REASONS: [&str; 22] = [
    "no-authority",
    "bad-request",
    "malformed-request",
    "unknown-service",
    "too-many-services",
    "discovery-unavailable",
    "no-healthy-endpoints",
    "connect-failed",
    "tls-failed",
    "upstream-reset",
    "refused-stream",
    "per-try-timeout",
    "timeout",
    "rate-limited",
    "circuit-open",
    "overloaded",
    "fault-abort",
    "app-unavailable",
    "denied",
    "not-ready",
    "no-route",
    "egress-denied",
];

/// Index of `reason` in `REASONS` (`REASONS.len()` for one not in it).
pub fn reason_index(reason: &[u8]) -> usize {
    REASONS
        .iter()
        .position(|r| r.as_bytes() == reason)
        .unwrap_or(REASONS.len())
}

impl ProxyError {
    /// (HTTP status, `x-mesh-error` reason, gRPC code, side)
    fn row(&self) -> (StatusCode, &'static str, u8, Side) {
        use ProxyError::*;
        use Side::{Downstream as D, Internal as I, Upstream as U};
        match self {
            NoAuthority => (StatusCode::BAD_REQUEST, "no-authority", 3, D),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", 3, D),
            Malformed(_) => (StatusCode::BAD_REQUEST, "malformed-request", 3, D),
            NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not-ready", 14, I),
            UnknownService(_) => (StatusCode::NOT_FOUND, "unknown-service", 12, D),
            NoRoute(_) => (StatusCode::NOT_FOUND, "no-route", 12, D),
            EgressDenied(_) => (StatusCode::BAD_GATEWAY, "egress-denied", 7, D),
            TooManyServices => (StatusCode::SERVICE_UNAVAILABLE, "too-many-services", 8, D),
            DiscoveryUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "discovery-unavailable",
                14,
                I,
            ),
            NoEndpoints(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-endpoints",
                14,
                U,
            ),
            Connect { .. } => (StatusCode::SERVICE_UNAVAILABLE, "connect-failed", 14, U),
            Tls { .. } => (StatusCode::BAD_GATEWAY, "tls-failed", 14, U),
            Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream-reset", 14, U),
            Refused(_) => (StatusCode::SERVICE_UNAVAILABLE, "refused-stream", 14, U),
            Timeout { per_try: true, .. } => (StatusCode::GATEWAY_TIMEOUT, "per-try-timeout", 4, U),
            Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout", 4, U),
            RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", 8, D),
            CircuitOpen(_) => (StatusCode::SERVICE_UNAVAILABLE, "circuit-open", 14, U),
            Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", 14, U),
            FaultAbort(s) => {
                let status = StatusCode::from_u16(*s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                (status, "fault-abort", grpc_code_of(status), I)
            }
            App(_) => (StatusCode::BAD_GATEWAY, "app-unavailable", 14, U),
            Denied(_) => (StatusCode::FORBIDDEN, "denied", 7, D),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.row().0
    }
    pub fn reason(&self) -> &'static str {
        self.row().1
    }
    pub fn side(&self) -> Side {
        self.row().3
    }
    /// Safe to retry on another endpoint: the request never reached an upstream.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::Tls { .. } | ProxyError::Refused(_)
        )
    }

    /// The response for this error; gRPC requests get a trailers-only gRPC error.
    pub fn to_response(&self, grpc: bool) -> Response<Body> {
        let (status, reason, code, _) = self.row();
        let msg = self.to_string();
        let mut resp = if grpc {
            let mut r = Response::new(full(""));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
            if let Ok(v) = HeaderValue::from_str(&grpc_encode(&msg)) {
                r.headers_mut().insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(full(format!("{msg}\n")));
            *r.status_mut() = status;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut()
            .insert(MESH_ERROR, HeaderValue::from_static(reason));
        if let ProxyError::Malformed(_) = self {
            // Whatever follows on an HTTP/1.1 connection cannot be framed with confidence
            // (RFC 9112 §6.3); hyper closes it after this answer.
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::RateLimited { retry_after } = self {
            // Whole seconds, rounded up (RFC 9110 §10.2.3).
            let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The gRPC code for an HTTP status (gRPC's own HTTP-to-gRPC mapping).
fn grpc_code_of(s: StatusCode) -> u8 {
    match s.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// Percent-encodes a grpc-message (gRPC over HTTP/2 spec).
fn grpc_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics count proxy errors by index into `REASONS`: every reason must be in it.
    #[test]
    fn every_reason_is_in_the_metrics_table() {
        use std::time::Duration;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let all = [
            ProxyError::NoAuthority,
            ProxyError::BadRequest(String::new()),
            ProxyError::Malformed(""),
            ProxyError::NotReady(""),
            ProxyError::UnknownService(String::new()),
            ProxyError::TooManyServices,
            ProxyError::DiscoveryUnavailable(String::new()),
            ProxyError::NoEndpoints(String::new()),
            ProxyError::Connect {
                addr,
                reason: String::new(),
            },
            ProxyError::Tls {
                addr,
                reason: String::new(),
            },
            ProxyError::Upstream(String::new()),
            ProxyError::Refused(String::new()),
            ProxyError::Timeout {
                after: Duration::ZERO,
                per_try: true,
                deadline: false,
            },
            ProxyError::Timeout {
                after: Duration::ZERO,
                per_try: false,
                deadline: false,
            },
            ProxyError::RateLimited {
                retry_after: Duration::ZERO,
            },
            ProxyError::CircuitOpen(String::new()),
            ProxyError::Overloaded(0),
            ProxyError::FaultAbort(503),
            ProxyError::App(String::new()),
            ProxyError::Denied(String::new()),
            ProxyError::NoRoute(String::new()),
            ProxyError::EgressDenied(String::new()),
        ];
        let mut seen: Vec<usize> = all
            .iter()
            .map(|e| reason_index(e.reason().as_bytes()))
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..REASONS.len()).collect::<Vec<_>>());
        assert_eq!(reason_index(b"no-such-reason"), REASONS.len());
    }

    #[test]
    fn http_and_grpc_shapes() {
        let e = ProxyError::NoEndpoints("web".into());
        let r = e.to_response(false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-mesh-error"], "no-healthy-endpoints");
        let r = e.to_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("web")
        );
        assert_eq!(
            ProxyError::UnknownService("x".into())
                .to_response(false)
                .status(),
            404
        );
        assert!(
            ProxyError::Connect {
                addr: ([127, 0, 0, 1], 1).into(),
                reason: "refused".into()
            }
            .retryable()
        );
        assert!(!ProxyError::Upstream("reset".into()).retryable());
        assert_eq!(grpc_encode("a%b\n"), "a%25b%0A");
    }
}
