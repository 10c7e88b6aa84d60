//! One proxied connection of the epoll engine, as a state machine the event loop drives:
//! connect to a backend (the next one on a refusal, a timeout, or a reset before a byte
//! either way; given up if the client leaves before a byte meanwhile), then copy both ways
//! until both directions are done, with the same rules as the tokio path ([`crate::copy`],
//! [`crate::forward`]): a short read or write clears that socket's readiness, a client's
//! half-close is passed on, a backend's EOF ends the connection once delivered unless
//! `--half-close`, and a reset is passed on as a reset.
//!
//! Readiness is edge-triggered: the loop sets a socket's `readable`/`writable` flags from its
//! events, and only I/O that returns `EAGAIN` (or comes back short) clears them. A peer's
//! FIN (`EPOLLRDHUP`) is sticky, so the read that returns 0 is never skipped.
//!
//! No buffer is held while a connection is idle: reads go into the loop's one scratch
//! buffer and straight on to the other socket; only what the destination cannot take now is
//! kept (at most one chunk per direction; reading that way stops until it drains).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::backends::{ActiveGuard, Backend, Backends};
use crate::client_addr::ClientAddr;
use crate::connect;
use crate::copy::BackendEof;
use crate::forward::{ForwardConfig, ForwardError, Forwarded, Transfer};

/// Reads per direction per turn of the loop before the connection lets the others run:
/// a bulk transfer between two fast peers would otherwise keep the thread to itself. The
/// connection is driven again at the end of the turn.
const READS_PER_TURN: usize = 16;

/// The client's first bytes, read at accept without waiting: the tokio path's reader (the
/// same rule and bound, on the mio socket's fd).
pub(super) use crate::forward::read_early;

/// At most this much of a held request is read and dropped before a quiesced close (as the
/// tokio path's).
const DISCARD_MAX: usize = 64 * 1024;

/// What the loop must do after driving a connection.
#[derive(Debug)]
pub(super) enum Step {
    /// Wait for the next event or timer.
    Wait,
    /// Drive it again at the end of this turn (it stopped to let others run).
    Again,
    /// It is over: record this and close both sockets.
    Done(Result<Forwarded, ForwardError>),
}

/// What a connection needs from the loop while it is driven.
pub(super) struct Ctx<'a> {
    pub(super) registry: &'a Registry,
    pub(super) backends: &'a Backends,
    pub(super) config: &'a ForwardConfig,
    pub(super) now: Instant,
    pub(super) scratch: &'a mut [MaybeUninit<u8>],
}

/// One socket and what its events said about it.
#[derive(Debug)]
pub(super) struct Side {
    sock: TcpStream,
    readable: bool,
    writable: bool,
    /// The peer sent its FIN (or the socket failed): a read will not block.
    rdhup: bool,
    /// The peer sent its FIN (not an error): what is left to read is the last of it.
    fin: bool,
}

impl Side {
    fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            readable: false,
            writable: false,
            rdhup: false,
            fin: false,
        }
    }

    fn on_event(&mut self, ev: &Event) {
        if ev.is_error() {
            (self.readable, self.writable, self.rdhup) = (true, true, true);
            return;
        }
        if ev.is_readable() {
            self.readable = true;
        }
        if ev.is_read_closed() {
            (self.readable, self.rdhup, self.fin) = (true, true, true);
        }
        if ev.is_writable() || ev.is_write_closed() {
            self.writable = true;
        }
    }

    /// One `read()` into `buf`: `Some(0)` at EOF, `None` when nothing is there now.
    fn read(&mut self, buf: &mut [MaybeUninit<u8>]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: the fd is open for the duration of the call; `buf` is valid for writes
            // of `buf.len()` bytes (read(2) does not need them initialised).
            let n =
                unsafe { libc::read(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                let n = n as usize;
                // A short read very likely emptied the queue: the next bytes bring an edge.
                if n > 0 && n < buf.len() && !self.rdhup {
                    self.readable = false;
                }
                return Ok(Some(n));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                _ => return Err(e),
            }
        }
    }

    /// Writes as much of `data` as the socket takes now (no `SIGPIPE`); returns how much.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.send(data, 0)
    }

    /// [`write`](Self::write) of bytes after which this socket's FIN follows in the same
    /// turn (the source's FIN is already in): `MSG_MORE` keeps them queued a moment, and
    /// the close or `shutdown` that comes next puts its FIN on their segment (the kernel's
    /// `tcp_send_fin` marks an unsent tail) and sends it: one segment fewer per
    /// connection, and one ACK for both at the peer. The price: if the client sends bytes
    /// in the microseconds between the unread check before that close and the close itself,
    /// the close is a reset and takes the held bytes with it, where before they were on the
    /// wire ahead of it. Only a client that sends again after a `Connection: close` answer
    /// can meet it, and its next request is lost either way.
    fn write_last(&mut self, data: &[u8]) -> io::Result<usize> {
        self.send(data, libc::MSG_MORE)
    }

    fn send(&mut self, mut data: &[u8], flags: libc::c_int) -> io::Result<usize> {
        let len = data.len();
        while !data.is_empty() && self.writable {
            // SAFETY: the fd is open for the duration of the call; `data` is a readable slice
            // of `data.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL | flags,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n < data.len() {
                    self.writable = false;
                }
                data = &data[n..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => self.writable = false,
                _ => return Err(e),
            }
        }
        Ok(len - data.len())
    }

    /// Passes a half-close on; an error (the peer is gone) shows up on the next I/O.
    fn shutdown_write(&self) {
        // SAFETY: the fd is open for the duration of the call.
        unsafe {
            libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_WR);
        }
    }

    /// Makes the coming close send RST instead of FIN: how a peer's abort is passed on.
    fn abort(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the fd is open for the duration of the call; `linger` is a valid `struct
        // linger` and its size is passed with it.
        unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Whether the kernel still holds bytes sent to the peer and not acknowledged
    /// (`SIOCOUTQ`): an answer not yet delivered. An error counts as such.
    fn unsent(&self) -> bool {
        let mut queued: libc::c_int = 0;
        // SAFETY: the fd is open for the duration of the call; SIOCOUTQ (TIOCOUTQ) writes
        // one `int` to the pointer it is given.
        let r = unsafe { libc::ioctl(self.sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        r != 0 || queued > 0
    }

    /// Reads and drops what the peer sent and nobody read (at most [`DISCARD_MAX`], without
    /// waiting), so the close that follows is a FIN, not a reset.
    fn discard_unread(&self) {
        let mut buf = [0u8; 4096];
        let mut dropped = 0;
        while dropped < DISCARD_MAX {
            // SAFETY: the fd is open for the duration of the call; `buf` is valid for writes
            // of `buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
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

    /// One `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: `Some(true)` bytes wait unread,
    /// `Some(false)` the peer closed (FIN, or an error), `None` nothing yet.
    fn peek(&self) -> Option<bool> {
        let mut byte = 0u8;
        // SAFETY: the fd is open for the duration of the call; `byte` is valid for one byte.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Some(false),
            n if n > 0 => Some(true),
            _ => match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                _ => Some(false),
            },
        }
    }
}

/// One direction of the copy.
#[derive(Debug, Default)]
struct Dir {
    /// Read but not yet written (the destination was full).
    pending: Vec<u8>,
    /// Its EOF has been seen (and passed on, or the connection ended).
    done: bool,
    /// Bytes read from its source by the copy.
    total: u64,
}

/// How a direction's pass ended.
enum Flow {
    /// Waiting for readiness.
    Wait,
    /// Stopped to let other connections run, still ready.
    Budget,
    /// Its source reached EOF, everything read is written.
    Eof,
}

/// Copies `src → dst` while both are ready; `reads` counts the reads that brought bytes.
/// With `hold` (an upgrade's quiesce holds the client), `src` is not read: its readiness is
/// kept, so it is read as soon as the hold ends and the connection is driven again.
fn one_way(
    src: &mut Side,
    dst: &mut Side,
    dir: &mut Dir,
    scratch: &mut [MaybeUninit<u8>],
    (reads, wrote): (&mut u32, &mut bool),
    hold: bool,
) -> io::Result<Flow> {
    for _ in 0..READS_PER_TURN {
        if !dir.pending.is_empty() {
            let w = dst.write(&dir.pending)?;
            if w > 0 {
                dir.pending.drain(..w);
                *wrote = true;
            }
            if !dir.pending.is_empty() {
                return Ok(Flow::Wait);
            }
            dir.pending = Vec::new();
        }
        if !src.readable || hold {
            return Ok(Flow::Wait);
        }
        let n = match src.read(scratch)? {
            None => return Ok(Flow::Wait),
            Some(0) => return Ok(Flow::Eof),
            Some(n) => n,
        };
        // SAFETY: read(2) initialised the first `n` bytes of `scratch`.
        let data = unsafe { std::slice::from_raw_parts(scratch.as_ptr().cast::<u8>(), n) };
        *reads += 1;
        dir.total += n as u64;
        // With the source's FIN in, the read that follows returns its EOF (or more of the
        // last bytes), and the EOF ends this side with a FIN in the same turn.
        let w = if src.fin {
            dst.write_last(data)?
        } else {
            dst.write(data)?
        };
        if w < n {
            dir.pending.extend_from_slice(&data[w..]);
        }
    }
    Ok(Flow::Budget)
}

/// Where the backend connection is.
#[derive(Debug)]
enum Stage {
    /// `connect()` in progress, given up at `deadline`.
    Connecting { deadline: Instant },
    /// Connected: copying.
    Up,
}

/// The backend side of a connection.
struct Upstream {
    backend: Arc<Backend>,
    /// Counted in the backend's open connections (least-conn) until dropped.
    _active: ActiveGuard,
    side: Side,
    stage: Stage,
}

/// One client connection and its backend.
pub(super) struct Conn {
    pub(super) from: ClientAddr,
    client: Side,
    upstream: Option<Upstream>,
    /// The token the backend socket is registered with.
    backend_token: Token,
    /// The client's first bytes (sent with the connect; again to a swapped backend).
    early: Vec<u8>,
    tried: Vec<u64>,
    last_error: Option<io::Error>,
    c2b: Dir,
    b2c: Dir,
    /// When bytes last moved either way (idle timeout).
    last_move: Instant,
    /// Since when the backend owes an answer to the client's last bytes (response timeout).
    awaiting_since: Option<Instant>,
    /// Copy reads of the client's bytes so far (0: a swap is still possible).
    client_reads: u32,
    /// The backend has sent at least one byte.
    answered: bool,
    /// Moves so far, and the count at the last quiesce look (see [`Conn::quiesce_look`]).
    moves: u64,
    quiesce_mark: Option<u64>,
    /// When it was accepted (a quiesce look gives a silent newcomer its first bytes' time).
    born: Instant,
    /// Whether a quiesce look has logged it as still busy.
    said_busy: bool,
    /// The earliest look the loop's timers hold for this connection.
    pub(super) timer_at: Option<Instant>,
    /// One `--max-conns` permit, one task of the drain's tracker, for the connection's life.
    _permit: OwnedSemaphorePermit,
    _task: TaskTrackerToken,
}

impl Conn {
    /// A connection whose client socket is registered already.
    pub(super) fn new(
        client: TcpStream,
        from: ClientAddr,
        early: Vec<u8>,
        backend_token: Token,
        permit: OwnedSemaphorePermit,
        task: TaskTrackerToken,
        now: Instant,
    ) -> Self {
        Self {
            from,
            client: Side::new(client),
            upstream: None,
            backend_token,
            early,
            tried: Vec::new(),
            last_error: None,
            c2b: Dir::default(),
            b2c: Dir::default(),
            last_move: now,
            awaiting_since: None,
            client_reads: 0,
            answered: false,
            moves: 0,
            quiesce_mark: None,
            born: now,
            said_busy: false,
            timer_at: None,
            _permit: permit,
            _task: task,
        }
    }

    /// Notes an event of the client (`backend: false`) or backend socket.
    pub(super) fn on_event(&mut self, backend: bool, ev: &Event) {
        match (backend, &mut self.upstream) {
            (false, _) => self.client.on_event(ev),
            (true, Some(up)) => up.side.on_event(ev),
            (true, None) => {}
        }
    }

    /// The backend in use, if any.
    pub(super) fn backend(&self) -> Option<&Arc<Backend>> {
        self.upstream.as_ref().map(|u| &u.backend)
    }

    /// Connects to the next backend not tried yet (dropping the current one, if any).
    pub(super) fn connect_next(&mut self, ctx: &mut Ctx<'_>) -> Step {
        self.upstream = None;
        (self.c2b, self.b2c) = (Dir::default(), Dir::default());
        loop {
            let Some(backend) = ctx.backends.pick_excluding(&self.tried) else {
                return Step::Done(Err(match self.last_error.take() {
                    Some(last) => ForwardError::AllFailed {
                        tries: self.tried.len(),
                        last,
                    },
                    None => ForwardError::NoBackend,
                }));
            };
            if backend.handoff.is_some() {
                // Refused at start-up with this engine; never offered a read client.
                self.tried.push(backend.key);
                continue;
            }
            // Counted from the pick, as in the tokio path: least-conn must see it at once.
            let active = backend.open();
            let (socket, sent) = match connect::start_socket(backend.addr, &self.early) {
                Ok(s) => s,
                Err(e) if crate::is_out_of_resources(&e) => {
                    return Step::Done(Err(ForwardError::OutOfDescriptors(e)))
                }
                Err(e) => {
                    backend.record_connect(false);
                    tracing::debug!(slot = backend.slot, addr = %backend.addr, error = %e, "backend connect failed, trying next");
                    self.last_error = Some(e);
                    self.tried.push(backend.key);
                    continue;
                }
            };
            let mut sock = TcpStream::from_std(socket.into());
            if let Err(e) = ctx.registry.register(
                &mut sock,
                self.backend_token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                return Step::Done(Err(ForwardError::OutOfDescriptors(e)));
            }
            let mut side = Side::new(sock);
            let stage = match sent {
                Some(n) => {
                    backend.record_connect(true);
                    side.writable = true;
                    self.c2b.pending = self.early[n..].to_vec();
                    self.sent_early(ctx.now);
                    Stage::Up
                }
                None => Stage::Connecting {
                    deadline: ctx.now + ctx.config.connect_timeout,
                },
            };
            self.upstream = Some(Upstream {
                backend,
                _active: active,
                side,
                stage,
            });
            return self.drive(ctx);
        }
    }

    /// The backend owes an answer to the early bytes (if any), though the copy read none.
    fn sent_early(&mut self, now: Instant) {
        if !self.early.is_empty() {
            self.awaiting_since = Some(now);
            self.last_move = now;
        }
    }

    /// Moves what the sockets' readiness allows.
    pub(super) fn drive(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Some(up) = &mut self.upstream else {
            return self.connect_next(ctx);
        };
        if let Stage::Connecting { .. } = up.stage {
            // A client that leaves before a byte while the connect is pending is abandoned
            // at once, as in the tokio path (`closed_without_data`): waiting for the connect
            // would hold its permit and slot, and open a backend connection for nobody, up
            // to the connect timeout. Bytes in hand (or waiting) are the backend's, whatever
            // the client does now.
            if self.early.is_empty() && self.client.readable {
                match self.client.peek() {
                    Some(false) => return Step::Done(Ok(Forwarded::Abandoned)),
                    // Read by the copy once connected.
                    Some(true) => {}
                    // The readiness was stale: the next bytes (or the FIN) bring an edge.
                    None => self.client.readable = self.client.rdhup,
                }
            }
            if !up.side.writable {
                return Step::Wait;
            }
            // The connect's outcome: `SO_ERROR` (a refusal shows as `EPOLLERR` with it).
            let failed = match up.side.sock.take_error() {
                Ok(None) => None,
                Ok(Some(e)) | Err(e) => Some(e),
            };
            if let Some(e) = failed {
                up.backend.record_connect(false);
                tracing::debug!(slot = up.backend.slot, addr = %up.backend.addr, error = %e, "backend connect failed, trying next");
                self.tried.push(up.backend.key);
                self.last_error = Some(e);
                return self.connect_next(ctx);
            }
            up.backend.record_connect(true);
            up.stage = Stage::Up;
            self.c2b.pending = self.early.clone();
            self.sent_early(ctx.now);
        }
        match self.copy(ctx) {
            Ok(step) => step,
            Err(e) => self.failed(ctx, e),
        }
    }

    /// Both directions, as far as readiness allows; `Done` once both are over.
    fn copy(&mut self, ctx: &mut Ctx<'_>) -> io::Result<Step> {
        let Some(up) = &mut self.upstream else {
            return Ok(Step::Wait);
        };
        let mut again = false;
        let (mut reads, mut wrote) = (0, false);
        if !self.c2b.done {
            // Between exchanges while an upgrade quiesces, the client's next request is
            // held back (crate::quiesce): it will be sent again on a new connection.
            let spoke = self.client_reads > 0 || !self.early.is_empty();
            let between = spoke && self.answered && self.awaiting_since.is_none();
            let hold = between && ctx.config.quiesce.is_on();
            let flow = one_way(
                &mut self.client,
                &mut up.side,
                &mut self.c2b,
                ctx.scratch,
                (&mut reads, &mut wrote),
                hold,
            )?;
            if reads > 0 {
                self.client_reads += reads;
                self.awaiting_since = Some(ctx.now);
                self.last_move = ctx.now;
                self.moves += 1;
            }
            match flow {
                Flow::Wait => {}
                Flow::Budget => again = true,
                Flow::Eof => {
                    // A client's half-close is always passed on, unless the backend is done
                    // too: then the close says it to both.
                    self.c2b.done = true;
                    if self.b2c.done {
                        return Ok(Step::Done(Ok(self.copied())));
                    }
                    up.side.shutdown_write();
                }
            }
        }
        let (mut answers, mut wrote_back) = (0, false);
        if !self.b2c.done {
            let flow = one_way(
                &mut up.side,
                &mut self.client,
                &mut self.b2c,
                ctx.scratch,
                (&mut answers, &mut wrote_back),
                false,
            )?;
            if answers > 0 {
                self.answered = true;
                self.awaiting_since = None;
                self.last_move = ctx.now;
                self.moves += 1;
            }
            match flow {
                Flow::Wait => {}
                Flow::Budget => again = true,
                Flow::Eof => {
                    self.b2c.done = true;
                    // A backend's EOF ends it all once delivered, unless the client sent
                    // bytes not read yet (closing on them would reset the answer).
                    let close = ctx.config.on_backend_eof == BackendEof::Close;
                    if self.c2b.done || (close && self.client.peek() != Some(true)) {
                        return Ok(Step::Done(Ok(self.copied())));
                    }
                    self.client.shutdown_write();
                }
            }
        }
        if wrote || wrote_back {
            self.last_move = ctx.now;
            self.moves += 1;
        }
        Ok(if again { Step::Again } else { Step::Wait })
    }

    /// A socket failed mid-copy: swap the backend if nothing moved yet and the client is
    /// still there, else pass the failure on to both peers as a reset.
    fn failed(&mut self, ctx: &mut Ctx<'_>, e: io::Error) -> Step {
        if let Some(up) = &self.upstream {
            if self.client_reads == 0 && !self.answered && self.client.peek() != Some(false) {
                up.backend.record_connect(false);
                tracing::debug!(slot = up.backend.slot, addr = %up.backend.addr, error = %e, "backend failed before a byte either way, trying next");
                self.tried.push(up.backend.key);
                self.last_error = Some(e);
                return self.connect_next(ctx);
            }
            up.side.abort();
        }
        self.client.abort();
        Step::Done(Err(ForwardError::Copy(e)))
    }

    fn copied(&self) -> Forwarded {
        Forwarded::Copied(Transfer {
            to_backend: self.c2b.total + self.early.len() as u64,
            to_client: self.b2c.total,
        })
    }

    /// When the connection next needs a look from the timers (`None`: never).
    pub(super) fn deadline(&self, config: &ForwardConfig) -> Option<Instant> {
        match &self.upstream.as_ref()?.stage {
            Stage::Connecting { deadline } => Some(*deadline),
            Stage::Up => {
                let idle = config.idle_timeout.map(|t| self.last_move + t);
                let response = config
                    .response_timeout
                    .zip(self.awaiting_since)
                    .map(|(t, since)| since + t);
                match (idle, response) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// A timer look: a connect given up (the next backend is tried), or a timeout fired.
    pub(super) fn expire(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let now = ctx.now;
        let Some(up) = &self.upstream else {
            return Step::Wait;
        };
        match up.stage {
            Stage::Connecting { deadline } if now >= deadline => {
                // Not counted against the backend, as in the tokio path: a full accept
                // queue under load would take every worker out of rotation at once.
                tracing::debug!(slot = up.backend.slot, addr = %up.backend.addr, "backend connect timed out, trying next");
                self.tried.push(up.backend.key);
                self.last_error = Some(io::ErrorKind::TimedOut.into());
                self.connect_next(ctx)
            }
            Stage::Connecting { .. } => Step::Wait,
            Stage::Up => {
                let config = ctx.config;
                if let Some(t) = config.idle_timeout.filter(|t| now >= self.last_move + *t) {
                    return Step::Done(Err(ForwardError::Idle(t)));
                }
                if let (Some(t), Some(since)) = (config.response_timeout, self.awaiting_since) {
                    if now >= since + t {
                        return Step::Done(Err(ForwardError::NoResponse(t)));
                    }
                }
                Step::Wait
            }
        }
    }

    /// A quiesce look at `now` (an in-place upgrade is draining since `since`): whether the
    /// connection is idle, as [`crate::quiesce`] says: copying, owing no answer, nothing
    /// moved since the previous look, and, if nothing ever moved, silent for
    /// [`FIRST_BYTES`](crate::quiesce::FIRST_BYTES) (its client may be sending its first
    /// bytes).
    pub(super) fn quiesce_look(&mut self, now: Instant, since: Instant) -> bool {
        let copying = matches!(self.upstream.as_ref().map(|u| &u.stage), Some(Stage::Up));
        let untouched = self.client_reads == 0 && !self.answered;
        let first_bytes_due =
            untouched && now.duration_since(since.max(self.born)) < crate::quiesce::FIRST_BYTES;
        let idle = copying
            && self.awaiting_since.is_none()
            && self.quiesce_mark == Some(self.moves)
            && !first_bytes_due
            && !self.client.unsent();
        self.quiesce_mark = Some(self.moves);
        if idle {
            // A held request is dropped unread, so the close is a FIN after the last answer
            // (an RST could destroy what the client has not read yet).
            self.client.discard_unread();
        } else if !self.said_busy && now.duration_since(since) >= crate::quiesce::BUSY {
            self.said_busy = true;
            let up = self.upstream.as_ref();
            tracing::debug!(peer = %self.from, slot = up.map(|u| u.backend.slot), addr = up.map(|u| u.backend.addr.to_string()), owes = self.awaiting_since.is_some(), answered = self.answered, "connection still busy while quiescing");
        }
        idle
    }

    /// The end: passive health from how it ended, and the result to record.
    pub(super) fn finish(
        self,
        result: Result<Forwarded, ForwardError>,
    ) -> (ClientAddr, Result<Forwarded, ForwardError>) {
        if let Some(up) = &self.upstream {
            match &result {
                Err(ForwardError::NoResponse(_)) => up.backend.record_response(false),
                _ if self.answered => up.backend.record_response(true),
                _ => {}
            }
        }
        (self.from, result)
    }
}
