//! Health of the local app, checked by the proxy itself: on a VM (no kubelet there) as the
//! registered endpoint's `ready` flag, and in a pod for the kubelet, whose probes the injector
//! points at the admin port (`app_probe`): under STRICT mTLS the kubelet's own plaintext probe
//! of the app port would be refused by the inbound listener. A check is a TCP connect, an HTTP
//! GET (200–399 passes, as for the kubelet; HTTPS without certificate checks, as the kubelet
//! does) or a gRPC health check (`grpc.health.v1.Health/Check` answering SERVING).

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Full};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The app's port accepts a connection.
    Tcp,
    /// `GET <path>` on the app's port answers 200–399.
    Http {
        path: String,
        https: bool,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// The gRPC health service answers SERVING for `service` ("" is the whole server).
    Grpc { service: String },
}

impl Check {
    /// `tcp`, `http:/path`, or `none` (no check: always ready).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "none" | "" => Ok(None),
            "tcp" => Ok(Some(Check::Tcp)),
            _ => match s.strip_prefix("http:") {
                Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => {
                    Ok(Some(Check::Http {
                        path: p.to_string(),
                        https: false,
                        headers: Vec::new(),
                    }))
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
        match check {
            Check::Tcp => Ok(()),
            Check::Http {
                path,
                https: false,
                headers,
            } => http_get(hyper_util::rt::TokioIo::new(tcp), app, path, headers).await,
            Check::Http {
                path,
                https: true,
                headers,
            } => {
                let tls = tokio_rustls::TlsConnector::from(insecure_client()?)
                    .connect(
                        rustls_pki_types::ServerName::IpAddress(app.ip().into()),
                        tcp,
                    )
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                http_get(hyper_util::rt::TokioIo::new(tls), app, path, headers).await
            }
            Check::Grpc { service } => grpc_health(tcp, app, service).await,
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn http_get<IO>(
    io: IO,
    app: SocketAddr,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<(), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path)
        .header(http::header::USER_AGENT, "mesh-proxy-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    for (n, v) in headers {
        req.headers_mut().append(n.clone(), v.clone());
    }
    if !req.headers().contains_key(http::header::HOST) {
        let host = HeaderValue::from_str(&app.to_string()).map_err(|e| e.to_string())?;
        req.headers_mut().insert(http::header::HOST, host);
    }
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
}

/// `grpc.health.v1.Health/Check` over h2c; passes on SERVING.
async fn grpc_health(tcp: TcpStream, app: SocketAddr, service: &str) -> Result<(), String> {
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // HealthCheckRequest { service = 1 (string) }, in one uncompressed gRPC frame.
    let mut msg = Vec::with_capacity(service.len() + 2);
    if !service.is_empty() {
        msg.push(0x0a);
        push_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{app}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "mesh-proxy-health")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.map_err(|e| e.to_string())?;
    let grpc_status = parts
        .headers
        .get("grpc-status")
        .or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if grpc_status != "0" {
        return Err(format!("gRPC health check: grpc-status {grpc_status:?}"));
    }
    // HealthCheckResponse { status = 1 (enum) }; SERVING is 1.
    let bytes = collected.to_bytes();
    match serving_status(bytes.get(5..).unwrap_or_default()) {
        Some(1) => Ok(()),
        other => Err(format!(
            "gRPC health check: status {} (not SERVING)",
            other.map_or("unknown".to_string(), |s| s.to_string())
        )),
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 (varint) of a protobuf message; 0 when absent (proto3 default).
fn serving_status(mut m: &[u8]) -> Option<u64> {
    let varint = |m: &mut &[u8]| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = m.split_first()?;
            *m = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    };
    let mut status = 0;
    while !m.is_empty() {
        let key = varint(&mut m)?;
        match key & 7 {
            0 => {
                let v = varint(&mut m)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let len = usize::try_from(varint(&mut m)?).ok()?;
                m = m.get(len..)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

/// TLS to the app's own HTTPS port for a probe: like the kubelet, any certificate is taken
/// (the connection never leaves the pod, and the app's certificate is not the mesh's).
fn insecure_client() -> Result<Arc<rustls::ClientConfig>, String> {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
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
            Ok(Some(Check::Http {
                path: "/healthz".into(),
                https: false,
                headers: Vec::new()
            }))
        );
        for bad in ["http:", "http:healthz", "udp", "http:/a b"] {
            assert!(Check::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_serving_status_of_a_health_answer() {
        assert_eq!(serving_status(&[0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0x08, 0x02]), Some(2));
        assert_eq!(serving_status(&[]), Some(0));
        assert_eq!(serving_status(&[0x12, 0x01, b'x', 0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0x08]), None);
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
        assert!(
            probe(
                &Check::Http {
                    path: "/ok".into(),
                    https: false,
                    headers: Vec::new()
                },
                addr,
                t
            )
            .await
            .is_ok()
        );
        let e = probe(
            &Check::Http {
                path: "/bad".into(),
                https: false,
                headers: Vec::new(),
            },
            addr,
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(probe(&Check::Tcp, gone, t).await.is_err());
    }
}
