//! A test OTLP trace receiver that keeps every span it is sent: OTLP/gRPC (a tonic server
//! implementing the collector's TraceService from `opentelemetry-proto`), in plain text or TLS
//! with a certificate of its own CA, and OTLP/HTTP (`POST /v1/traces`, protobuf bodies).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// One received span, ids in hex.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// The sender's resource attributes.
    pub resource: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ReceivedSpan>>>);

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Collector {
    /// Keeps the spans of one export.
    fn keep(&self, req: ExportTraceServiceRequest) {
        let mut got = Vec::new();
        for rs in req.resource_spans {
            let resource: BTreeMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                got.push(ReceivedSpan {
                    service: service.clone(),
                    name: s.name,
                    kind: s.kind,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                    resource: resource.clone(),
                });
            }
        }
        if let Ok(mut v) = self.0.lock() {
            v.extend(got);
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.keep(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver, listening on loopback until dropped or stopped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    /// `http`, or `https` for [`OtlpReceiver::start_https`].
    scheme: &'static str,
    spans: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A certificate for 127.0.0.1 from a new CA, whose certificate is written to `ca_file` (PEM).
fn loopback_certificate(
    ca_file: &std::path::Path,
) -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    std::fs::write(ca_file, ca.pem())?;
    let issuer = Issuer::new(p, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse()?)];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((cert, key))
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// OTLP/gRPC over TLS with a certificate for 127.0.0.1 from a fresh CA, whose PEM file
    /// is written to `ca_file` (for `OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub async fn start_tls(ca_file: &std::path::Path) -> anyhow::Result<Self> {
        let (cert, key) = loopback_certificate(ca_file)?;
        let tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem()),
        );
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> anyhow::Result<Self> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let spans = Collector::default();
        let (stop, rx) = tokio::sync::oneshot::channel();
        let svc = TraceServiceServer::new(spans.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = tls {
            builder = builder.tls_config(t)?;
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Ok(Self {
            addr,
            scheme: "http",
            spans,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// OTLP/HTTP: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
    pub async fn start_http() -> anyhow::Result<Self> {
        Self::start_http_with(None).await
    }

    /// OTLP/HTTP over TLS, with a certificate for 127.0.0.1 from a CA of its own, written to
    /// `ca_file` (PEM). [`OtlpReceiver::url`] is then `https://`.
    pub async fn start_https(ca_file: &std::path::Path) -> anyhow::Result<Self> {
        let (cert, key) = loopback_certificate(ca_file)?;
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        let mut r = Self::start_http_with(Some(Arc::new(cfg))).await?;
        r.scheme = "https";
        Ok(r)
    }

    async fn start_http_with(tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<Self> {
        use prost::Message;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let spans = Collector::default();
        let (stop, mut rx) = tokio::sync::oneshot::channel::<()>();
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    a = l.accept() => match a { Ok(c) => c, Err(_) => continue },
                    _ = &mut rx => return,
                };
                let (kept, tls) = (kept.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                let ok = req.uri().path() == "/v1/traces";
                                let body = http_body_util::BodyExt::collect(req.into_body())
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let status = match ExportTraceServiceRequest::decode(body) {
                                    Ok(r) if ok => {
                                        kept.keep(r);
                                        200
                                    }
                                    _ => 400,
                                };
                                let reply = ExportTraceServiceResponse::default().encode_to_vec();
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(reply)))
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(cfg) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            scheme: "http",
            spans,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `http://<addr>` (`https://` over TLS), for `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Stops listening (the collector is "down" from then on).
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
