//! HTTP/2 client connections driven with the h2 crate directly: the proxy's connections to peer
//! sidecars and to an HTTP/2 app. hyper's HTTP/2 client hands each request to its connection
//! task over a channel, spawns a task per request to wait for the answer and another to send the
//! body, and answers through a oneshot; every spawn copies the request's future. Here the
//! request's own future opens the stream, sends the body while it waits for the answer's head,
//! and takes the answer: no channel, no oneshot, and a task only for a body that is still
//! streaming when the answer comes (a streaming upload).

use crate::balance::{Answered, GrpcPending};
use crate::http::coalesce::Coalesce;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Receive window per stream, bytes (hyper's client default, which this replaced).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Receive window of the connection, bytes.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Largest header block accepted from the peer, bytes.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes h2 buffers per stream before `send_data` must wait for capacity.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Pings on a connection that must notice a peer gone silent (peer sidecars).
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    /// Time between pings.
    pub interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub timeout: Duration,
}

/// One HTTP/2 connection's sending side; clones share the connection.
#[derive(Clone)]
pub struct H2Sender {
    tx: h2::client::SendRequest<Bytes>,
    /// Set when the task driving the connection ended.
    closed: Arc<AtomicBool>,
    /// The peer may leave streams it accepted unprocessed (a GOAWAY below them, sent without
    /// the two-step warning, or REFUSED_STREAM): a server that is not a mesh sidecar. Requests
    /// on such a connection keep a [`Resend`] copy; a mesh sidecar's graceful close gives them
    /// back unsent instead, so they need none.
    pub may_leave_unprocessed: bool,
}

impl std::fmt::Debug for H2Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Sender")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError<B> {
    /// The connection was closed or going away before it took the request: nothing of it was
    /// sent, and it is given back to go again elsewhere (boxed: rare, and it would make every
    /// request's result as large as a request).
    Unsent(Box<Request<B>>, h2::Error),
    /// The request went out, at least in part; the peer may have acted on it.
    Failed(h2::Error),
}

/// True when the peer provably did not process the stream: it refused it (REFUSED_STREAM), or
/// its GOAWAY's last stream id is below it (h2 fails only those streams with the GOAWAY's
/// error).
pub fn never_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

impl H2Sender {
    /// The HTTP/2 handshake over `io`; the connection is then driven by a task of its own,
    /// with its polls counted for `io`'s write coalescing, until the peer closes it, every
    /// sender is dropped, or a keep-alive ping goes unanswered.
    pub async fn handshake<IO>(
        io: Coalesce<IO>,
        keep_alive: Option<KeepAlive>,
        peer: std::net::SocketAddr,
    ) -> Result<Self, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start(io, keep_alive, None, peer).await
    }

    /// As [`H2Sender::handshake`], then proves the peer speaks HTTP/2 with a PING answered
    /// within `within`: h2's handshake only writes the preface, so a server that speaks only
    /// HTTP/1.1 would otherwise fail the first request after it was sent.
    pub async fn handshake_checked<IO>(
        io: Coalesce<IO>,
        within: Duration,
        peer: std::net::SocketAddr,
    ) -> Result<Self, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start(io, None, Some(within), peer).await
    }

    async fn start<IO>(
        io: Coalesce<IO>,
        keep_alive: Option<KeepAlive>,
        check: Option<Duration>,
        peer: std::net::SocketAddr,
    ) -> Result<Self, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let turns = io.turns();
        let (tx, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let mut ping_pong = conn.ping_pong();
        let pings = keep_alive.and_then(|k| ping_pong.take().map(|p| (k, p)));
        tokio::spawn(turns.drive(async move {
            let why = match pings {
                None => conn.await.err().map(|e| e.to_string()),
                Some((k, pings)) => {
                    tokio::select! {
                        r = &mut conn => r.err().map(|e| e.to_string()),
                        why = keep_alive_loop(k, pings) => Some(why),
                    }
                }
            };
            done.store(true, Ordering::Release);
            if let Some(why) = why {
                tracing::debug!(%peer, error = %why, "HTTP/2 connection closed");
            }
        }));
        if let (Some(within), Some(mut p)) = (check, ping_pong) {
            match tokio::time::timeout(within, p.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(e)) => return Err(e),
                // No answer in time: as if the peer never acknowledged our SETTINGS.
                Err(_) => return Err(h2::Error::from(h2::Reason::SETTINGS_TIMEOUT)),
            }
        }
        Ok(Self {
            tx,
            closed,
            may_leave_unprocessed: true,
        })
    }

    /// True once the connection is gone; a sender that says false may still find it going
    /// away, and then gives the request back unsent.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` and waits for the head of the answer. The request body is sent from this
    /// future while it waits; one still streaming when the answer comes is sent on by a task.
    pub async fn send<B>(self, req: Request<B>) -> Result<Response<H2Body>, SendError<B>>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<crate::http::BoxError>,
    {
        let mut tx = match self.tx.ready().await {
            Ok(tx) => tx,
            Err(e) => return Err(SendError::Unsent(Box::new(req), e)),
        };
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (answer, stream) = tx
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(SendError::Failed)?;
        let head = if eos {
            answer.await
        } else {
            let mut pipe = Some(Pipe {
                body,
                stream,
                held: None,
            });
            let mut answer = std::pin::pin!(answer);
            let head = std::future::poll_fn(|cx| {
                if let Some(p) = &mut pipe
                    && Pin::new(&mut *p).poll(cx).is_ready()
                {
                    pipe = None;
                }
                answer.as_mut().poll(cx)
            })
            .await;
            if let Some(p) = pipe
                && head.is_ok()
            {
                tokio::spawn(p);
            }
            head
        };
        let resp = head.map_err(SendError::Failed)?;
        let hint = content_length(resp.headers());
        Ok(resp.map(|recv| H2Body {
            recv,
            data_done: false,
            hint,
            answered: None,
            pending: None,
        }))
    }
}

/// Pings every `interval`; returns why the connection should close when one goes unanswered.
async fn keep_alive_loop(k: KeepAlive, mut pings: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(k.interval).await;
        match tokio::time::timeout(k.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => return format!("keep-alive ping unanswered for {:?}", k.timeout),
        }
    }
}

/// The size a `content-length` field announces, for the answer body's size hint.
fn content_length(h: &HeaderMap) -> SizeHint {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or_else(SizeHint::default, SizeHint::with_exact)
}

/// Copies a request body into its HTTP/2 stream, respecting the peer's flow control, and
/// resets the stream if the body fails (the caller went away mid-upload).
struct Pipe<B> {
    body: B,
    stream: h2::SendStream<Bytes>,
    /// A data frame read from the body and waiting for send capacity, with its end-of-stream.
    held: Option<(Bytes, bool)>,
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::http::BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.get_mut();
        match me.pump(cx) {
            Poll::Ready(Err(why)) => {
                tracing::debug!(error = %why, "request body not sent in full");
                me.stream.send_reset(h2::Reason::CANCEL);
                Poll::Ready(())
            }
            p => p.map(|_| ()),
        }
    }
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::http::BoxError>,
{
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), crate::http::BoxError>> {
        loop {
            if self.held.is_some() {
                // h2 takes a frame larger than the capacity and sends it as capacity comes;
                // capacity is awaited only so a fast body cannot outrun a slow peer.
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => return self.pending_unless_reset(cx),
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err("stream closed while sending".into()));
                        }
                    }
                }
                if let Some((data, eos)) = self.held.take() {
                    self.stream.send_data(data, eos)?;
                    if eos {
                        return Poll::Ready(Ok(()));
                    }
                }
                continue;
            }
            // The next frame is read before any capacity is claimed: a claim made ahead of a
            // body that sends nothing would pin the connection's window (hyper #4003).
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return self.pending_unless_reset(cx),
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() || eos {
                            // Nothing to hold back: the body's last frame is in memory already
                            // (a unary call's whole message), and h2 asks for the capacity a
                            // frame needs when it takes it.
                            self.stream.send_data(data, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            self.stream.reserve_capacity(1);
                            self.held = Some((data, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Pending, with a wake-up registered for a reset by the peer too: one while the body or
    /// capacity is awaited ends the pipe.
    fn pending_unless_reset(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), crate::http::BoxError>> {
        match self.stream.poll_reset(cx) {
            Poll::Ready(reason) => {
                Poll::Ready(Err(format!("stream reset by the peer: {reason:?}").into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// An answer's body read from its HTTP/2 stream; what is read is given back to the peer's
/// flow-control window at once. Dropped before its end, it resets the stream (CANCEL).
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    hint: SizeHint,
    /// The endpoint that answered, for telemetry. It rides with the body rather than in the
    /// response's extensions, whose first entry costs three allocations per request.
    answered: Option<Arc<Answered>>,
    /// A gRPC call's outcome for the balancer, told when its status arrives in the trailers.
    pending: Option<GrpcPending>,
}

impl H2Body {
    /// Tells `p` the gRPC status this answer ends with.
    pub fn set_pending(&mut self, p: GrpcPending) {
        self.pending = Some(p);
    }

    fn ended(&mut self, trailers: Option<&HeaderMap>) {
        if let Some(p) = self.pending.take() {
            let status = trailers
                .and_then(|t| t.get(crate::http::GRPC_STATUS))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            p.status(status);
        }
    }

    /// Records the endpoint that answered (the outbound endpoint service).
    pub fn set_answered(&mut self, a: Arc<Answered>) {
        self.answered = Some(a);
    }

    /// The endpoint that answered, if one was recorded.
    pub fn answered(&self) -> Option<&Answered> {
        self.answered.as_deref()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only when the stream is gone, which the next poll reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.ended(None);
                    return Poll::Ready(Some(Err(e)));
                }
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => {
                self.ended(Some(&t));
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Ok(None) => {
                self.ended(None);
                Poll::Ready(None)
            }
            Err(e) => {
                self.ended(None);
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests;
