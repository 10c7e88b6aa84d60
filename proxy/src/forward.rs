//! Forwarding one client connection: pick a backend, connect (trying the next one on
//! failure, or when the backend fails before a byte either way), then copy bytes both ways
//! until both sides are done. A reset on either side is passed on as a reset (`SO_LINGER`
//! 0) to the other.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::activity::{watch, Activity, Expired};
use crate::backends::{Backend, Backends};
use crate::client_addr::ClientAddr;
use crate::connect::{self, Connecting};
pub use crate::copy::BackendEof;

/// Knobs for forwarding, fixed at start-up.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// How long a connect to a worker may take before the next worker is tried. Loopback
    /// connects take microseconds; a long wait means the worker's accept queue is full or the
    /// worker is stopped.
    pub connect_timeout: Duration,
    /// Close the connection after this long with no bytes in either direction (`None`:
    /// never). Frees the fds and buffers of clients that connect and say nothing.
    pub idle_timeout: Option<Duration>,
    /// Close the connection when the backend has sent nothing for this long after the
    /// client's last bytes (`None`: never), and count it against the backend: it accepted
    /// and read, but does not answer (HAProxy's `timeout server`).
    pub response_timeout: Option<Duration>,
    /// Start every backend connection with a PROXY protocol header carrying the client's
    /// address (`--send-proxy`), for backends that must know who the client is.
    pub send_proxy: Option<crate::proxy_header::Version>,
    /// What a backend's EOF means: the end of the connection (the default, as nginx's
    /// `proxy_half_close off`), or a half-close to pass on (`--half-close`).
    pub on_backend_eof: BackendEof,
    /// How long a client of a TLS listener in tcp mode may take to finish its handshake
    /// (`--tls-handshake-timeout`, default [`crate::tls::HANDSHAKE_TIMEOUT`]).
    pub tls_handshake_timeout: Duration,
    /// Set by an in-place upgrade: idle connections end (see [`crate::quiesce`]).
    pub quiesce: std::sync::Arc<crate::quiesce::Quiesce>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            response_timeout: None,
            send_proxy: None,
            on_backend_eof: BackendEof::default(),
            tls_handshake_timeout: crate::tls::HANDSHAKE_TIMEOUT,
            quiesce: std::sync::Arc::default(),
        }
    }
}

/// Why a client connection was not (fully) forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No backend was in rotation when the client arrived.
    #[error("no backend in rotation")]
    NoBackend,
    /// Every backend offered refused or timed out.
    #[error("{tries} backend(s) failed to accept the connection")]
    AllFailed {
        /// How many backends were tried.
        tries: usize,
        /// The last connect error.
        #[source]
        last: io::Error,
    },
    /// The connection was established and then failed mid-stream (reset, broken pipe).
    #[error("copying between client and backend")]
    Copy(#[source] io::Error),
    /// The master itself had no descriptor (or socket buffer, or memory) left for the
    /// connection to a worker.
    #[error("out of file descriptors")]
    OutOfDescriptors(#[source] io::Error),
    /// No bytes moved in either direction for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// The backend sent nothing for the response timeout after the client sent bytes.
    #[error("no response from the backend within {0:?}")]
    NoResponse(Duration),
    /// The backend was retired (a remote address gone from DNS) and its grace ran out.
    #[error("backend retired")]
    Closed,
    /// Idle while the master upgraded in place (see [`crate::quiesce`]).
    #[error("idle at an in-place upgrade")]
    Quiesced,
}

/// Bytes moved by one forwarded connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Client → backend.
    pub to_backend: u64,
    /// Backend → client.
    pub to_client: u64,
}

/// What became of a forwarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Proxied until both sides closed.
    Copied(Transfer),
    /// Handed to a hand-off worker, which now owns it.
    HandedOff {
        /// The worker's slot.
        slot: usize,
    },
    /// The client closed before it sent a byte and before a backend was connected: there
    /// was nothing to deliver, so no backend was bothered (a connect-and-close flood costs
    /// the workers nothing).
    Abandoned,
}

/// Forwards `client` to a backend from `backends`: hands the socket over to a hand-off
/// worker, or connects to the worker and copies until both directions are closed (a
/// half-close from either side is passed on to the other, `shutdown(SHUT_WR)`).
pub async fn forward(
    mut client: TcpStream,
    from: &ClientAddr,
    backends: &Backends,
    config: &ForwardConfig,
) -> Result<Forwarded, ForwardError> {
    let mut tried: Vec<u64> = Vec::new();
    let mut last_error = None;
    // The client's first bytes, read (instead of peeked) before the first connect, so they
    // go out with it: one system call fewer for the peek, one for the connect's check
    // (connect.rs). `None` until read; a hand-off worker must get the socket unread. Kept
    // for the next backend if this one fails before a byte either way.
    let mut early: Option<Vec<u8>> = None;
    // Once more per backend that closed before a byte either way (see below).
    'backends: loop {
        let (_active, backend, mut upstream, sent) = loop {
            let Some(backend) = backends.pick_excluding(&tried) else {
                return Err(match last_error {
                    Some(last) => ForwardError::AllFailed {
                        tries: tried.len(),
                        last,
                    },
                    None => ForwardError::NoBackend,
                });
            };
            if let (Some(conns), None) = (&backend.handoff, &early) {
                if tried.is_empty() && peek(&client) == Peek::Closed {
                    return Ok(Forwarded::Abandoned);
                }
                // A full queue (the worker is not keeping up) or a closed one (it is going away)
                // sends the client to the next worker.
                match conns.try_send(client) {
                    Ok(()) => return Ok(Forwarded::HandedOff { slot: backend.slot }),
                    Err(
                        mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c),
                    ) => client = c,
                }
                last_error = Some(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "hand-off queue full or closed",
                ));
                tried.push(backend.key);
                continue;
            }
            if backend.handoff.is_some() {
                // The client's bytes were read for a worker that failed: a hand-off worker,
                // which would need them unread, is not an option any more.
                tried.push(backend.key);
                continue;
            }
            if early.is_none() {
                match read_early(&client) {
                    Some(bytes) => early = Some(bytes),
                    None => return Ok(Forwarded::Abandoned),
                }
            }
            let bytes = early.as_deref().unwrap_or_default();
            // Counted as open from the pick, not from the connect: least-conn must see it at
            // once, or concurrent picks all land on the same idle-looking worker.
            let active = backend.open();
            // The PROXY header goes before the client's bytes, so they wait for it.
            let first: &[u8] = if config.send_proxy.is_some() {
                &[]
            } else {
                bytes
            };
            // A loopback connect is done within the call: no timer, no wait (connect.rs).
            let connected = match connect::start(backend.addr, first) {
                Ok(Connecting::Done { stream, sent }) => Ok(Ok((stream, sent))),
                Err(e) => Ok(Err(e)),
                Ok(Connecting::Pending(stream)) => {
                    let wait =
                        tokio::time::timeout(config.connect_timeout, connect::finish(stream));
                    if bytes.is_empty() {
                        tokio::select! {
                            c = wait => c.map(|r| r.map(|s| (s, 0))),
                            () = closed_without_data(&client) => return Ok(Forwarded::Abandoned),
                        }
                    } else {
                        // Bytes in hand are the backend's whatever the client does now.
                        wait.await.map(|r| r.map(|s| (s, 0)))
                    }
                }
            };
            match connected {
                Ok(Ok((stream, sent))) => {
                    backend.record_connect(true);
                    break (active, backend, stream, sent);
                }
                Ok(Err(e)) if crate::is_out_of_resources(&e) => {
                    // The master is out of descriptors, not the worker out of service: do not
                    // count it against the worker. The client is closed at once: waiting would
                    // hold its descriptor while every other accepted client waits for one too.
                    return Err(ForwardError::OutOfDescriptors(e));
                }
                Ok(Err(e)) => {
                    backend.record_connect(false);
                    last_error = Some(e);
                }
                // A connect that times out found the worker's accept queue full (loopback drops
                // the SYN), or the worker stopped: load, or a stall the active checks see. It is
                // not counted as a passive failure: counting it took every worker of an
                // overloaded set out of rotation at once. A refusal (nobody listens) still counts.
                Err(_) => last_error = Some(io::ErrorKind::TimedOut.into()),
            }
            tracing::debug!(slot = backend.slot, addr = %backend.addr, error = ?last_error, "backend connect failed, trying next");
            tried.push(backend.key);
        };
        // The client socket inherited TCP_NODELAY from the listener (set once there), the
        // backend's was set before its connect.
        let bytes = early.as_deref().unwrap_or_default();
        // The first bytes the backend reads: the PROXY header, then what is left of the
        // client's early bytes; the socket is new, so they fit its buffer.
        let mut head = match config
            .send_proxy
            .map(|v| crate::proxy_header::header(v, from))
        {
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                abort(&client);
                return Err(ForwardError::Copy(e));
            }
            None => Vec::new(),
        };
        head.extend_from_slice(&bytes[sent..]);
        if !head.is_empty() {
            if let Err(e) = upstream.write_all(&head).await {
                abort(&client);
                return Err(ForwardError::Copy(e));
            }
        }
        drop(head);
        let activity = Activity::default();
        if !bytes.is_empty() {
            // The backend owes an answer (the response timeout runs), but nothing was read
            // by the copy yet: the bytes are kept, so a swap stays possible.
            activity.sent_early();
        }
        let quiesce = &*config.quiesce;
        let copy = crate::copy::bidirectional(
            &client,
            &upstream,
            &activity,
            config.on_backend_eof,
            Some(quiesce),
        );
        let busy = || {
            tracing::debug!(peer = %from, slot = backend.slot, addr = %backend.addr, owes = activity.owes(), answered = activity.answered(), "connection still busy while quiescing");
        };
        let outcome = tokio::select! {
            copied = copy => match copied {
                // The backend failed before a byte either way: nothing was delivered and the
                // client's bytes (if any) are unread, so another backend can have it. That is
                // a worker killed between the connect and a slow client's first write (its
                // listen queue reset as it died); the client never sees it.
                // (A client that reset or closed is gone, whatever bytes of it are in hand.)
                Err(e) if activity.untouched() && peek(&client) != Peek::Closed => {
                    backend.record_connect(false);
                    tracing::debug!(slot = backend.slot, addr = %backend.addr, error = %e, "backend failed before a byte either way, trying next");
                    last_error = Some(e);
                    tried.push(backend.key);
                    continue 'backends;
                }
                copied => copied.map_err(|e| {
                    // One side reset (or the stream broke): the other side must learn it as a
                    // reset too, not as a clean end that makes a truncated answer look whole.
                    abort(&client);
                    abort(&upstream);
                    ForwardError::Copy(e)
                }),
            },
            cut = cut_short(&activity, config, &backend) => Err(cut),
            () = quiesce.idle(&activity, || unsent(&client), busy) => {
                // A held request is dropped unread, so the close is a FIN after the last
                // answer (an RST could destroy what the client has not read yet): the client
                // sees its keep-alive connection closed and sends the request again.
                discard_unread(&client);
                Err(ForwardError::Quiesced)
            }
        };
        note_health(&backend, &activity, &outcome);
        let (to_backend, to_client) = outcome?;
        return Ok(Forwarded::Copied(Transfer {
            to_backend: to_backend + bytes.len() as u64,
            to_client,
        }));
    }
}

/// Resolves with the reason a connection must end although its copy goes on: the idle or
/// the response timeout of `config` ran out ([`watch`] over `activity`), or `backend` was
/// retired and its grace ran out. One function for the plain and the TLS path, so every
/// listener keeps `--idle-timeout` and `--response-timeout` alike.
pub(crate) async fn cut_short(
    activity: &Activity,
    config: &ForwardConfig,
    backend: &Backend,
) -> ForwardError {
    tokio::select! {
        expired = watch(activity, config.idle_timeout, config.response_timeout) => match expired {
            Expired::Idle(t) => ForwardError::Idle(t),
            Expired::Response(t) => ForwardError::NoResponse(t),
        },
        () = backend.closed() => ForwardError::Closed,
    }
}

/// Passive health from how a connection to `backend` ended: a response timeout counts
/// against it, and an answer proves life however the connection ended (a client that left
/// before reading it included). A retired backend's cut says nothing either way.
pub(crate) fn note_health<T>(
    backend: &Backend,
    activity: &Activity,
    outcome: &Result<T, ForwardError>,
) {
    match outcome {
        Err(ForwardError::Closed) => {}
        Err(ForwardError::NoResponse(_)) => backend.record_response(false),
        _ if activity.answered() => backend.record_response(true),
        _ => {}
    }
}

/// What a client has sent so far, seen without reading it.
#[derive(Debug, PartialEq, Eq)]
enum Peek {
    /// Nothing yet.
    Nothing,
    /// Bytes wait to be read.
    Data,
    /// It closed (FIN or RST) without sending anything.
    Closed,
}

/// At most this much of the client's first bytes is read before the connect: a request
/// head. They are kept for the connection's life (in case its backend must be swapped),
/// so a small bound; the rest is left for the copy loop.
const EARLY_MAX: usize = 2048;

/// What the client has sent so far, read without waiting (at most [`EARLY_MAX`]): its
/// bytes (empty: nothing yet), or `None` if it closed or failed before sending any. Read
/// straight from the socket, not through tokio's readiness: the socket was registered a
/// moment ago and tokio has not polled it yet. The `EPOLLIN` that registration queued is
/// re-checked by `epoll_wait` when it is collected, so no empty read follows. The epoll
/// engine reads its accepted sockets with it too (`engine::conn`).
pub(crate) fn read_early(client: &impl AsRawFd) -> Option<Vec<u8>> {
    let mut buf = [MaybeUninit::<u8>::uninit(); EARLY_MAX];
    // SAFETY: the fd is open for the duration of the call; `buf` is valid for writes of
    // `buf.len()` bytes (recv(2) does not need them initialised).
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => None,
        n if n > 0 => {
            // SAFETY: recv(2) initialised the first `n` bytes of `buf`.
            let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            Some(data.to_vec())
        }
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Some(Vec::new()),
            _ => None,
        },
    }
}

/// One `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: whether the client already left.
fn peek(client: &TcpStream) -> Peek {
    let mut byte = 0u8;
    // SAFETY: the fd is open for the duration of the call; `byte` is valid for one byte.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Peek::Closed,
        n if n > 0 => Peek::Data,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Peek::Nothing,
            _ => Peek::Closed,
        },
    }
}

/// Whether the kernel still holds bytes sent to `sock` that its peer has not acknowledged
/// (`SIOCOUTQ`): an answer not yet delivered. An error counts as such (not idle).
fn unsent(sock: &TcpStream) -> bool {
    unsent_fd(sock.as_raw_fd())
}

/// [`unsent`] by descriptor: for the TLS path, whose copy borrows the socket mutably while
/// the quiesce look asks. The caller keeps the socket open while this may be called.
pub(crate) fn unsent_fd(fd: std::os::fd::RawFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: the caller keeps `fd` open for the duration of the call; SIOCOUTQ (TIOCOUTQ)
    // writes one `int` to the pointer it is given.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    r != 0 || queued > 0
}

/// At most this much of a held request is read and dropped before a quiesced close.
const DISCARD_MAX: usize = 64 * 1024;

/// Reads and drops what the client has sent and nobody read (at most [`DISCARD_MAX`],
/// without waiting).
pub(crate) fn discard_unread(client: &TcpStream) {
    let mut buf = [0u8; 4096];
    let mut dropped = 0;
    while dropped < DISCARD_MAX {
        // SAFETY: the fd is open for the duration of the call; `buf` is valid for writes of
        // `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                client.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return;
        }
        dropped += n as usize;
    }
}

/// Resolves if the client closes without sending a byte; pends forever once it has sent
/// some (those bytes are the backend's, whatever happens next).
async fn closed_without_data(client: &TcpStream) {
    loop {
        if client.readable().await.is_err() {
            return;
        }
        match peek(client) {
            Peek::Closed => return,
            Peek::Data => return std::future::pending().await,
            Peek::Nothing => {
                // Readiness was stale: clear it and wait again.
                let _ = client.try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// Makes the coming close of `stream` send RST instead of FIN (`SO_LINGER` on, 0 s), and
/// drop anything still unsent: the way a peer's abort is passed on.
pub(crate) fn abort(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the duration of the call; `linger` is a valid `struct
    // linger` and its size is passed with it.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::Policy;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that echoes everything, then half-closes when the client does.
    async fn echo_backend() -> SocketAddrAndTask {
        let (addr, task, _accepted) = echo_backend_telling_accepts().await;
        (addr, task)
    }

    /// [`echo_backend`], which also sends on the returned channel each time it has accepted
    /// a connection: a test can wait for the proxy to have reached it.
    async fn echo_backend_telling_accepts() -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, accepts) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                // Nobody may be listening (plain `echo_backend`).
                let _ = accepted.send(());
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        (addr, task, accepts)
    }
    type SocketAddrAndTask = (std::net::SocketAddr, tokio::task::JoinHandle<()>);

    async fn closed_port() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// Runs `forward` for one client and returns the client's end.
    async fn proxied(
        backends: std::sync::Arc<Backends>,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<Result<Forwarded, ForwardError>>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (c, peer) = front.accept().await.unwrap();
            let from = ClientAddr::direct(peer, c.local_addr().unwrap());
            forward(c, &from, &backends, &ForwardConfig::default()).await
        });
        (TcpStream::connect(addr).await.unwrap(), task)
    }

    #[tokio::test]
    async fn half_close_is_passed_on_and_bytes_counted() {
        let (addr, _echo) = echo_backend().await;
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        backends.insert(1, 0, addr);
        let (mut client, task) = proxied(backends).await;
        client.write_all(b"hello").await.unwrap();
        // Half-close: the backend sees EOF, finishes echoing, then closes its side.
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        let Forwarded::Copied(t) = task.await.unwrap().unwrap() else {
            panic!("not copied")
        };
        assert_eq!((t.to_backend, t.to_client), (5, 5));
    }

    #[tokio::test]
    async fn refused_backend_is_skipped() {
        let (good, _echo) = echo_backend().await;
        let bad = closed_port().await;
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        backends.insert(1, 0, bad);
        backends.insert(2, 1, good);
        for _ in 0..4 {
            let (mut client, task) = proxied(std::sync::Arc::clone(&backends)).await;
            client.write_all(b"x").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"x");
            assert!(task.await.unwrap().is_ok());
        }
        let bad_backend = backends
            .snapshot()
            .iter()
            .find(|b| b.key == 1)
            .cloned()
            .unwrap();
        assert!(bad_backend.connect_failures() >= 2);
    }

    #[tokio::test]
    async fn a_backend_that_resets_before_a_byte_is_skipped_for_a_slow_client() {
        let (good, _echo, mut good_accepted) = echo_backend_telling_accepts().await;
        // Accepts and resets at once: a worker killed with the connection in its queue.
        let resetter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bad = resetter.local_addr().unwrap();
        let resets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&resets);
        let _resets = tokio::spawn(async move {
            while let Ok((s, _)) = resetter.accept().await {
                abort(&s);
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        backends.insert(1, 0, bad);
        backends.insert(2, 1, good);
        for _ in 0..4 {
            let (mut client, task) = proxied(std::sync::Arc::clone(&backends)).await;
            // The client writes only once the proxy has reached the good backend: the reset
            // (if this client was sent to the resetter first) came and was acted on. Not a
            // sleep: under load a reset can take longer than any fixed wait to be seen.
            tokio::time::timeout(Duration::from_secs(10), good_accepted.recv())
                .await
                .expect("the proxy never reached the good backend")
                .expect("the good backend stopped");
            client.write_all(b"x").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"x");
            assert!(task.await.unwrap().is_ok());
        }
        // The skip was exercised: at least one client met the resetter first.
        assert!(resets.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        let bad_backend = backends
            .snapshot()
            .iter()
            .find(|b| b.key == 1)
            .cloned()
            .unwrap();
        assert!(bad_backend.connect_failures() >= 1);
    }

    #[tokio::test]
    async fn handoff_backends_get_the_socket_and_full_queues_are_skipped() {
        let (good, _echo) = echo_backend().await;
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        let (tx, mut rx) = mpsc::channel(1);
        backends.insert_handoff(1, 0, good, tx.clone());
        backends.insert(2, 1, good);
        // Fill the hand-off queue: the next client for slot 0 must go to slot 1 instead.
        let (_first, t1) = proxied(std::sync::Arc::clone(&backends)).await;
        assert!(matches!(
            t1.await.unwrap(),
            Ok(Forwarded::HandedOff { slot: 0 })
        ));
        let mut slots = Vec::new();
        for _ in 0..2 {
            let (mut client, task) = proxied(std::sync::Arc::clone(&backends)).await;
            client.write_all(b"x").await.unwrap();
            client.shutdown().await.unwrap();
            slots.push(match task.await.unwrap() {
                Ok(Forwarded::Copied(_)) => 1,
                Ok(Forwarded::HandedOff { slot }) => slot,
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(slots, vec![1, 1]);
        assert!(rx.recv().await.is_some());
    }

    #[tokio::test]
    async fn a_client_that_left_without_a_byte_costs_no_backend_connect() {
        let (addr, _echo) = echo_backend().await;
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        let backend = backends.insert(1, 0, addr);
        let (client, task) = proxied(std::sync::Arc::clone(&backends)).await;
        drop(client);
        assert!(matches!(task.await.unwrap(), Ok(Forwarded::Abandoned)));
        assert_eq!(backend.connect_failures(), 0);
        assert_eq!(backend.active(), 0);
    }

    #[tokio::test]
    async fn a_closed_backend_ends_its_connections() {
        let (addr, _echo) = echo_backend().await;
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        let remote = std::sync::Arc::new(crate::Backend::remote(1, 0, "app:1".into(), addr));
        backends.put(std::sync::Arc::clone(&remote));
        let (mut client, task) = proxied(backends).await;
        client.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(remote.active(), 1);
        remote.close_connections();
        assert!(matches!(task.await.unwrap(), Err(ForwardError::Closed)));
        assert_eq!(remote.active(), 0);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn no_backend_and_all_refused_are_errors() {
        let backends = std::sync::Arc::new(Backends::new(Policy::RoundRobin));
        let (_client, task) = proxied(std::sync::Arc::clone(&backends)).await;
        assert!(matches!(task.await.unwrap(), Err(ForwardError::NoBackend)));
        backends.insert(1, 0, closed_port().await);
        let (_client, task) = proxied(backends).await;
        assert!(matches!(
            task.await.unwrap(),
            Err(ForwardError::AllFailed { tries: 1, .. })
        ));
    }
}
