//! The admin endpoint (`--admin ADDR`, TCP or a Unix socket): accepting, who may change
//! things, and the limits that keep a slow, idle or abusive admin client from costing the
//! data path anything. [`routes`] answers requests.
//!
//! Reads (`/status`, `/metrics`, `/healthz`) are open to whoever can connect. Changes
//! (`POST /reload`, `POST /scale`) over a Unix socket are allowed to whoever can connect
//! (the socket is mode 0600: the master's user, and root); over TCP they need the
//! `--admin-token` as `Authorization: Bearer`, compared in constant time, and are refused
//! when the master has no token.
//!
//! Limits, all fixed (an operator endpoint needs no tuning, only bounds):
//! - at most [`MAX_CONNS`] connections at once; one more is answered `503` and closed at
//!   once, so the backlog never fills with clients nobody will serve, and the master's fds
//!   stay with the data path (the reserve in `main` counts these);
//! - a request's headers must arrive within [`HEADER_TIMEOUT`] of the connection opening (or
//!   of the previous response, on keep-alive): a slowloris client is cut;
//! - a connection that moves no byte either way for [`IDLE_TIMEOUT`] is closed, so a client
//!   that never reads its response does not hold a slot;
//! - request bodies are not read: a request that carries one is refused (`413`), which
//!   leaves no body for a slow client to trickle.

mod listen;
mod routes;

pub use crate::endpoint::{AdminAddr, Token};
use listen::Accepted;
pub use listen::Listener;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use proxy::{Connections, Proxy};

use crate::config::Config;
use crate::status::Registry;

/// Admin connections served at once. An operator, a health probe and a Prometheus scraper
/// need a handful; 32 leaves room for several of each while costing the data path at most
/// 32 fds, which `main` keeps out of the connection cap.
pub const MAX_CONNS: usize = 32;
/// How long a client has to send a request's headers: a human typing into `nc` is not the
/// client this serves, and 10 s is ages for a probe on a private network.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit with no byte read or written (a response nobody reads).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// What a client over [`MAX_CONNS`] gets before its connection is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 27\r\n\r\ntoo many admin connections\n";

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct View {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The real client address.
    pub listen: std::net::SocketAddr,
    /// The data path's counters and backend set.
    pub proxy: Arc<Proxy>,
    /// Open client connections.
    pub conns: Connections,
    /// Worker states.
    pub registry: Arc<Registry>,
    /// Asks the supervisor for a rolling reload (a full queue: one is already pending).
    pub reload: mpsc::Sender<()>,
    /// Asks the supervisor to change the worker count.
    pub scale: mpsc::Sender<crate::control::ScaleRequest>,
    /// Asks the master to upgrade in place (answered once refused or under way).
    pub upgrade: mpsc::Sender<crate::upgrade::Request>,
    /// What changes over TCP need.
    pub token: Option<Token>,
    /// Remote backends and upstream names (#11).
    pub upstreams: Arc<crate::upstream::Table>,
    /// The HTTP path's request counters (`--protocol http`), for /metrics.
    pub http: Option<Arc<proxy::http::Http>>,
    /// The supervisor's shared state (the desired worker count).
    pub ctx: Arc<crate::instance::Context>,
}

/// How a request reached the endpoint, which decides what it may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Over TCP: changes need the token.
    Tcp,
    /// Over the 0600 Unix socket: whoever connects is the master's user or root.
    Unix,
}

/// Serves the admin endpoint on `listener` until `stop` is cancelled; the listener (and a
/// Unix socket's file) is dropped when it returns.
pub async fn serve(listener: Listener, view: View, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(max = MAX_CONNS, "admin connection refused: too many open");
            // Best effort and never waiting: the answer fits any socket's send buffer.
            match accepted {
                Accepted::Tcp(mut s) => {
                    let _ = s.try_write(BUSY);
                    let _ = s.shutdown().await;
                }
                Accepted::Unix(mut s) => {
                    let _ = s.try_write(BUSY);
                    let _ = s.shutdown().await;
                }
            }
            continue;
        };
        let (view, stop) = (view.clone(), stop.clone());
        tokio::spawn(async move {
            match accepted {
                Accepted::Tcp(s) => serve_conn(s, Peer::Tcp, view, stop).await,
                Accepted::Unix(s) => serve_conn(s, Peer::Unix, view, stop).await,
            }
            drop(permit);
        });
    }
}

/// Serves one admin connection under [`HEADER_TIMEOUT`] and [`IDLE_TIMEOUT`].
async fn serve_conn<S>(stream: S, peer: Peer, view: View, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = Watched::new(stream);
    let activity = Arc::clone(&stream.last);
    let service = hyper::service::service_fn(move |req| {
        let view = view.clone();
        async move { Ok::<_, std::convert::Infallible>(routes::answer(&view, peer, &req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        done = conn => if let Err(e) = done {
            tracing::debug!(error = %e, "admin connection failed");
        },
        () = idle(activity) => tracing::debug!(timeout = ?IDLE_TIMEOUT, "admin connection idle; closed"),
        () = stop.cancelled() => {}
    }
}

/// Resolves once [`IDLE_TIMEOUT`] has passed since the last byte moved on the connection.
async fn idle(last: Arc<AtomicU64>) {
    let start = Instant::now();
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = start + since + IDLE_TIMEOUT;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that notes when a byte last moved, as milliseconds since it was wrapped (an
/// atomic, because the watchdog runs beside the connection, not inside it).
struct Watched<S> {
    inner: S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Watched<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_a_quiet_period() {
        let last = Arc::new(AtomicU64::new(0));
        let watch = tokio::spawn(idle(Arc::clone(&last)));
        tokio::time::sleep(Duration::from_secs(8)).await;
        // A byte moved at 8 s: the deadline moves to 18 s.
        last.store(8_000, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!watch.is_finished(), "closed 9 s after the last byte");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(watch.is_finished(), "still open 10.1 s after the last byte");
    }
}
