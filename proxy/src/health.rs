//! Health of the local app, checked by the proxy itself on a VM (no kubelet there): a TCP
//! connect or an HTTP GET on the app's port. The result is the registered endpoint's `ready`
//! flag, so callers' balancers leave an unhealthy app out within a push.

use http_body_util::Empty;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The app's port accepts a connection.
    Tcp,
    /// `GET <path>` on the app's port answers 200–399.
    Http(String),
}

impl Check {
    /// `tcp`, `http:/path`, or `none` (no check: always ready).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "none" | "" => Ok(None),
            "tcp" => Ok(Some(Check::Tcp)),
            _ => match s.strip_prefix("http:") {
                Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => {
                    Ok(Some(Check::Http(p.to_string())))
                }
                _ => Err(format!(
                    "--app-health-check {s:?}: expected none, tcp or http:/path"
                )),
            },
        }
    }
}

/// Health check settings (from the bootstrap).
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub check: Check,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before the app counts as unhealthy (one success brings it back).
    pub failures: u32,
}

/// Runs one check against `app`.
pub async fn probe(check: &Check, app: SocketAddr, timeout: Duration) -> Result<(), String> {
    let run = async {
        let tcp = TcpStream::connect(app).await.map_err(|e| e.to_string())?;
        let Check::Http(path) = check else {
            return Ok(());
        };
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(path.as_str())
            .header(http::header::HOST, app.to_string())
            .header(http::header::USER_AGENT, "mesh-proxy-health")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let status = send
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?
            .status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {path}: {status}"))
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Debounces results: unhealthy after `failures` in a row, healthy again after one success.
#[derive(Debug)]
pub struct Status {
    healthy: bool,
    failed_in_row: u32,
    failures: u32,
}

impl Status {
    pub fn new(healthy: bool, failures: u32) -> Self {
        Self {
            healthy,
            failed_in_row: 0,
            failures: failures.max(1),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failed_in_row = 0;
        } else {
            self.failed_in_row += 1;
        }
        let now = if ok {
            true
        } else if self.failed_in_row >= self.failures {
            false
        } else {
            self.healthy
        };
        (now != self.healthy).then(|| {
            self.healthy = now;
            now
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks() {
        assert_eq!(Check::parse("none"), Ok(None));
        assert_eq!(Check::parse("tcp"), Ok(Some(Check::Tcp)));
        assert_eq!(
            Check::parse("http:/healthz"),
            Ok(Some(Check::Http("/healthz".into())))
        );
        for bad in ["http:", "http:healthz", "udp", "http:/a b"] {
            assert!(Check::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unhealthy_after_consecutive_failures_healthy_after_one_success() {
        let mut s = Status::new(true, 2);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None, "a single failure is forgiven");
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), Some(true));
        assert!(s.healthy());
    }

    #[tokio::test]
    async fn probes_tcp_and_http() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(1);
        assert!(probe(&Check::Tcp, addr, t).await.is_ok());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = hyper::service::service_fn(
                    |r: http::Request<hyper::body::Incoming>| async move {
                        let code = if r.uri().path() == "/ok" { 200 } else { 503 };
                        http::Response::builder()
                            .status(code)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        assert!(probe(&Check::Http("/ok".into()), addr, t).await.is_ok());
        let e = probe(&Check::Http("/bad".into()), addr, t)
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(probe(&Check::Tcp, gone, t).await.is_err());
    }
}
