//! The agent's side of a proxy connection: the socket, with a limit on how
//! long a write may make no progress. hyper stops polling an answer's body
//! while the client is not reading (the socket buffer is full), so a timer in
//! the body could never fire for a stuck client; this one sits where the
//! stall happens. When it fires the write fails, hyper drops the connection
//! and with it the answer, and the answer settles as cut — so a stuck client
//! cannot hold a reservation for longer than the limit.
//!
//! Must not: buffer, reorder or inspect bytes. Reads pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `inner`, whose writes fail with `TimedOut` after `limit` without progress.
pub struct WriteStallLimit<T> {
    inner: T,
    limit: Duration,
    /// Created on the first stall only: the fast path never touches a timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` counts the current stall (reset by any progress).
    armed: bool,
}

impl<T> WriteStallLimit<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// Passes a ready result through (disarming the timer), or turns a stall
    /// that has lasted `limit` into an error.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing for {}",
                humantime::format_duration(self.limit)
            ),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStallLimit<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStallLimit<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Upper bound for "eventually": generous, the machine is shared.
    const PATIENCE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_client_that_stops_reading_fails_the_write() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut io = WriteStallLimit::new(near, Duration::from_millis(100));
        let err = tokio::time::timeout(PATIENCE, io.write_all(&[7; 4096]))
            .await
            .expect("the stalled write fails eventually")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the client read nothing for 100ms");
    }

    #[tokio::test]
    async fn stalls_shorter_than_the_limit_add_up_to_nothing() {
        // Three stalls of 1s against a 3s limit: 3s in all, yet no single
        // stall comes near the limit, so the write must go through.
        let limit = Duration::from_secs(3);
        let (near, mut far) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut buf = [0; 1024];
                match far.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut io = WriteStallLimit::new(near, limit);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        io.write_all(&data).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), data);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = WriteStallLimit::new(near, Duration::from_secs(1));
        far.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0; 16];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n");
    }
}
