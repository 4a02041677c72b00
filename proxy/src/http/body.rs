//! Request bodies on the outbound path: the app's body as hyper gave it, or a replayable copy
//! when a retry policy may send it again; and the answer bodies the proxy passes on.
//!
//! A [`ReplayBody`] streams to the first attempt while keeping what passed, up to a cap
//! ([`MAX_REPLAY_BYTES`]); a clone made for a retry replays the kept frames, then continues from
//! the app's body. Past the cap nothing more is kept and the request can no longer be retried
//! once any of it was sent. The shared state sits behind a mutex that is only ever taken inside
//! `poll_frame`, never across an await, and only by the attempts of one request.

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Largest request body kept for replay, bytes.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

pub use super::BoxError;

/// The body of a request the outbound proxy sends to a peer sidecar.
#[derive(Debug)]
pub enum ReqBody {
    Incoming(Upload),
    Replay(ReplayBody),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Replay(b) => b.poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Incoming(b) => b.is_end_stream(),
            ReqBody::Replay(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Incoming(b) => b.size_hint(),
            ReqBody::Replay(b) => b.hint,
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Ends a body that moves no frame for `after` (a route's `stream_idle_timeout`): a stalled
/// upload or download is then reset instead of holding the stream, its buffers and the
/// caller's slot open for as long as the peer likes. Only requests whose policy sets it pay
/// for a timer.
#[derive(Debug)]
pub struct IdleTimer {
    after: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

/// What an idle body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}: stream idle timeout")]
pub struct StreamIdle(pub std::time::Duration);

impl IdleTimer {
    pub fn new(after: std::time::Duration) -> Self {
        Self {
            after,
            sleep: Box::pin(tokio::time::sleep(after)),
        }
    }

    /// A frame moved: the idle time starts again.
    pub fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.after;
        self.sleep.as_mut().reset(at);
    }

    /// Ready once nothing moved for `after`.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<StreamIdle> {
        self.sleep
            .as_mut()
            .poll(cx)
            .map(|()| StreamIdle(self.after))
    }
}

use std::future::Future as _;

/// The app's request body as hyper gave it, ended by an [`IdleTimer`] when its route sets one,
/// and counted when its size was not known from the head (see `Observation::count_request`).
#[derive(Debug)]
pub struct Upload {
    inner: Incoming,
    idle: Option<IdleTimer>,
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Upload {
    pub fn new(inner: Incoming, idle: Option<std::time::Duration>) -> Self {
        Self {
            inner,
            idle: idle.map(IdleTimer::new),
            counted: None,
        }
    }

    /// Adds the body's data bytes to `counter` as they pass.
    pub fn counting(mut self, counter: Option<Arc<std::sync::atomic::AtomicU64>>) -> Self {
        self.counted = counter;
        self
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                if let Some(t) = this.idle.as_mut() {
                    t.touch();
                }
                if let (Some(c), Some(Ok(f))) = (&this.counted, &r)
                    && let Some(d) = f.data_ref()
                {
                    c.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.idle.as_mut().map(|t| t.poll_expired(cx)) {
                Some(Poll::Ready(e)) => Poll::Ready(Some(Err(e.into()))),
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of an answer the proxy passes on: from an HTTP/1.1 app connection (hyper's, left),
/// or from an HTTP/2 stream (a peer sidecar's or an HTTP/2 app's, right).
pub type RespBody = http_body_util::Either<Incoming, crate::http::h2client::H2Body>;

#[derive(Debug, thiserror::Error)]
#[error("request body cannot be replayed: more than {MAX_REPLAY_BYTES} bytes were sent already")]
pub struct NotReplayable;

#[derive(Debug)]
struct Shared<B> {
    inner: B,
    /// Data frames pulled from `inner`, in order, while under the cap.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    /// Frames pulled from `inner` so far (kept or not).
    pulled: usize,
    /// A frame was pulled that is not in `kept`.
    overflowed: bool,
    ended: bool,
    trailers: Option<HeaderMap>,
}

/// A request body that retries can send again; see the module docs.
#[derive(Debug)]
pub struct ReplayBody<B = Upload> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Frames this copy has yielded.
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B) -> Self {
        let hint = inner.size_hint();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner,
                kept: Vec::new(),
                kept_bytes: 0,
                pulled: 0,
                overflowed: false,
                ended: false,
                trailers: None,
            })),
            pos: 0,
            trailers_sent: false,
            hint,
        }
    }

    /// A copy that starts from the first frame, or None once the body outgrew the cap.
    pub fn replay(&self) -> Option<Self> {
        let s = self.shared.lock().ok()?;
        if s.overflowed {
            return None;
        }
        Some(Self {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }

    /// True once the whole body was read and is held (so a copy can be sent in full).
    pub fn complete(&self) -> bool {
        self.shared
            .lock()
            .map(|s| (s.ended || s.inner.is_end_stream()) && !s.overflowed)
            .unwrap_or(false)
    }

    /// True when this copy has nothing more to yield. The inner body's own end counts before
    /// it was polled to `None`: a sender that asks after the last data frame marks that frame
    /// END_STREAM instead of sending an empty frame to end the stream (~2,000 instructions per
    /// gRPC request on h2's send path).
    pub fn is_end_stream(&self) -> bool {
        self.shared
            .lock()
            .map(|s| {
                (s.ended || s.inner.is_end_stream())
                    && self.pos >= s.pulled
                    && (s.trailers.is_none() || self.trailers_sent)
            })
            .unwrap_or(true)
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut s) = self.shared.lock() else {
            return Poll::Ready(Some(Err(NotReplayable.into())));
        };
        if let Some(b) = s.kept.get(self.pos) {
            self.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(b.clone()))));
        }
        if self.pos < s.pulled {
            // Another copy pulled frames past the cap that this copy never saw.
            return Poll::Ready(Some(Err(NotReplayable.into())));
        }
        if s.ended {
            if !self.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                self.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        s.pulled += 1;
                        self.pos += 1;
                        if !s.overflowed && s.kept_bytes + data.len() <= MAX_REPLAY_BYTES {
                            s.kept_bytes += data.len();
                            s.kept.push(data.clone());
                        } else if !s.overflowed {
                            s.overflowed = true;
                            s.kept = Vec::new();
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            s.ended = true;
                            s.trailers = Some(t.clone());
                            self.trailers_sent = true;
                            Frame::trailers(t)
                        }
                        Err(other) => return Poll::Ready(Some(Ok(other.map_data(|d| d)))),
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// A request's head and a replayable copy of its body, kept to send the request again when
/// the peer provably did not process its stream (`h2client::never_processed`): RFC 9113 §8.7 makes
/// any method safe to send again then, which is what a graceful close (GOAWAY) by an app or a
/// peer sidecar leaves in flight. A body that outgrows the replay buffer (64 KiB,
/// `http::body`) cannot go again.
pub struct Resend {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    /// None: the request has no body.
    body: Option<ReplayBody>,
}

impl Resend {
    /// `req` with its body made replayable, and what is kept to send it again.
    pub fn keep(req: Request<ReqBody>) -> (Request<ReqBody>, Resend) {
        let (parts, body) = req.into_parts();
        let (body, kept) = match body {
            ReqBody::Empty => (ReqBody::Empty, None),
            ReqBody::Incoming(b) if b.is_end_stream() => (ReqBody::Empty, None),
            ReqBody::Incoming(b) => {
                let kept = ReplayBody::new(b);
                (
                    kept.replay().map_or(ReqBody::Empty, ReqBody::Replay),
                    Some(kept),
                )
            }
            ReqBody::Replay(b) => {
                let kept = b.replay();
                (ReqBody::Replay(b), kept)
            }
        };
        let resend = Resend {
            body: kept,
            ..Resend::head(&parts)
        };
        (Request::from_parts(parts, body), resend)
    }

    /// A bodyless request's head, kept to send it again (see [`Resend::with_body`]).
    pub fn head(parts: &http::request::Parts) -> Resend {
        Resend {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: None,
        }
    }

    /// The request again, or None when its body outgrew the replay buffer.
    pub fn again(&self) -> Option<Request<ReqBody>> {
        let body = match &self.body {
            None => ReqBody::Empty,
            Some(kept) => ReqBody::Replay(kept.replay()?),
        };
        Some(self.with_body(body))
    }

    /// The kept head again, with `body`.
    pub fn with_body<B>(&self, body: B) -> Request<B> {
        let mut again = Request::new(body);
        *again.method_mut() = self.method.clone();
        *again.uri_mut() = self.uri.clone();
        *again.version_mut() = self.version;
        *again.headers_mut() = self.headers.clone();
        again
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn body(chunks: &[&'static [u8]], trailers: bool) -> Chunks {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    struct Copy<B>(ReplayBody<B>);
    impl<B> Body for Copy<B>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.get_mut().0.poll_frame(cx)
        }
    }

    async fn read<B>(b: ReplayBody<B>) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let c = Copy(b).collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn a_retry_sees_the_same_body_and_trailers() {
        let first = ReplayBody::new(body(&[b"hello ", b"world"], true));
        let second = first.replay().unwrap();
        let (data, trailers) = read(first).await;
        assert_eq!(data, b"hello world");
        assert!(trailers.is_some());
        let (again, trailers) = read(second).await;
        assert_eq!(again, b"hello world");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_copy_made_mid_stream_replays_then_continues() {
        let mut first = ReplayBody::new(body(&[b"a", b"b", b"c"], false));
        let f = std::future::poll_fn(|cx| first.poll_frame(cx)).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        let second = first.replay().unwrap();
        assert_eq!(read(second).await.0, b"abc");
    }

    #[tokio::test]
    async fn bodies_past_the_cap_are_not_replayable() {
        static BIG: [u8; MAX_REPLAY_BYTES] = [7; MAX_REPLAY_BYTES];
        let first = ReplayBody::new(body(&[&BIG, b"x"], false));
        let behind = first.replay().unwrap();
        assert_eq!(
            read(first.replay().unwrap()).await.0.len(),
            MAX_REPLAY_BYTES + 1
        );
        assert!(first.replay().is_none());
        // A copy that fell behind the cap errors instead of sending a truncated body.
        assert!(Copy(behind).collect().await.is_err());
    }
}
