//! Idle detection for a proxied connection without a timer per read: the stream marks a
//! flag on every transfer, and one watcher per connection wakes every half timeout to see
//! whether the flag was set since its last look.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that records that bytes moved, in either direction.
#[derive(Debug)]
pub struct Marked<'a, S> {
    inner: S,
    moved: &'a AtomicBool,
}

impl<'a, S> Marked<'a, S> {
    /// Wraps `inner`; every read or write of at least one byte sets `moved`.
    pub fn new(inner: S, moved: &'a AtomicBool) -> Self {
        Self { inner, moved }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Marked<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Marked<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.store(true, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once no bytes moved for `timeout` (detected between 1× and 1.5× `timeout`);
/// never resolves when `timeout` is `None`.
pub async fn idle(moved: &AtomicBool, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let half = timeout / 2;
    let mut quiet_looks = 0;
    loop {
        tokio::time::sleep(half).await;
        if moved.swap(false, Ordering::Relaxed) {
            quiet_looks = 0;
        } else {
            quiet_looks += 1;
            if quiet_looks >= 2 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_silence() {
        let moved = AtomicBool::new(false);
        let started = tokio::time::Instant::now();
        idle(&moved, Some(Duration::from_secs(10))).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let started = tokio::time::Instant::now();
        let activity = async {
            // Bytes move at 4 s and 9 s; then silence.
            tokio::time::sleep(Duration::from_secs(4)).await;
            moved.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(5)).await;
            moved.store(true, Ordering::Relaxed);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = idle(&moved, Some(Duration::from_secs(10))) => {}
            _ = activity => unreachable!(),
        }
        // Looks at 5, 10 (both saw activity), 15, 20 (quiet): closed at 20 s.
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }
}
