//! The accept loop: take connections from an already-bound listener, bound how many are open
//! at once, and hand each to [`forward`](crate::forward::forward) on its own task.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::Backends;
use crate::client_addr::ClientAddr;
use crate::forward::{forward, ForwardConfig, ForwardError, Forwarded};
use crate::proxy_header::{self, AcceptProxy};

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
    /// Connections closed by the response timeout (the backend did not answer).
    pub response_timeouts: AtomicU64,
    /// Connections handed over to hand-off workers.
    pub handed_off: AtomicU64,
    /// Clients that closed before sending anything, while no backend was connected yet.
    pub abandoned: AtomicU64,
    /// `accept()` errors.
    pub accept_errors: AtomicU64,
    /// Connections from an `--accept-proxy` source closed for a missing, stalled, truncated,
    /// oversized or invalid PROXY header.
    pub proxy_header_rejected: AtomicU64,
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
    pub(crate) permits: Arc<Semaphore>,
    /// Counters.
    pub stats: Stats,
    /// Sources whose connections must start with a PROXY header (`--accept-proxy`).
    pub accept_proxy: Option<Arc<AcceptProxy>>,
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
            accept_proxy: None,
        }
    }

    /// Requires a PROXY header on connections from `accept` (see [`AcceptProxy`]).
    pub fn with_accept_proxy(mut self, accept: Option<AcceptProxy>) -> Self {
        self.accept_proxy = accept.map(Arc::new);
        self
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
/// one per listener and thread), forwarding each connection on a task in `conns`. Returns
/// once it has stopped accepting (and dropped the listener); open connections go on until
/// they finish or `conns.abort` is cancelled. `listener` must be non-blocking.
///
/// A connection permit is taken only once a connection is waiting on *this* listener, so
/// loops that share a small `--max-conns` never sit on permits another listener's clients
/// need.
pub async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
    conns: Connections,
) {
    let on_conn = Arc::clone(&proxy);
    accept_loop(listener, &proxy, stop, &conns, move |client, from| {
        forward_and_record(Arc::clone(&on_conn), client, from)
    })
    .await;
}

/// The accept loop shared by the tcp and http paths: waits for a connection on `listener`,
/// takes a permit, accepts it (backing off on resource exhaustion) and runs `handle` for it
/// on a task in `conns`, holding the permit until it finishes or `conns.abort` ends it.
///
/// A connection from an `--accept-proxy` source first has its PROXY header read, on its own
/// task (the loop never waits on a client); `handle` gets the client address it names.
pub(crate) async fn accept_loop<H, F>(
    listener: std::net::TcpListener,
    proxy: &Arc<Proxy>,
    stop: CancellationToken,
    conns: &Connections,
    handle: H,
) where
    H: Fn(TcpStream, ClientAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    // SAFETY: `listener` is an open socket owned by the AsyncFd from here on, and
    // `as_raw_fd` of a `std::net::TcpListener` always returns that same fd.
    let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "registering the listener");
            return;
        }
    };
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let mut waiting = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            ready = listener.readable() => match ready {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!(error = %e, "waiting on the listener");
                    break;
                }
            },
        };
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = Arc::clone(&proxy.permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (client, peer) = match waiting.try_io(|l| accept(l.get_ref())) {
            // Nothing there after all (readiness was stale): wait again.
            Err(_would_block) => continue,
            Ok(Ok((fd, peer))) => match TcpStream::from_std(fd) {
                Ok(stream) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    (stream, peer)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registering an accepted connection");
                    continue;
                }
            },
            Ok(Err(e)) => {
                proxy.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if crate::is_out_of_resources(&e) {
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
        let abort = conns.abort.clone();
        let (handle, proxy) = (handle.clone(), Arc::clone(proxy));
        conns.tracker.spawn(async move {
            let _permit = permit;
            let task = async {
                let from = match &proxy.accept_proxy {
                    Some(accept) if accept.trusts(peer.ip()) => {
                        match proxy_header::read(&client, peer, local, accept.timeout).await {
                            Ok(from) => from,
                            Err(e) => {
                                proxy
                                    .stats
                                    .proxy_header_rejected
                                    .fetch_add(1, Ordering::Relaxed);
                                return tracing::debug!(%peer, error = %e, "connection closed");
                            }
                        }
                    }
                    _ => ClientAddr::direct(peer, local),
                };
                handle(client, from).await
            };
            tokio::select! {
                _ = abort.cancelled() => tracing::debug!(%peer, "connection aborted at shutdown"),
                () = task => {}
            }
        });
    }
}

impl Proxy {
    /// Serves a connection accepted elsewhere exactly as [`serve`] serves one it accepted:
    /// the same forwarding settings, a `--max-conns` permit (waited for), a task on
    /// `conns.tracker` (drained and aborted at stop) and the same counters. For the master's
    /// hand-off clients that their worker refused or never took. Spawns on the current
    /// runtime and returns at once.
    pub fn dispatch(self: &Arc<Self>, client: TcpStream, conns: &Connections) {
        let proxy = Arc::clone(self);
        let abort = conns.abort.clone();
        conns.tracker.spawn(async move {
            let peer = client
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            let permit = tokio::select! {
                _ = abort.cancelled() => return,
                permit = Arc::clone(&proxy.permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            tracing::debug!(%peer, "connection re-dispatched");
            let local = client
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            serve_one(
                proxy,
                client,
                ClientAddr::direct(peer, local),
                permit,
                abort,
            )
            .await;
        });
    }
}

/// One connection's task: forwarded until done, or closed when `abort` fires.
async fn serve_one(
    proxy: Arc<Proxy>,
    client: TcpStream,
    from: ClientAddr,
    permit: OwnedSemaphorePermit,
    abort: CancellationToken,
) {
    let _permit = permit;
    tokio::select! {
        _ = abort.cancelled() => tracing::debug!(peer = %from, "connection aborted at shutdown"),
        () = forward_and_record(proxy, client, from) => {}
    }
}

/// Forwards one tcp-path connection and counts how it ended.
async fn forward_and_record(proxy: Arc<Proxy>, client: TcpStream, from: ClientAddr) {
    let result = forward(client, &from, &proxy.backends, &proxy.forward).await;
    record(&proxy.stats, from, result);
}

/// One `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`: the new socket is ready for tokio without a
/// further system call, and its peer address comes from the same call.
fn accept(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` are valid for writes and describe each other; the listener's
    // fd is open for the duration of the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new socket that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    Ok((stream, sockaddr(&storage)))
}

/// The address in a `sockaddr_storage` filled by the kernel (IPv4 or IPv6).
fn sockaddr(storage: &libc::sockaddr_storage) -> SocketAddr {
    match i32::from(storage.ss_family) {
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a `sockaddr_in6` for an AF_INET6 peer.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }
        _ => {
            // SAFETY: the kernel wrote a `sockaddr_in` for an AF_INET peer (a TCP listener is
            // one or the other).
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }
    }
}

pub(crate) fn record(stats: &Stats, peer: ClientAddr, result: Result<Forwarded, ForwardError>) {
    let counter = match &result {
        Ok(Forwarded::Copied(_)) => &stats.completed,
        Ok(Forwarded::HandedOff { .. }) => &stats.handed_off,
        Ok(Forwarded::Abandoned) => &stats.abandoned,
        Err(ForwardError::NoBackend) => &stats.no_backend,
        Err(ForwardError::AllFailed { .. } | ForwardError::OutOfDescriptors(_)) => {
            &stats.connect_failed
        }
        Err(ForwardError::Copy(_) | ForwardError::Closed) => &stats.copy_failed,
        Err(ForwardError::Idle(_) | ForwardError::Quiesced) => &stats.idle_closed,
        Err(ForwardError::NoResponse(_)) => &stats.response_timeouts,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(Forwarded::Copied(t)) => {
            tracing::debug!(%peer, to_backend = t.to_backend, to_client = t.to_client, "connection done")
        }
        Ok(Forwarded::HandedOff { slot }) => tracing::debug!(%peer, slot, "connection handed off"),
        Ok(Forwarded::Abandoned) => tracing::debug!(%peer, "client left before a backend"),
        Err(
            e @ (ForwardError::Copy(_)
            | ForwardError::Idle(_)
            | ForwardError::NoResponse(_)
            | ForwardError::Quiesced
            | ForwardError::Closed),
        ) => {
            tracing::debug!(%peer, error = %e, "connection closed")
        }
        Err(e) => tracing::warn!(%peer, error = %e, "client closed without a backend"),
    }
}
