//! OpenTelemetry spans of the mesh, shared by the proxy and the control plane: W3C trace
//! context (`traceparent`), span records made after the fact (no SDK tracer on a request path),
//! and a bounded queue to one task that exports batches over OTLP/gRPC. Sending a span never
//! waits: when the queue is full (collector slow or away) the span is dropped and counted.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;

/// Spans waiting for export; past this they are dropped.
pub const QUEUE_SPANS: usize = 4096;
/// Most spans in one export call.
pub const BATCH_SPANS: usize = 512;
/// Time one export call may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("{0}")]
    Settings(String),
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`; port 4317 by convention), plain or TLS.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`; port 4318), plain or TLS.
    HttpProtobuf,
}

/// Where spans go and what they say about who sent them: the flags first, then the standard
/// OpenTelemetry environment (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `…_PROTOCOL`,
/// `…_CERTIFICATE`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`); the exporter itself also
/// reads `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT` and `…_COMPRESSION`.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub endpoint: String,
    pub protocol: Protocol,
    /// CA certificates (PEM) an `https://` collector is verified against.
    pub ca_pem: Option<Vec<u8>>,
    pub service_name: String,
    pub resource: Vec<KeyValue>,
}

/// Percent-decodes a W3C Baggage-style value (`OTEL_RESOURCE_ATTRIBUTES`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ExportSettings {
    /// The settings from `flag_endpoint` (else the environment); None when nothing says where
    /// spans go. `default_service` names the process unless the environment does.
    pub fn resolve(
        flag_endpoint: Option<&str>,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, OtelError> {
        let var = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("grpc") => Protocol::Grpc,
            Some("http/protobuf") => Protocol::HttpProtobuf,
            Some(other) => {
                return Err(OtelError::Settings(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL {other:?}: use grpc or http/protobuf"
                )));
            }
        };
        // The generic endpoint is a base: OTLP/HTTP adds the signal's path to it.
        let endpoint = match (flag_endpoint, var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(e), _) => e.to_string(),
            (None, Some(e)) => e,
            (None, None) => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) if protocol == Protocol::HttpProtobuf => {
                    format!("{}/v1/traces", base.trim_end_matches('/'))
                }
                Some(base) => base,
                None => return Ok(None),
            },
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(OtelError::Settings(format!(
                "OTLP endpoint {endpoint:?}: an http:// or https:// URL"
            )));
        }
        let ca_pem = match var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| var("OTEL_EXPORTER_OTLP_CERTIFICATE"))
        {
            Some(path) => Some(std::fs::read(&path).map_err(|e| {
                OtelError::Settings(format!("OTEL_EXPORTER_OTLP_CERTIFICATE {path}: {e}"))
            })?),
            None => None,
        };
        let mut resource = Vec::new();
        let mut named = None;
        for pair in var("OTEL_RESOURCE_ATTRIBUTES")
            .unwrap_or_default()
            .split(',')
        {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let (k, v) = (percent_decode(k.trim()), percent_decode(v.trim()));
            if k == "service.name" {
                named = Some(v);
            } else if !k.is_empty() {
                resource.push(KeyValue::new(k, v));
            }
        }
        let service_name = var("OTEL_SERVICE_NAME")
            .or(named)
            .unwrap_or_else(|| default_service.to_string());
        Ok(Some(Self {
            endpoint,
            protocol,
            ca_pem,
            service_name,
            resource,
        }))
    }
}

/// The share of new traces `OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG`) asks for;
/// None when unset. A caller's sampled flag is always followed (every sampler is
/// parent-based here).
pub fn sampler_from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<f64>, OtelError> {
    let Some(sampler) = env("OTEL_TRACES_SAMPLER").map(|s| s.trim().to_string()) else {
        return Ok(None);
    };
    let ratio = || -> Result<f64, OtelError> {
        match env("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(a) => a
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    OtelError::Settings(format!(
                        "OTEL_TRACES_SAMPLER_ARG {a:?}: a ratio from 0 to 1"
                    ))
                }),
        }
    };
    Ok(Some(match sampler.as_str() {
        "always_on" | "parentbased_always_on" => 1.0,
        "always_off" | "parentbased_always_off" => 0.0,
        "traceidratio" | "parentbased_traceidratio" => ratio()?,
        other => {
            return Err(OtelError::Settings(format!(
                "OTEL_TRACES_SAMPLER {other:?}: use always_on, always_off, traceidratio or \
                 their parentbased_ forms"
            )));
        }
    }))
}

/// A W3C trace context: which trace, which span, sampled or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` header (version 00): `00-<32 hex>-<16 hex>-<2 hex>`. Invalid or
    /// all-zero ids give None (the request then starts a new trace).
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (ver, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ver.len() != 2
            || ver == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value naming this span as the parent.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// A span begun: its context (to propagate) and where it hangs in its trace.
#[derive(Debug, Clone)]
pub struct Span {
    pub context: TraceContext,
    pub parent_span_id: Option<u64>,
    pub start: SystemTime,
}

impl Span {
    /// A child of `parent` (the caller's context), or the root of a new trace. A new trace is
    /// sampled with probability `sampling`; a child follows its parent's decision.
    pub fn begin(parent: Option<TraceContext>, sampling: f64) -> Self {
        let span_id = nonzero_u64();
        let context = match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                sampled: p.sampled,
            },
            None => TraceContext {
                trace_id: (u128::from(nonzero_u64()) << 64) | u128::from(fastrand::u64(..)),
                span_id,
                sampled: sampling >= 1.0 || fastrand::f64() < sampling,
            },
        };
        Self {
            context,
            parent_span_id: parent.map(|p| p.span_id),
            start: SystemTime::now(),
        }
    }

    /// A child of this span (same trace and sampling) that started at `start`.
    pub fn child(&self, start: SystemTime) -> Self {
        Self {
            context: TraceContext {
                span_id: nonzero_u64(),
                ..self.context
            },
            parent_span_id: Some(self.context.span_id),
            start,
        }
    }
}

/// Queues finished spans for export.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<SpanData>,
    dropped: AtomicU64,
    scope: InstrumentationScope,
}

impl Exporter {
    /// Starts the export task to the collector `settings` name (e.g. OTLP/gRPC at
    /// `http://127.0.0.1:4317`), adding `resource` attributes to the settings' own. Needs a
    /// tokio runtime. The collector may be down: export is retried with the next batch.
    pub fn start(settings: &ExportSettings, resource: Vec<KeyValue>) -> Result<Self, OtelError> {
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        let fail = |e: opentelemetry_otlp::ExporterBuildError| OtelError::Exporter(e.to_string());
        let mut exporter = match settings.protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.as_str())
                    .with_timeout(EXPORT_TIMEOUT);
                if settings.endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
                    if let Some(ca) = &settings.ca_pem {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                    }
                    b = b.with_tls_config(tls);
                }
                b.build().map_err(fail)?
            }
            Protocol::HttpProtobuf => {
                use opentelemetry_otlp::WithHttpConfig;
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(settings.endpoint.as_str())
                    .with_timeout(EXPORT_TIMEOUT);
                if settings.endpoint.starts_with("https://") {
                    b = b.with_http_client(HttpsClient::new(settings.ca_pem.as_deref())?);
                }
                b.build().map_err(fail)?
            }
        };
        let service_name = settings.service_name.clone();
        let mut attrs = settings.resource.clone();
        attrs.extend(resource);
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(service_name.clone())
                .with_attributes(attrs)
                .build(),
        );
        let (tx, mut rx) = mpsc::channel::<SpanData>(QUEUE_SPANS);
        tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH_SPANS {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
                let n = batch.len();
                match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
                    Ok(Ok(())) => failures = 0,
                    Ok(Err(e)) => {
                        failures += 1;
                        // Once per run of failures at info; the rest at debug.
                        if failures == 1 {
                            tracing::info!(error = %e, spans = n, "span export failed; spans dropped");
                        } else {
                            tracing::debug!(error = %e, spans = n, "span export failed");
                        }
                    }
                    Err(_) => tracing::info!(spans = n, "span export timed out; spans dropped"),
                }
            }
        });
        Ok(Self {
            tx,
            dropped: AtomicU64::new(0),
            scope: InstrumentationScope::builder("mesh")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    /// Ends `span` and queues it if its trace is sampled (never waits).
    pub fn end(
        &self,
        span: &Span,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        error: Option<String>,
    ) {
        self.end_at(span, name, kind, attributes, error, SystemTime::now());
    }

    /// As [`Exporter::end`], for a span that ended at `end` (one recorded after the fact).
    pub fn end_at(
        &self,
        span: &Span,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
        error: Option<String>,
        end: SystemTime,
    ) {
        if !span.context.sampled {
            return;
        }
        let c = span.context;
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(c.trace_id.to_be_bytes()),
                SpanId::from_bytes(c.span_id.to_be_bytes()),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: span
                .parent_span_id
                .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
            parent_span_is_remote: span.parent_span_id.is_some(),
            span_kind: kind,
            name: name.into(),
            start_time: span.start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match error {
                Some(description) => Status::Error {
                    description: description.into(),
                },
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        };
        if self.tx.try_send(data).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// OTLP/HTTP to an `https://` collector: one HTTP/1.1 request per export over a new rustls
/// connection (tokio-rustls and hyper's own client connection, which the proxy already links;
/// a pooling client library added about 1 MB of code to the sidecar). The collector is
/// verified against the given CA certificates, else the web PKI's roots.
struct HttpsClient {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpsClient")
    }
}

/// Largest collector answer read (the built-in clients' bound).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

impl HttpsClient {
    fn new(ca_pem: Option<&[u8]>) -> Result<Self, OtelError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let bad = |e: String| OtelError::Settings(format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                for c in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(c.map_err(|e| bad(e.to_string()))?)
                        .map_err(|e| bad(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(bad("no certificate in the file".into()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| OtelError::Exporter(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)),
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HttpsClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let uri = request.uri();
        let host = uri
            .host()
            .ok_or("no host in the collector's URL")?
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let name = rustls_pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let tls = self.tls.connect(name, tcp).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (mut parts, body) = request.into_parts();
        // Origin-form and a Host, as an origin server expects (RFC 9112 §3.2).
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        if let Some(a) = authority
            && !parts.headers.contains_key(http::header::HOST)
        {
            parts.headers.insert(http::header::HOST, a.parse()?);
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()?;
        let req = http::Request::from_parts(parts, http_body_util::Full::new(body));
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await?
            .to_bytes();
        Ok(http::Response::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_bad_input() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(h).expect("valid");
        assert_eq!(c.header(), h);
        assert!(c.sampled);
        assert!(!TraceContext::parse(&h.replace("-01", "-00")).is_some_and(|c| c.sampled));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn children_keep_the_trace_and_its_sampling_roots_follow_the_rate() {
        let parent = TraceContext {
            trace_id: 7,
            span_id: 9,
            sampled: false,
        };
        let s = Span::begin(Some(parent), 1.0);
        assert_eq!(s.context.trace_id, 7);
        assert_eq!(s.parent_span_id, Some(9));
        assert_ne!(s.context.span_id, 9);
        assert!(!s.context.sampled, "the parent's decision wins");
        assert!(Span::begin(None, 1.0).context.sampled);
        assert!(!Span::begin(None, 0.0).context.sampled);
        let sampled = (0..1000)
            .filter(|_| Span::begin(None, 0.25).context.sampled)
            .count();
        assert!((150..350).contains(&sampled), "{sampled}");
    }

    #[test]
    fn settings_follow_the_flag_then_the_otel_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = ExportSettings::resolve(None, "svc", env(&[])).unwrap();
        assert!(none.is_none());
        let s = ExportSettings::resolve(
            Some("http://flag:4317"),
            "svc",
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.endpoint.as_str(), s.protocol),
            ("http://flag:4317", Protocol::Grpc)
        );
        assert_eq!(s.service_name, "svc");
        let s = ExportSettings::resolve(
            None,
            "svc",
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=shop,k=a%2Cb"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://env:4318/v1/traces");
        assert_eq!(s.service_name, "shop");
        assert_eq!(s.resource, vec![KeyValue::new("k", "a,b")]);
        for bad in [
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")][..],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
        ] {
            let vars: &'static [(&'static str, &'static str)] =
                Box::leak(bad.to_vec().into_boxed_slice());
            assert!(
                ExportSettings::resolve(None, "svc", env(vars)).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(sampler_from_env(env(&[])).unwrap(), None);
        assert_eq!(
            sampler_from_env(env(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ]))
            .unwrap(),
            Some(0.25)
        );
        assert_eq!(
            sampler_from_env(env(&[("OTEL_TRACES_SAMPLER", "always_off")])).unwrap(),
            Some(0.0)
        );
        assert!(sampler_from_env(env(&[("OTEL_TRACES_SAMPLER", "sometimes")])).is_err());
    }
}
