//! Write coalescing for proxied connections. HTTP/2 flushes after every batch of frames it
//! encodes, and one request's steps (headers, body, trailers; the upstream's answer) reach the
//! connection in separate task polls, so each frame would leave in its own `writev` (and, under
//! TLS, its own record). [`Coalesce`] keeps written bytes and defers a flush by one turn of the
//! scheduler: what the other ready tasks write in that turn leaves in the same system call.
//! It does so only once it has seen the HTTP/2 preface go either way: HTTP/1.1 already writes
//! a message's head and body in one `writev`, and would only pay for the extra turn.
//!
//! h2 also flushes in the middle of a batch: a DATA frame of 1 KiB or more is kept aside
//! rather than copied, and h2 flushes before it buffers the next frame. Were each of those
//! flushes a yield, a batch of responses would leave two DATA frames per system call, their
//! trailers a turn later. So when the task driving the connection counts its polls in
//! [`Turns`] (`Turns::drive`), a flush in the same poll as the one that deferred returns at once
//! and the bytes stay held: h2 flushes at the end of every poll of its connection, and the first
//! flush in a later poll sends all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The start of the HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Bytes held before a write goes through without waiting for the flush.
const MAX_HELD: usize = 64 * 1024;
/// A buffer that grew past this is freed once drained, so idle connections stay small.
const KEEP_CAPACITY: usize = 16 * 1024;

/// The polls of the task that drives one connection, counted so that its [`Coalesce`] can tell
/// a flush in the poll that deferred (more frames may follow) from one in a later poll.
#[derive(Debug, Clone, Default)]
pub struct Turns(Arc<AtomicU32>);

impl Turns {
    fn now(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// `fut`, with each of its polls counted.
    pub fn drive<F: Future>(self, fut: F) -> Driven<F> {
        Driven { fut, turns: self }
    }
}

pin_project_lite::pin_project! {
    /// A future whose polls are counted in [`Turns`]. A struct rather than an async block,
    /// which would hold the future twice (argument and pinned local) and copy it on the first
    /// poll: hyper's spawned HTTP/2 futures are the size of its whole connection task.
    pub struct Driven<F> {
        #[pin]
        fut: F,
        turns: Turns,
    }
}

impl<F: Future> Future for Driven<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Starts at 1: 0 means "never counted" to `Coalesce`.
        this.turns.0.fetch_add(1, Ordering::Relaxed);
        this.fut.poll(cx)
    }
}

/// An I/O stream whose writes are held until a flush, and whose flushes wait one scheduler turn.
#[derive(Debug)]
pub struct Coalesce<IO> {
    io: IO,
    /// None until the first bytes go either way; then whether they were the HTTP/2 preface.
    h2: Option<bool>,
    held: Vec<u8>,
    /// The polls of the task driving this connection (see the module doc).
    turns: Turns,
    /// Set when the flush in progress has yielded its turn: the poll it did so in.
    deferred_at: Option<u32>,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            h2: None,
            held: Vec::new(),
            turns: Turns::default(),
            deferred_at: None,
        }
    }

    /// What the task driving this connection must count its polls in; unless it does, each
    /// flush yields one turn before it sends.
    pub fn turns(&self) -> Turns {
        self.turns.clone()
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes out everything held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut off = 0;
        let res = loop {
            if off == self.held.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.held[off..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => off += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.held.drain(..off);
        if self.held.is_empty() && self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        }
        res
    }

    /// Makes room for `len` more bytes; true when they should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len <= MAX_HELD {
            return Poll::Ready(Ok(false));
        }
        ready!(self.poll_drain(cx))?;
        Poll::Ready(Ok(len > MAX_HELD))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.h2.is_none() && buf.filled().len() > before {
            this.h2 = Some(buf.filled()[before..].starts_with(H2_PREFACE));
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.h2.is_none() && !data.is_empty() {
            this.h2 = Some(data.starts_with(H2_PREFACE));
        }
        if this.h2 != Some(true) {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        if ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.held.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.h2.is_none() {
            let first = bufs.iter().find(|b| !b.is_empty());
            this.h2 = first.map(|b| b.starts_with(H2_PREFACE));
        }
        if this.h2 != Some(true) {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.h2 == Some(true) || self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let turn = this.turns.now();
        if !this.held.is_empty() {
            match this.deferred_at {
                None => {
                    // Yield once: tasks already woken in this turn may add their frames first.
                    this.deferred_at = Some(turn);
                    cx.waker().wake_by_ref();
                    if turn == 0 {
                        return Poll::Pending;
                    }
                    // Counted: report the flush done and keep holding, so h2 buffers the rest
                    // of this poll's frames; its flush in the next poll (the wake) sends them.
                    return Poll::Ready(Ok(()));
                }
                Some(at) if turn != 0 && at == turn => return Poll::Ready(Ok(())),
                Some(_) => {}
            }
        }
        ready!(this.poll_drain(cx))?;
        this.deferred_at = None;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes are held until a flush, then arrive together and in order.
    #[tokio::test]
    async fn holds_writes_until_flush_then_sends_them_in_order() {
        let (a, mut b) = tokio::io::duplex(1024 * 1024);
        let mut w = Coalesce::new(a);
        w.write_all(H2_PREFACE).await.unwrap();
        w.write_all(b" two").await.unwrap();
        let mut probe = [0u8; 8];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut probe)).await;
        assert!(early.is_err(), "nothing is sent before the flush");
        w.flush().await.unwrap();
        let mut got = vec![0u8; H2_PREFACE.len() + 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [H2_PREFACE, b" two"].concat());
    }

    /// Records each write the connection makes, to count system calls.
    #[derive(Default, Clone)]
    struct Writes(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(d.to_vec());
            Poll::Ready(Ok(d.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// With the driving task's polls counted, flushes in one poll (h2 flushes before each
    /// large DATA frame) keep holding, and the first flush of the next poll sends everything
    /// in one write.
    #[tokio::test]
    async fn counted_flushes_hold_until_the_next_poll_then_send_once() {
        let writes = Writes::default();
        let mut w = Coalesce::new(writes.clone());
        let turns = w.turns();
        let mut poll = 0;
        let frames: [&[u8]; 3] = [H2_PREFACE, b" headers", b" data"];
        turns
            .drive(std::future::poll_fn(|cx| {
                poll += 1;
                let mut w = Pin::new(&mut w);
                if poll == 1 {
                    for f in frames {
                        assert!(matches!(w.as_mut().poll_write(cx, f), Poll::Ready(Ok(_))));
                        assert!(matches!(w.as_mut().poll_flush(cx), Poll::Ready(Ok(()))));
                    }
                    assert!(writes.0.lock().unwrap().is_empty(), "held within the poll");
                    // The wake the deferred flush made brings the second poll.
                    return Poll::Pending;
                }
                assert!(matches!(w.as_mut().poll_flush(cx), Poll::Ready(Ok(()))));
                Poll::Ready(())
            }))
            .await;
        assert_eq!(poll, 2);
        assert_eq!(*writes.0.lock().unwrap(), vec![frames.concat()]);
    }

    /// An HTTP/1.1 stream is passed through as written.
    #[tokio::test]
    async fn http1_writes_pass_through_at_once() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesce::new(a);
        w.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut got = vec![0u8; 17];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n");
    }

    /// More than the buffer holds goes through without a flush, whole.
    #[tokio::test]
    async fn large_writes_go_through_and_shutdown_drains() {
        let (a, mut b) = tokio::io::duplex(4 * MAX_HELD);
        let mut w = Coalesce::new(a);
        let mut big: Vec<u8> = (0..(2 * MAX_HELD)).map(|i| (i % 251) as u8).collect();
        big[..H2_PREFACE.len()].copy_from_slice(H2_PREFACE);
        w.write_all(&big[..20]).await.unwrap();
        w.write_all(&big[20..]).await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
    }
}
