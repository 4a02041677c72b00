//! The mutating admission webhook: `POST /inject` with an `admission.k8s.io/v1`
//! AdmissionReview, answered by `mesh_inject::review` with the same review carrying a
//! JSONPatch. Served over HTTPS on `--webhook-addr` with the control plane's certificate (its
//! CA bundle goes in the webhook configuration).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use mesh_inject::InjectConfig;
use mesh_inject::review::{MAX_REVIEW_BYTES, review};
use std::sync::Arc;

/// Routes one HTTP request of the webhook port.
pub async fn handle<B>(
    req: Request<B>,
    cfg: Arc<InjectConfig>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/inject" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: POST /inject\n".into(),
        ));
    }
    if req.method() != hyper::Method::POST {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        ));
    }
    let body = match read_review(req.into_body()).await {
        Ok(b) => b,
        Err(Unread::TooLarge) => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {MAX_REVIEW_BYTES} bytes\n"),
            ));
        }
        Err(Unread::Broken(e)) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("body unreadable: {e}\n"),
            ));
        }
    };
    Ok(match review(&body, &cfg) {
        Ok(v) => {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    })
}

/// Why a review's body was not read.
enum Unread {
    TooLarge,
    Broken(String),
}

/// How much of a body over the limit is still read (and dropped) before the 413, and for how
/// long: enough for any body a client would send a webhook, not an unbounded sink.
const DRAIN_BYTES: usize = 4 * MAX_REVIEW_BYTES;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The review's body, at most `MAX_REVIEW_BYTES`. A larger one is read on to its end and
/// dropped (within `DRAIN_BYTES` and `DRAIN_TIME`) before the 413 goes out: a server that
/// closes while the client still sends resets the connection, and the client may never read
/// the answer (RFC 9112 §9.6). Past those bounds the connection just closes.
async fn read_review<B>(body: B) -> Result<Bytes, Unread>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    let mut deadline = None;
    loop {
        let next = body.frame();
        let frame = match deadline {
            None => next.await,
            Some(at) => match tokio::time::timeout_at(at, next).await {
                Ok(f) => f,
                Err(_) => return Err(Unread::TooLarge),
            },
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame
            .map_err(|e| Unread::Broken(e.to_string()))?
            .into_data()
        else {
            continue;
        };
        seen = seen.saturating_add(bytes::Buf::remaining(&data));
        if seen <= MAX_REVIEW_BYTES {
            bytes::BufMut::put(&mut kept, data);
        } else if seen > DRAIN_BYTES {
            return Err(Unread::TooLarge);
        } else if deadline.is_none() {
            kept = bytes::BytesMut::new();
            deadline = Some(tokio::time::Instant::now() + DRAIN_TIME);
        }
    }
    if seen > MAX_REVIEW_BYTES {
        return Err(Unread::TooLarge);
    }
    Ok(kept.freeze())
}

/// Serves the webhook on TLS connections from `incoming` (HTTP/1.1 and HTTP/2).
pub async fn serve(
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    cfg: Arc<InjectConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    loop {
        let tls = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r| handle(r, cfg.clone()));
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(error = %e, "webhook connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// A body of `chunks` 64 KiB chunks, counting how many were taken.
    fn counted(
        chunks: usize,
    ) -> (
        http_body_util::StreamBody<
            impl tokio_stream::Stream<
                Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
            >,
        >,
        Arc<AtomicUsize>,
    ) {
        let taken = Arc::new(AtomicUsize::new(0));
        let t = taken.clone();
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = tokio_stream::iter((0..chunks).map(move |_| {
            t.fetch_add(1, SeqCst);
            Ok(hyper::body::Frame::data(chunk.clone()))
        }));
        (http_body_util::StreamBody::new(frames), taken)
    }

    #[tokio::test]
    async fn a_review_over_the_limit_is_read_to_its_end_then_refused() {
        let cfg = Arc::new(InjectConfig::default());
        // 5 MiB, over the 4 MiB limit: all of it read, so that the client gets the 413.
        let (body, taken) = counted(80);
        let req = Request::post("/inject").body(body).unwrap();
        let resp = handle(req, cfg.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(taken.load(SeqCst), 80, "read to its end");
        // Past the drain bound (16 MiB), reading stops.
        let (body, taken) = counted(400);
        let req = Request::post("/inject").body(body).unwrap();
        let resp = handle(req, cfg).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(taken.load(SeqCst), DRAIN_BYTES / (64 * 1024) + 1);
    }

    #[tokio::test]
    async fn a_review_within_the_limit_is_read_whole() {
        let (body, _) = counted(2);
        let got = read_review(body).await.ok().map(|b| b.len());
        assert_eq!(got, Some(128 * 1024));
    }
}
