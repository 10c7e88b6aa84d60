//! Slow and idle clients: one watchdog per client connection, no timer per read.
//!
//! A connection is *idle* (waiting for a request), reading a *head* (the first byte of a
//! request arrived), or *busy* (requests in flight). [`Watched`] marks idle → head on
//! the first byte read; the request handler marks busy and, when the response is done,
//! idle again. [`expired`] sleeps until the one deadline that applies (`--idle-timeout`
//! from idle, `--header-timeout` from the first byte of a head, none while busy) and is
//! woken only by those transitions.
//!
//! The clock also remembers whether the client has sent anything at all ([`spoken`]): a
//! server that stops does not shut down a connection that has not yet sent its first
//! request at once (see `server::FIRST_REQUEST_WAIT`).
//!
//! hyper's own `header_read_timeout` is not used: it starts counting as soon as hyper
//! waits for the next request, so on a keep-alive connection it doubles as the idle
//! timeout (an idle client would be cut at 10 s and sent a 408 it never asked for), and
//! it closes without answering. When the head deadline passes here, the server takes the
//! socket back from hyper ([`Rescue`]) and writes the 408 itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

const IDLE: u8 = 0;
const HEAD: u8 = 1;

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No request for `--idle-timeout`.
    Idle,
    /// A request head started and did not finish within `--header-timeout`.
    Head,
}

/// The phase of one client connection, shared by its reader, its requests and its
/// watchdog.
#[derive(Debug)]
pub(crate) struct Clock {
    epoch: Instant,
    /// `IDLE` or `HEAD` (meaningful while `busy` is 0).
    phase: AtomicU8,
    /// When `phase` was entered, in milliseconds since `epoch`.
    since_ms: AtomicU64,
    /// Requests whose response is not finished yet.
    busy: AtomicUsize,
    /// Track heads (HTTP/1); an HTTP/2 connection only has idle and busy.
    heads: bool,
    notify: Notify,
    /// The client has sent at least one byte on this connection.
    spoke: AtomicBool,
    /// Woken (one permit) when `spoke` is first set; only [`spoken`] waits on it.
    first_byte: Notify,
}

impl Clock {
    /// A clock for a new connection (idle from now).
    pub(crate) fn new(heads: bool) -> Self {
        Self {
            epoch: Instant::now(),
            phase: AtomicU8::new(IDLE),
            since_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            heads,
            notify: Notify::new(),
            spoke: AtomicBool::new(false),
            first_byte: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived from the client.
    fn on_read(&self) {
        if !self.spoke.load(Ordering::Relaxed) {
            self.spoke.store(true, Ordering::Relaxed);
            self.first_byte.notify_one();
        }
        if self.heads
            && self.busy.load(Ordering::Relaxed) == 0
            && self.phase.load(Ordering::Relaxed) == IDLE
        {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.phase.store(HEAD, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }

    /// A request head was read and handed to the proxy.
    pub(crate) fn request_started(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A response is finished (or abandoned).
    pub(crate) fn request_done(&self) {
        if self.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
            self.phase.store(IDLE, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }
}

/// Resolves once the client has sent a byte on this connection (at once if it already has).
/// One waiter at a time (the connection's task).
pub(crate) async fn spoken(clock: &Clock) {
    // `notify_one` keeps a permit when nobody waits yet, so a first byte between the load
    // and the await is not missed.
    while !clock.spoke.load(Ordering::Relaxed) {
        clock.first_byte.notified().await;
    }
}

/// Resolves when the connection has been idle for `idle`, or has been reading one
/// request head for `header`.
pub(crate) async fn expired(clock: &Clock, header: Duration, idle: Option<Duration>) -> Expired {
    loop {
        let notified = clock.notify.notified();
        let busy = clock.busy.load(Ordering::Relaxed) > 0;
        let phase = clock.phase.load(Ordering::Relaxed);
        let since = clock.since_ms.load(Ordering::Relaxed);
        let limit = match (busy, phase) {
            (true, _) => None,
            (false, HEAD) => Some(header),
            (false, _) => idle,
        };
        let Some(limit) = limit else {
            notified.await;
            continue;
        };
        let deadline = clock.epoch + Duration::from_millis(since) + limit;
        tokio::select! {
            () = notified => continue,
            () = tokio::time::sleep_until(deadline) => {}
        }
        let unchanged = clock.busy.load(Ordering::Relaxed) == 0
            && clock.phase.load(Ordering::Relaxed) == phase
            && clock.since_ms.load(Ordering::Relaxed) == since;
        if unchanged {
            return if phase == HEAD {
                Expired::Head
            } else {
                Expired::Idle
            };
        }
    }
}

/// Where a [`Watched`] stream goes when hyper drops it, so the server can still write a
/// 408 on it.
pub(crate) type Rescue<S> = Arc<Mutex<Option<S>>>;

/// A client stream that tells its [`Clock`] when bytes arrive and hands itself to its
/// [`Rescue`] slot when dropped.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: Option<S>,
    clock: Arc<Clock>,
    rescue: Rescue<S>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, clock: Arc<Clock>) -> (Self, Rescue<S>) {
        let rescue = Arc::new(Mutex::new(None));
        (
            Self {
                inner: Some(inner),
                clock,
                rescue: Arc::clone(&rescue),
            },
            rescue,
        )
    }

    fn inner(&mut self) -> io::Result<&mut S> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<S> Drop for Watched<S> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            *self.rescue.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(this.inner()?).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_then_head_then_busy() {
        let clock = Clock::new(true);
        let header = Duration::from_secs(10);
        let idle = Some(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(expired(&clock, header, idle).await, Expired::Idle);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));

        // A byte arrives at +5 s: the head deadline is 10 s from then, not the idle one.
        let clock = Clock::new(true);
        let t0 = Instant::now();
        let w = expired(&clock, header, idle);
        let first_byte = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            clock.on_read();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            e = w => assert_eq!(e, Expired::Head),
            () = first_byte => unreachable!(),
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(15));

        // Busy connections never expire; idle again after the response.
        let clock = Clock::new(true);
        clock.on_read();
        clock.request_started();
        let t0 = Instant::now();
        let w = expired(&clock, header, idle);
        let response = async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            clock.request_done();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            e = w => assert_eq!(e, Expired::Idle),
            () = response => unreachable!(),
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(360));
    }
}
