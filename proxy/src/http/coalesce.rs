//! Write coalescing for proxied connections. HTTP/2 flushes after every batch of frames it
//! encodes, and one request's steps (headers, body, trailers; the upstream's answer) reach the
//! connection in separate task polls, so each frame would leave in its own `writev` (and, under
//! TLS, its own record). [`Coalesce`] keeps written bytes and defers a flush by one turn of the
//! scheduler: what the other ready tasks write in that turn leaves in the same system call.
//! It does so only once it has seen the HTTP/2 preface go either way: HTTP/1.1 already writes
//! a message's head and body in one `writev`, and would only pay for the extra turn.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The start of the HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Bytes held before a write goes through without waiting for the flush.
const MAX_HELD: usize = 64 * 1024;
/// A buffer that grew past this is freed once drained, so idle connections stay small.
const KEEP_CAPACITY: usize = 16 * 1024;

/// An I/O stream whose writes are held until a flush, and whose flushes wait one scheduler turn.
#[derive(Debug)]
pub struct Coalesce<IO> {
    io: IO,
    /// None until the first bytes go either way; then whether they were the HTTP/2 preface.
    h2: Option<bool>,
    held: Vec<u8>,
    /// The flush in progress has already yielded its turn.
    deferred: bool,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            h2: None,
            held: Vec::new(),
            deferred: false,
        }
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
        if !this.held.is_empty() && !this.deferred {
            // Yield once: tasks already woken in this turn may add their frames first.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.deferred = false;
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
