//! The built-in demo worker: a single-threaded hyper HTTP/1.1 server.
//!
//! It is single-threaded on purpose: it reproduces the problem balancer exists for, a server
//! whose one thread is blocked by a long computation (`GET /sum`), and lets the master show
//! that other workers keep answering meanwhile.
//!
//! Routes: `GET /` (who answered: pid and host name, so behind an edge balancer a user sees
//! which container and which worker answered), `GET /sum?n=N` (CPU-bound, runs in the request path),
//! `GET /healthz` (`ok`).
//!
//! It gets its connections the way `BALANCER_MODE` says ([`Mode`]): a loopback port of its
//! own (proxy), the master's listener received over the channel (shared), `BALANCER_LISTEN`
//! bound with `SO_REUSEPORT` (reuseport), or one connection at a time from the master
//! (handoff).
//!
//! Its drain (after `shutdown`) tells each connection to shut down gracefully, as hyper-util's
//! `GracefulShutdown` would, except for one that has sent nothing yet: hyper takes a
//! connection with nothing read for idle and closes it at once, and one accepted just before
//! the shutdown (from a shared or reuseport listener, during a rolling reload) is sending its
//! first request, which would be lost (the client reads EOF, zero bytes). Such a connection
//! is told only once hyper's own read has returned (its first bytes, or EOF), or after
//! [`FIRST_REQUEST_WAIT`] of silence. The socket's readiness is no proof: tokio's
//! `readable()` resolves with nothing to read often enough (`recv(MSG_PEEK)` then says
//! `EAGAIN`) to lose a request in most runs of ten rolling reloads under load; hence
//! [`Heard`], which watches the reads hyper makes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::{Channel, ChannelError, Event, StopReason};
use crate::protocol::{Mode, UnknownMode, ENV_LISTEN, ENV_MODE};

/// Default `n` for `/sum`: about half a second of one core on this project's machines, the
/// classic "long computation" that blocks a single-threaded server.
pub const DEFAULT_SUM_N: u64 = 800_000_000;
/// Largest `n` accepted by `/sum`, so one request cannot occupy a worker for hours.
pub const MAX_SUM_N: u64 = 20_000_000_000;
/// How long open connections may take to finish after a shutdown request. The master has its
/// own, longer deadline; this one only keeps a worker from hanging on a stuck client.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, once draining, a connection that has sent nothing yet may take to send its
/// first bytes before it is closed: a client sends right after its connect returns, so its
/// bytes follow by about a round trip (and a scheduling delay on a loaded machine).
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (EMFILE and friends), so the loop backs off instead of spinning
/// on an error that persists until some connection closes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Listen backlog for the reuseport socket: the same as tokio's own `TcpListener::bind`.
const BACKLOG: u32 = 1024;

/// Why the built-in worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// The IPC channel could not be opened or used.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// `BALANCER_MODE` names no mode.
    #[error("reading {ENV_MODE}")]
    Mode(#[source] UnknownMode),
    /// `BALANCER_LISTEN` is not `IP:PORT`, `[v6]:PORT` or `:PORT`.
    #[error("{ENV_LISTEN}={0:?} is not an address such as 0.0.0.0:8080, [::]:8080 or :8080")]
    BadListen(String),
    /// Reuseport mode without `BALANCER_LISTEN`.
    #[error("mode reuseport needs {ENV_LISTEN}")]
    MissingListen,
    /// Binding or inspecting a listener failed.
    #[error("binding {addr}")]
    Bind {
        /// The address being bound.
        addr: SocketAddr,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Reading the local address of the listener the master sent failed.
    #[error("reading the shared listener's address")]
    SharedAddr(#[source] std::io::Error),
    /// Building the tokio runtime failed.
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    /// Installing the SIGTERM handler failed.
    #[error("installing the SIGTERM handler")]
    Signal(#[source] std::io::Error),
}

/// What the built-in worker reads from its environment, validated in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How connections reach this worker (`BALANCER_MODE`).
    pub mode: Mode,
    /// The address every worker binds in [`Mode::ReusePort`] (`BALANCER_LISTEN`); `None` in
    /// the other modes.
    pub listen: Option<SocketAddr>,
}

impl Settings {
    /// Reads `BALANCER_MODE` and `BALANCER_LISTEN`.
    pub fn from_env() -> Result<Self, BuiltinError> {
        let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        Self::parse(var(ENV_MODE).as_deref(), var(ENV_LISTEN).as_deref())
    }

    /// Validates the raw values: an absent or empty mode is [`Mode::Proxy`]. The listen
    /// address is read only in reuseport mode, where it is required: the master's own
    /// `--listen` takes its value from the same variable, so workers in other modes may well
    /// inherit one they must not trip over. It takes the master's forms: `IP:PORT`,
    /// `[v6]:PORT`, or `:PORT` for all IPv4 addresses.
    pub fn parse(mode: Option<&str>, listen: Option<&str>) -> Result<Self, BuiltinError> {
        let mode: Mode = mode
            .unwrap_or_default()
            .parse()
            .map_err(BuiltinError::Mode)?;
        if mode != Mode::ReusePort {
            return Ok(Self { mode, listen: None });
        }
        let raw = listen
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or(BuiltinError::MissingListen)?;
        let bad = || BuiltinError::BadListen(raw.to_owned());
        let addr = crate::protocol::parse_listen(raw).ok_or_else(bad)?;
        Ok(Self {
            mode,
            listen: Some(addr),
        })
    }
}

/// Runs the built-in worker until the master asks it to stop, the channel closes, or SIGTERM.
/// Builds its own current-thread runtime: one thread, like a Node.js server.
pub fn run() -> Result<(), BuiltinError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BuiltinError::Runtime)?;
    runtime.block_on(async {
        let settings = Settings::from_env()?;
        let channel = Channel::from_env()?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(BuiltinError::Signal)?;
        let stop = CancellationToken::new();
        let on_sigterm = stop.clone();
        tokio::spawn(async move {
            if sigterm.recv().await.is_some() {
                on_sigterm.cancel();
            }
        });
        serve(channel, &settings, stop).await.map(drop)
    })
}

/// Serves HTTP in the mode `settings` names until the master sends `shutdown`, the channel
/// closes, or `stop` is cancelled (which counts as a shutdown: open connections drain).
///
/// Announces `ready` once it can take connections. Returns why it stopped.
pub async fn serve(
    mut channel: Channel,
    settings: &Settings,
    stop: CancellationToken,
) -> Result<StopReason, BuiltinError> {
    let graceful = Connections::default();
    let reason = match settings.mode {
        Mode::Proxy => {
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| BuiltinError::Bind { addr, source })?;
            let port = port_of(&listener, addr)?;
            channel.ready(port).await?;
            accept_loop(&mut channel, &listener, &graceful, &stop).await
        }
        Mode::Shared => {
            let listener = tokio::select! {
                received = channel.listener() => match received {
                    Ok(listener) => listener,
                    Err(ChannelError::NoListener(reason)) => return Ok(reason),
                    Err(e) => return Err(e.into()),
                },
                _ = stop.cancelled() => return Ok(StopReason::Shutdown),
            };
            let port = listener
                .local_addr()
                .map_err(BuiltinError::SharedAddr)?
                .port();
            channel.ready(port).await?;
            accept_loop(&mut channel, &listener, &graceful, &stop).await
        }
        Mode::ReusePort => {
            let addr = settings.listen.ok_or(BuiltinError::MissingListen)?;
            let listener =
                bind_reuseport(addr).map_err(|source| BuiltinError::Bind { addr, source })?;
            let port = port_of(&listener, addr)?;
            channel.ready(port).await?;
            accept_loop(&mut channel, &listener, &graceful, &stop).await
        }
        Mode::Handoff => {
            channel.ready_without_port().await?;
            handoff_loop(&mut channel, &graceful, &stop).await
        }
    };
    if reason == StopReason::Shutdown {
        graceful.draining.cancel();
        graceful.tracker.close();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.tracker.wait()).await;
    }
    Ok(reason)
}

fn port_of(listener: &TcpListener, addr: SocketAddr) -> Result<u16, BuiltinError> {
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| BuiltinError::Bind { addr, source })
}

/// Binds `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`, so every worker can bind the same
/// address and the kernel spreads connections between their sockets.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts on `listener` (own, shared or reuseport) until told to stop. The listener is
/// dropped by the caller afterwards; for a shared one that closes only this worker's copy.
async fn accept_loop(
    channel: &mut Channel,
    listener: &TcpListener,
    graceful: &Connections,
    stop: &CancellationToken,
) -> StopReason {
    let each = match nodelay_on_accept(listener) {
        Ok(()) => false,
        Err(e) => {
            tracing::debug!(error = %e, "TCP_NODELAY on the listener failed; setting it per connection");
            true
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if each {
                        let _ = stream.set_nodelay(true);
                    }
                    serve_connection(stream, graceful)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            reason = channel.stopped() => return reason,
            _ = stop.cancelled() => return StopReason::Shutdown,
        }
    }
}

/// Serves the connections the master hands over, answering `accepted` for each.
async fn handoff_loop(
    channel: &mut Channel,
    graceful: &Connections,
    stop: &CancellationToken,
) -> StopReason {
    loop {
        let event = tokio::select! {
            event = channel.recv() => event,
            _ = stop.cancelled() => return StopReason::Shutdown,
        };
        match event {
            None => return StopReason::Disconnected,
            Some(Event::Shutdown) => return StopReason::Shutdown,
            Some(Event::Conn { id, stream }) => {
                // Accepted by the master from its own listener: not ours to check once.
                let _ = stream.set_nodelay(true);
                serve_connection(stream, graceful);
                // The connection is ours now: the master may close its copy. If the master
                // is gone the next read says so.
                if let Err(e) = channel.accepted(id).await {
                    tracing::debug!(id, error = %e, "could not confirm a handed-off connection");
                }
            }
            Some(Event::Listener(_)) => {
                tracing::debug!("closing a listener the master sent in handoff mode")
            }
        }
    }
}

/// The HTTP/1 server settings a worker should serve with (the built-in worker does).
///
/// Half-close is on: a client may send its request and then shut its write side
/// (`shutdown(SHUT_WR)`, as `nc -N` and many scripts do) while it waits for the answer.
/// hyper's default treats that EOF as the client going away and closes without answering;
/// in hand-off and shared modes the request and the EOF usually arrive together, so such a
/// client never got an answer.
pub fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.half_close(true);
    builder
}

/// Makes every connection accepted from `listener` start with `TCP_NODELAY`: Linux copies
/// the listener's flag to each socket it accepts, so one check here (and, on a listener
/// without it, one `setsockopt`) replaces a `setsockopt` per connection, one system call of
/// the ~9 a worker makes per new connection (bench/NOTES.md). The master's listeners (shared
/// mode) already have it; a shared listener without it gets it for every worker at once.
fn nodelay_on_accept(listener: &TcpListener) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    if !socket.tcp_nodelay()? {
        socket.set_tcp_nodelay(true)?;
    }
    Ok(())
}

/// The open connections, drained after `shutdown` (see the module's doc).
#[derive(Default)]
struct Connections {
    /// Cancelled when the drain begins.
    draining: CancellationToken,
    /// Every connection's task, waited for (bounded) by the drain.
    tracker: TaskTracker,
}

/// Serves HTTP/1 on `stream` (which already has `TCP_NODELAY`) on a task of its own.
fn serve_connection(stream: TcpStream, graceful: &Connections) {
    let draining = graceful.draining.clone();
    let heard = Arc::new(FirstRead::default());
    let io = Heard {
        stream,
        heard: Arc::clone(&heard),
    };
    graceful.tracker.spawn(async move {
        let io = CloseOnly(TokioIo::new(io));
        let conn = http1().serve_connection(io, hyper::service::service_fn(handle));
        tokio::pin!(conn);
        // Told to shut down once draining and either heard from or silent for
        // FIRST_REQUEST_WAIT (see the module's doc): a connection still silent then is
        // closed by hyper at once, as it should be.
        let told = async {
            draining.cancelled().await;
            tokio::select! {
                () = heard.wait() => {}
                () = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
            }
        };
        let done = tokio::select! {
            biased;
            done = conn.as_mut() => Some(done),
            () = told => None,
        };
        let done = match done {
            Some(done) => done,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = done {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Whether hyper's first read on a connection has returned (bytes, EOF or an error).
#[derive(Default)]
struct FirstRead {
    done: AtomicBool,
    /// Woken (one permit) when `done` is first set; only the connection's task waits.
    notify: Notify,
}

impl FirstRead {
    fn set(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    async fn wait(&self) {
        // `notify_one` keeps a permit when nobody waits yet, so a read between the load
        // and the await is not missed.
        while !self.done.load(Ordering::Relaxed) {
            self.notify.notified().await;
        }
    }
}

/// A connection's stream that records hyper's first completed read in [`FirstRead`]: once
/// a read has returned, hyper has bytes in its buffer (or saw EOF), so its graceful shutdown
/// finishes the request instead of closing the connection unread.
struct Heard {
    stream: TcpStream,
    heard: Arc<FirstRead>,
}

impl AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if polled.is_ready() {
            self.heard.set();
        }
        polled
    }
}

impl AsyncWrite for Heard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection whose end is its `close`: hyper's last step before it drops a finished
/// connection is `poll_shutdown`, a `shutdown(SHUT_WR)` that the `close` right after it makes
/// redundant (the close sends the same FIN, and with unread bytes in the receive queue both
/// end in a reset). One system call less per connection (bench/NOTES.md).
struct CloseOnly(TokioIo<Heard>);

impl hyper::rt::Read for CloseOnly {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CloseOnly {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        res
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/" => text(StatusCode::OK, greeting().to_owned()),
        "/healthz" => text(StatusCode::OK, "ok".into()),
        "/sum" => match sum_n(req.uri().query()) {
            Ok(n) => text(StatusCode::OK, format!("{}\n", sum(n))),
            Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

/// The `GET /` body: `child worker run, at pid: N, host: HOSTNAME`. Both are facts of the
/// whole process that do not change while it runs, so it is built once, on first use.
fn greeting() -> &'static str {
    static GREETING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    GREETING.get_or_init(|| {
        // A host name the kernel will not give (or not as UTF-8) still leaves the pid useful.
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        format!(
            "child worker run, at pid: {}, host: {host}\n",
            std::process::id()
        )
    })
}

/// Reads `n` from a query string such as `n=1000`; absent means [`DEFAULT_SUM_N`].
fn sum_n(query: Option<&str>) -> Result<u64, String> {
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("n="))
    else {
        return Ok(DEFAULT_SUM_N);
    };
    match raw.parse::<u64>() {
        Ok(n) if n <= MAX_SUM_N => Ok(n),
        _ => Err(format!("n must be a whole number from 0 to {MAX_SUM_N}")),
    }
}

/// The deliberately slow computation: a wrapping sum of squares that the optimiser may not
/// fold away (`black_box`), so its cost grows linearly with `n`.
pub fn sum(n: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..n {
        let i = std::hint::black_box(i);
        acc = acc.wrapping_add(i.wrapping_mul(i));
    }
    acc
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::channel::tests::FakeMaster;
    use crate::protocol::{MasterMessage, WorkerMessage};

    /// Generous bound for steps that take milliseconds, so a broken test fails instead of
    /// hanging.
    const STEP: Duration = Duration::from_secs(10);

    fn settings(mode: Mode, listen: Option<SocketAddr>) -> Settings {
        Settings { mode, listen }
    }

    /// Starts the worker in this test's runtime, against a fake master.
    fn start(
        settings: Settings,
    ) -> (
        FakeMaster,
        CancellationToken,
        JoinHandle<Result<StopReason, BuiltinError>>,
    ) {
        let (master, channel) = FakeMaster::pair();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { serve(channel, &settings, token).await });
        (master, stop, task)
    }

    async fn finished(task: JoinHandle<Result<StopReason, BuiltinError>>) -> StopReason {
        tokio::time::timeout(STEP, task)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker ok")
    }

    async fn ready_port(master: &mut FakeMaster) -> Option<u16> {
        loop {
            match master.recv().await {
                WorkerMessage::Ready { port, .. } => return port,
                // Shared mode: the listener is acknowledged the Node way first.
                WorkerMessage::HandleAck => {}
                other => panic!("expected ready, got {other:?}"),
            }
        }
    }

    /// One HTTP/1.1 request over `stream`, returning the whole response.
    async fn get(mut stream: TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(STEP, stream.read_to_string(&mut response))
            .await
            .expect("response in time")
            .expect("read");
        response
    }

    async fn get_port(port: u16, path: &str) -> String {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        get(stream, path).await
    }

    /// The worker's listeners carry `TCP_NODELAY` so the sockets they accept have it
    /// without a call each; a listener that lacks it (a shared one from elsewhere) gets it.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        for listener in [
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("bind"),
        ] {
            assert!(!socket2::SockRef::from(&listener)
                .tcp_nodelay()
                .expect("get"));
            nodelay_on_accept(&listener).expect("nodelay");
            assert!(socket2::SockRef::from(&listener)
                .tcp_nodelay()
                .expect("get"));
            let addr = listener.local_addr().expect("addr");
            let _client = TcpStream::connect(addr).await.expect("connect");
            let (accepted, _) = tokio::time::timeout(STEP, listener.accept())
                .await
                .expect("accept in time")
                .expect("accept");
            assert!(
                accepted.nodelay().expect("get"),
                "accepted without TCP_NODELAY"
            );
        }
    }

    #[tokio::test]
    async fn proxy_mode_listens_on_its_own_port() {
        let (mut master, _stop, task) = start(settings(Mode::Proxy, None));
        let port = ready_port(&mut master).await.expect("a port");
        let response = get_port(port, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok"), "{response}");
        master.send(&MasterMessage::Shutdown, &[]).await;
        assert_eq!(finished(task).await, StopReason::Shutdown);
    }

    /// A connection accepted just before `shutdown` whose request comes only once the drain
    /// has begun is served, not closed unread (hyper's graceful shutdown alone closes it).
    #[tokio::test]
    async fn drain_serves_a_connection_whose_request_comes_after_the_shutdown() {
        let (mut master, _stop, task) = start(settings(Mode::Proxy, None));
        let port = ready_port(&mut master).await.expect("a port");
        let mut silent = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        // Accepted in order: once a later connection is answered, `silent` was accepted too.
        let response = get_port(port, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        master.send(&MasterMessage::Shutdown, &[]).await;
        // The listener is closed once the worker stops accepting: the drain has begun.
        let deadline = tokio::time::Instant::now() + STEP;
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::task::yield_now().await;
        }
        let request = "GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        silent.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(STEP, silent.read_to_string(&mut response))
            .await
            .expect("response in time")
            .expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
        assert_eq!(finished(task).await, StopReason::Shutdown);
    }

    #[tokio::test]
    async fn shared_mode_accepts_on_the_masters_listener() {
        let (mut master, stop, task) = start(settings(Mode::Shared, None));
        let shared = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = shared.local_addr().expect("addr").port();
        master.send(&MasterMessage::Ping { seq: 1 }, &[]).await;
        assert_eq!(master.recv().await, WorkerMessage::Pong { seq: 1 });
        master
            .send(&MasterMessage::Listener, &[shared.as_fd()])
            .await;
        assert_eq!(ready_port(&mut master).await, Some(port));
        // The master keeps its copy open (as the real one does) and never accepts on it.
        let response = get_port(port, "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let host = nix::unistd::gethostname().expect("hostname");
        let expected = format!(
            "child worker run, at pid: {}, host: {}\n",
            std::process::id(),
            host.to_string_lossy()
        );
        assert!(response.ends_with(&expected), "{response}");
        stop.cancel();
        assert_eq!(finished(task).await, StopReason::Shutdown);
    }

    #[tokio::test]
    async fn shared_mode_stops_cleanly_before_any_listener() {
        let (master, _stop, task) = start(settings(Mode::Shared, None));
        master.send(&MasterMessage::Shutdown, &[]).await;
        assert_eq!(finished(task).await, StopReason::Shutdown);
    }

    #[tokio::test]
    async fn shared_mode_fails_on_a_listener_without_a_socket() {
        let (master, _stop, task) = start(settings(Mode::Shared, None));
        master.send_raw("{\"type\":\"listener\"}\n").await;
        let result = tokio::time::timeout(STEP, task)
            .await
            .expect("in time")
            .expect("task");
        assert!(matches!(
            result,
            Err(BuiltinError::Channel(ChannelError::BadListener(_)))
        ));
    }

    #[tokio::test]
    async fn reuseport_mode_binds_the_shared_address() {
        // Another socket already holds the address with SO_REUSEPORT, as a sibling worker
        // would; the worker must be able to bind it too.
        let sibling = bind_reuseport("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = sibling.local_addr().expect("addr");
        let (mut master, _stop, task) = start(settings(Mode::ReusePort, Some(addr)));
        assert_eq!(ready_port(&mut master).await, Some(addr.port()));
        drop(sibling); // so the test's connection surely reaches the worker
        let response = get_port(addr.port(), "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        drop(master);
        assert_eq!(finished(task).await, StopReason::Disconnected);
    }

    #[tokio::test]
    async fn handoff_mode_serves_handed_connections() {
        let (mut master, _stop, task) = start(settings(Mode::Handoff, None));
        assert_eq!(ready_port(&mut master).await, None);

        let public = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(public.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (conn, _) = public.accept().expect("accept");

        master.send_raw("{\"type\":\"conn\",\"id\":1}\n").await;
        assert_eq!(master.recv().await, WorkerMessage::Rejected { id: 1 });
        master
            .send(&MasterMessage::Conn { id: 2 }, &[conn.as_fd()])
            .await;
        assert_eq!(master.recv().await, WorkerMessage::Accepted { id: 2 });
        drop(conn); // the master lets go once the worker has accepted

        let response = get(client, "/sum?n=4").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("14\n"), "{response}");
        master.send(&MasterMessage::Shutdown, &[]).await;
        assert_eq!(finished(task).await, StopReason::Shutdown);
    }

    #[test]
    fn settings_from_raw_values() {
        assert_eq!(
            Settings::parse(None, None).ok(),
            Some(settings(Mode::Proxy, None))
        );
        assert_eq!(
            Settings::parse(Some("handoff"), Some("")).ok(),
            Some(settings(Mode::Handoff, None))
        );
        // Inherited from the master's own --listen: ignored outside reuseport.
        assert_eq!(
            Settings::parse(Some("proxy"), Some("not an address")).ok(),
            Some(settings(Mode::Proxy, None))
        );
        assert_eq!(
            Settings::parse(Some("reuseport"), Some(":8080")).ok(),
            Some(settings(
                Mode::ReusePort,
                Some("0.0.0.0:8080".parse().expect("addr"))
            ))
        );
        assert!(matches!(
            Settings::parse(Some("reuseport"), Some(":http")),
            Err(BuiltinError::BadListen(_))
        ));
        let addr: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(
            Settings::parse(Some("reuseport"), Some(" 0.0.0.0:8080 ")).ok(),
            Some(settings(Mode::ReusePort, Some(addr)))
        );
        assert!(matches!(
            Settings::parse(Some("reuseport"), None),
            Err(BuiltinError::MissingListen)
        ));
        assert!(matches!(
            Settings::parse(Some("reuseport"), Some("localhost:80")),
            Err(BuiltinError::BadListen(_))
        ));
        assert!(matches!(
            Settings::parse(Some("fork"), None),
            Err(BuiltinError::Mode(_))
        ));
    }

    #[test]
    fn sum_is_sum_of_squares() {
        assert_eq!(sum(0), 0);
        assert_eq!(sum(4), 1 + 4 + 9);
    }

    #[test]
    fn sum_query() {
        assert_eq!(sum_n(None), Ok(DEFAULT_SUM_N));
        assert_eq!(sum_n(Some("x=1&n=12")), Ok(12));
        assert!(sum_n(Some("n=-1")).is_err());
        assert!(sum_n(Some("n=99999999999999")).is_err());
    }
}
