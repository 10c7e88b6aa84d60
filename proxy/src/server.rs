//! The accept loop: take connections from an already-bound listener, bound how many are open
//! at once, and hand each to [`forward`](crate::forward::forward) on its own task.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use crate::forward::{forward, ForwardConfig, ForwardError, Forwarded};

/// First pause after an accept error that means "out of resources" (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM). Retrying at once would spin the CPU while nothing can change.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept retries; short enough to recover soon after fds free up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Counters of the data path, read by status and metrics. Relaxed atomics: each is
/// independently exact, together they are a moment's approximation.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections forwarded to a backend and finished.
    pub completed: AtomicU64,
    /// Connections closed because no backend was in rotation.
    pub no_backend: AtomicU64,
    /// Connections closed because every backend tried failed to accept.
    pub connect_failed: AtomicU64,
    /// Connections that failed mid-stream (reset by either side).
    pub copy_failed: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections handed over to hand-off workers.
    pub handed_off: AtomicU64,
    /// `accept()` errors.
    pub accept_errors: AtomicU64,
}

/// The shared state of the data path.
#[derive(Debug)]
pub struct Proxy {
    /// Workers in rotation.
    pub backends: Arc<Backends>,
    /// How each connection is forwarded.
    pub forward: ForwardConfig,
    /// One permit per open client connection, shared by every accept loop. When none is
    /// left, the loops stop accepting and new connections wait in the kernel's listen
    /// backlog rather than being accepted and closed: a burst is delayed, not refused.
    permits: Arc<Semaphore>,
    /// Counters.
    pub stats: Stats,
}

impl Proxy {
    /// The data path's state: `backends` to forward to, `forward` settings, and at most
    /// `max_conns` client connections open at once.
    pub fn new(backends: Arc<Backends>, forward: ForwardConfig, max_conns: usize) -> Self {
        Self {
            backends,
            forward,
            permits: Arc::new(Semaphore::new(max_conns.clamp(1, Semaphore::MAX_PERMITS))),
            stats: Stats::default(),
        }
    }
}

/// Where connection tasks live, so a drain can wait for them and a hard stop can end them.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    /// Every connection task is spawned on this tracker.
    pub tracker: TaskTracker,
    /// Cancelled to close every open connection at once (end of the grace period).
    pub abort: CancellationToken,
}

/// Accepts on `listener` until `stop` is cancelled (several loops may share one [`Proxy`],
/// one per listener and thread), forwarding each connection on a task in
/// `conns`. Returns once it has stopped accepting (and dropped the listener); open connections
/// go on until they finish or `conns.abort` is cancelled.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
    conns: Connections,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = Arc::clone(&proxy.permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(ok) => {
                backoff = ACCEPT_BACKOFF_MIN;
                ok
            }
            Err(e) => {
                proxy.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if is_resource_exhaustion(&e) {
                    tracing::warn!(error = %e, pause = ?backoff, "accept failed, backing off");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
                continue;
            }
        };
        proxy.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let proxy = Arc::clone(&proxy);
        let abort = conns.abort.clone();
        conns.tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = abort.cancelled() => tracing::debug!(%peer, "connection aborted at shutdown"),
                result = forward(client, &proxy.backends, &proxy.forward) => record(&proxy.stats, peer, result),
            }
        });
    }
    drop(listener);
}

fn record(stats: &Stats, peer: std::net::SocketAddr, result: Result<Forwarded, ForwardError>) {
    let counter = match &result {
        Ok(Forwarded::Copied(_)) => &stats.completed,
        Ok(Forwarded::HandedOff { .. }) => &stats.handed_off,
        Err(ForwardError::NoBackend) => &stats.no_backend,
        Err(ForwardError::AllFailed { .. }) => &stats.connect_failed,
        Err(ForwardError::Copy(_)) => &stats.copy_failed,
        Err(ForwardError::Idle(_)) => &stats.idle_closed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(Forwarded::Copied(t)) => {
            tracing::debug!(%peer, to_backend = t.to_backend, to_client = t.to_client, "connection done")
        }
        Ok(Forwarded::HandedOff { slot }) => tracing::debug!(%peer, slot, "connection handed off"),
        Err(e @ (ForwardError::Copy(_) | ForwardError::Idle(_))) => {
            tracing::debug!(%peer, error = %e, "connection closed")
        }
        Err(e) => tracing::warn!(%peer, error = %e, "client closed without a backend"),
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The errno values this module cares about (Linux), without a libc dependency.
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}
