//! The epoll engine (`--engine epoll`): the plain tcp proxy on one edge-triggered epoll
//! loop per proxy thread, which owns its sockets.
//!
//! Why mio here and not tokio: a tokio `TcpStream` registers its socket when it is created
//! and deregisters it when it is dropped (`epoll_ctl(DEL)`), and every 16 deregistrations
//! its driver wakes itself through an eventfd `write`. nginx registers a socket once,
//! edge-triggered, and lets `close` take it out of the epoll set. mio's sources do the same
//! (they never deregister on drop), so here a connection costs two `epoll_ctl(ADD)` and the
//! `close`s, and nothing else of the poller's: bench/NOTES.md has the counts. Everything
//! else of a connection (accept, the first bytes read with the connect, the copy, the close)
//! is the same system calls as the tokio path.
//!
//! What it shares with the tokio path: the backend set and its selection and least-conn
//! counts ([`Backends`]), the connect with the first bytes ([`crate::connect`]), the
//! `--max-conns` permits, the stats counters ([`crate::server::record`]), the drain's
//! [`TaskTracker`](tokio_util::task::TaskTracker) (a token per connection), the stop and
//! abort tokens and the upgrade's quiesce flag. The tokens live in tokio; [`relay`] runs on
//! the master's runtime and rings the loop's [`Bell`] (an eventfd, only at stop, abort and
//! while quiescing), so the hot path has no cross-thread wake-up.
//!
//! What it does not do (refused at start-up by the binary): PROXY headers in or out, TLS,
//! http mode, hand-off workers.

mod conn;
mod timers;

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::copy::CHUNK;
use crate::forward::ForwardError;
use crate::quiesce::Quiesce;
use crate::server::{record, Connections, Proxy};
use conn::{Conn, Ctx, Step};
use timers::{Key, Timers};

/// The listener's token.
const LISTENER: Token = Token(usize::MAX);
/// The [`Bell`]'s token.
const BELL: Token = Token(usize::MAX - 1);
/// Events taken per `epoll_wait`.
const EVENTS: usize = 1024;
/// First pause after an accept error that means "out of resources" (as the tokio path).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept retries.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How soon accepting is tried again when every `--max-conns` permit is taken: a permit
/// freed by another thread's connection sends no event here, and a burst waits in the
/// backlog meanwhile (delayed, not refused).
const PERMIT_RETRY: Duration = Duration::from_millis(5);
/// How often connections to remote backends are checked for their backend's retirement
/// (an address gone from DNS whose grace ran out). Only while there are such connections.
const RETIRE_LOOK: Duration = Duration::from_millis(250);
/// A pause between quiesce looks longer than this starts a new quiesce (looks come every
/// [`LOOK`](crate::quiesce::LOOK) while one lasts).
const QUIESCE_GAP: Duration = Duration::from_millis(250);
/// Generations are kept to 30 bits so a connection token never meets the fixed ones.
const GEN_MASK: u32 = (1 << 30) - 1;

/// Wakes an engine's loop from another thread, with what the wake is for.
#[derive(Debug)]
pub struct Bell {
    waker: Waker,
    /// Set with a ring while an upgrade quiesces: look for idle connections.
    quiesce: AtomicBool,
    /// Set with a ring when quiescing ends (the upgrade was refused or failed): held
    /// clients are read again.
    resume: AtomicBool,
}

impl Bell {
    fn ring(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "waking the epoll engine");
        }
    }
}

/// One proxy thread's epoll loop, before it runs.
#[derive(Debug)]
pub struct Engine {
    poll: Poll,
    bell: Arc<Bell>,
}

/// The connection slots: a connection's tokens carry its slot and generation, so an event
/// for a closed connection (still queued, or from a forked child's copy of the fd) is
/// recognised as stale and dropped.
struct Slot {
    gen: u32,
    conn: Option<Conn>,
}

fn token(slot: u32, gen: u32, backend: bool) -> Token {
    Token(((gen as usize) << 33) | ((slot as usize) << 1) | usize::from(backend))
}

fn untoken(t: Token) -> (u32, u32, bool) {
    let t = t.0;
    (
        ((t >> 1) & 0xffff_ffff) as u32,
        (t >> 33) as u32,
        t & 1 == 1,
    )
}

impl Engine {
    /// A new epoll instance and its bell.
    pub fn new() -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), BELL)?;
        Ok(Self {
            poll,
            bell: Arc::new(Bell {
                waker,
                quiesce: AtomicBool::new(false),
                resume: AtomicBool::new(false),
            }),
        })
    }

    /// The bell to hand to [`relay`].
    pub fn bell(&self) -> Arc<Bell> {
        Arc::clone(&self.bell)
    }

    /// Accepts on `listener` (non-blocking) until `stop` is cancelled, then calls
    /// `stopped_accepting` (every connection accepted is counted in `conns.tracker` by
    /// then) and serves the open connections until they end or `conns.abort` is
    /// cancelled. Blocks the calling thread; [`relay`] must run for `stop` and
    /// `conns.abort` to be seen.
    pub fn run(
        self,
        listener: std::net::TcpListener,
        proxy: Arc<Proxy>,
        stop: CancellationToken,
        conns: Connections,
        stopped_accepting: impl FnOnce(),
    ) {
        let mut stopped_accepting = Some(stopped_accepting);
        let mut lp = Loop::new(self, &proxy, conns.tracker.clone());
        let mut listener = TcpListener::from_std(listener);
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let mut listener =
            match lp
                .poll
                .registry()
                .register(&mut listener, LISTENER, Interest::READABLE)
            {
                Ok(()) => Some(listener),
                Err(e) => {
                    tracing::error!(error = %e, "registering the listener");
                    None
                }
            };
        let mut events = Events::with_capacity(EVENTS);
        let mut scratch = vec![MaybeUninit::<u8>::uninit(); CHUNK];
        let mut again: Vec<Key> = Vec::new();
        let mut rang = true;
        loop {
            if rang {
                rang = false;
                if conns.abort.is_cancelled() {
                    let open = lp.live;
                    tracing::debug!(open, "connections aborted at shutdown");
                    break;
                }
                if stop.is_cancelled() {
                    if let Some(mut l) = listener.take() {
                        // Explicitly: the listener's file stays open (the proxy threads keep
                        // a duplicate), so its close would not take it out of this epoll set.
                        let _ = lp.poll.registry().deregister(&mut l);
                    }
                }
                if lp.bell.quiesce.swap(false, Ordering::Relaxed) {
                    lp.quiesce_look(Instant::now());
                }
                if lp.bell.resume.swap(false, Ordering::Relaxed) {
                    lp.resume(Instant::now(), &mut scratch, &mut again);
                }
            }
            if listener.is_none() {
                if let Some(f) = stopped_accepting.take() {
                    f();
                }
                if lp.live == 0 {
                    break;
                }
            }
            let now = Instant::now();
            if let Some(l) = &listener {
                if lp.accept_ready && lp.accept_gate.is_none_or(|g| now >= g) {
                    lp.accept_gate = None;
                    lp.accept(l, local, now, &mut scratch);
                }
            }
            let timeout = if again.is_empty() {
                [
                    lp.timers.next_in(now),
                    lp.accept_gate.map(|g| g.saturating_duration_since(now)),
                    lp.retire_at.map(|g| g.saturating_duration_since(now)),
                ]
                .into_iter()
                .flatten()
                .min()
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = lp.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "epoll_wait failed; closing this thread's connections");
                break;
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => lp.accept_ready = true,
                    BELL => rang = true,
                    t => {
                        let (slot, gen, backend) = untoken(t);
                        lp.on_event(slot, gen, backend, ev, now, &mut scratch, &mut again);
                    }
                }
            }
            for (slot, gen) in std::mem::take(&mut again) {
                lp.drive(slot, gen, now, &mut scratch, &mut again);
            }
            while let Some((at, (slot, gen))) = lp.timers.pop_due(now) {
                lp.expire(slot, gen, at, now, &mut scratch, &mut again);
            }
            if lp.retire_at.is_some_and(|at| now >= at) {
                lp.retire(now, &mut scratch);
            }
            lp.free.append(&mut lp.freed);
        }
        if let Some(f) = stopped_accepting.take() {
            f();
        }
        // The remaining connections (an abort) close as the slots drop.
    }
}

/// The loop's state.
struct Loop<'p> {
    poll: Poll,
    bell: Arc<Bell>,
    proxy: &'p Proxy,
    slots: Vec<Slot>,
    /// Slots free for a new connection.
    free: Vec<u32>,
    /// Slots freed this turn: reused only from the next, after this turn's events for
    /// their old connection were seen (and dropped as stale).
    freed: Vec<u32>,
    /// Open connections.
    live: usize,
    /// Every connection holds a task token of the drain's tracker.
    tracker: tokio_util::task::TaskTracker,
    timers: Timers,
    /// The listener may have connections waiting (edge-triggered: until `EAGAIN`).
    accept_ready: bool,
    /// Do not accept before this (backing off after an out-of-resources error, or waiting
    /// for a permit).
    accept_gate: Option<Instant>,
    backoff: Duration,
    /// When to look for connections of retired backends next.
    retire_at: Option<Instant>,
    /// Since when an upgrade quiesces, and the last quiesce look.
    quiescing: Option<(Instant, Instant)>,
}

impl<'p> Loop<'p> {
    fn new(engine: Engine, proxy: &'p Proxy, tracker: tokio_util::task::TaskTracker) -> Self {
        Self {
            poll: engine.poll,
            bell: engine.bell,
            proxy,
            slots: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            live: 0,
            tracker,
            timers: Timers::default(),
            accept_ready: true,
            accept_gate: None,
            backoff: ACCEPT_BACKOFF_MIN,
            retire_at: None,
            quiescing: None,
        }
    }

    fn ctx<'a>(&'a self, now: Instant, scratch: &'a mut [MaybeUninit<u8>]) -> Ctx<'a> {
        Ctx {
            registry: self.poll.registry(),
            backends: &self.proxy.backends,
            config: &self.proxy.forward,
            now,
            scratch,
        }
    }

    /// Accepts until `EAGAIN`, a missing permit or an error.
    fn accept(
        &mut self,
        listener: &TcpListener,
        local: SocketAddr,
        now: Instant,
        scratch: &mut [MaybeUninit<u8>],
    ) {
        loop {
            let Ok(permit) = Arc::clone(&self.proxy.permits).try_acquire_owned() else {
                self.accept_gate = Some(now + PERMIT_RETRY);
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    self.proxy.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    self.start(
                        stream,
                        crate::ClientAddr::direct(peer, local),
                        permit,
                        now,
                        scratch,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.proxy
                        .stats
                        .accept_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if crate::is_out_of_resources(&e) {
                        tracing::warn!(error = %e, pause = ?self.backoff, "accept failed, backing off");
                        self.accept_gate = Some(now + self.backoff);
                        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        return;
                    }
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }

    /// A new client: its first bytes, its registration, its backend.
    fn start(
        &mut self,
        mut stream: TcpStream,
        from: crate::ClientAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        now: Instant,
        scratch: &mut [MaybeUninit<u8>],
    ) {
        let Some(early) = conn::read_early(&stream) else {
            // Left before a byte: nothing to deliver, no backend bothered, no registration.
            record(&self.proxy.stats, from, Ok(crate::Forwarded::Abandoned));
            return;
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let Ok(s) = u32::try_from(self.slots.len()) else {
                    tracing::warn!("too many connections on one thread");
                    return;
                };
                self.slots.push(Slot { gen: 0, conn: None });
                s
            }
        };
        let gen = self.slots[slot as usize].gen;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token(slot, gen, false),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "registering an accepted connection");
            self.freed.push(slot);
            return;
        }
        let task = self.tracker.token();
        let mut c = Conn::new(
            stream,
            from,
            early,
            token(slot, gen, true),
            permit,
            task,
            now,
        );
        let step = c.connect_next(&mut self.ctx(now, scratch));
        self.live += 1;
        self.settle(slot, gen, c, step, now, None);
    }

    /// Puts a driven connection back in its slot (or ends it), and arms its timer.
    fn settle(
        &mut self,
        slot: u32,
        gen: u32,
        mut c: Conn,
        step: Step,
        now: Instant,
        again: Option<&mut Vec<Key>>,
    ) {
        match step {
            Step::Done(result) => return self.end(slot, c, result),
            Step::Again => {
                if let Some(again) = again {
                    again.push((slot, gen));
                }
            }
            Step::Wait => {}
        }
        if let Some(d) = c.deadline(&self.proxy.forward) {
            if c.timer_at.is_none_or(|t| d < t) {
                c.timer_at = Some(d);
                self.timers.push(d, (slot, gen));
            }
        }
        if self.retire_at.is_none() && c.backend().is_some_and(|b| b.can_close()) {
            self.retire_at = Some(now + RETIRE_LOOK);
        }
        self.slots[slot as usize].conn = Some(c);
    }

    /// Closes a connection and records how it ended.
    fn end(&mut self, slot: u32, c: Conn, result: Result<crate::Forwarded, ForwardError>) {
        let s = &mut self.slots[slot as usize];
        s.gen = (s.gen + 1) & GEN_MASK;
        self.freed.push(slot);
        self.live -= 1;
        let (from, result) = c.finish(result);
        record(&self.proxy.stats, from, result);
        // Both sockets close here, as `c` drops: the kernel takes them out of the epoll set.
    }

    /// Takes the connection out of `slot` if `gen` is still its generation.
    fn take(&mut self, slot: u32, gen: u32) -> Option<Conn> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.gen != gen {
            return None;
        }
        s.conn.take()
    }

    #[allow(clippy::too_many_arguments)]
    fn on_event(
        &mut self,
        slot: u32,
        gen: u32,
        backend: bool,
        ev: &mio::event::Event,
        now: Instant,
        scratch: &mut [MaybeUninit<u8>],
        again: &mut Vec<Key>,
    ) {
        let Some(mut c) = self.take(slot, gen) else {
            return;
        };
        c.on_event(backend, ev);
        let step = c.drive(&mut self.ctx(now, scratch));
        self.settle(slot, gen, c, step, now, Some(again));
    }

    fn drive(
        &mut self,
        slot: u32,
        gen: u32,
        now: Instant,
        scratch: &mut [MaybeUninit<u8>],
        again: &mut Vec<Key>,
    ) {
        let Some(mut c) = self.take(slot, gen) else {
            return;
        };
        let step = c.drive(&mut self.ctx(now, scratch));
        self.settle(slot, gen, c, step, now, Some(again));
    }

    /// A timer entry is due: stale ones (the connection is gone, or holds an earlier
    /// entry) are dropped.
    fn expire(
        &mut self,
        slot: u32,
        gen: u32,
        at: Instant,
        now: Instant,
        scratch: &mut [MaybeUninit<u8>],
        again: &mut Vec<Key>,
    ) {
        let Some(mut c) = self.take(slot, gen) else {
            return;
        };
        if c.timer_at != Some(at) {
            self.slots[slot as usize].conn = Some(c);
            return;
        }
        c.timer_at = None;
        let step = c.expire(&mut self.ctx(now, scratch));
        self.settle(slot, gen, c, step, now, Some(again));
    }

    /// An upgrade quiesces: connections idle since the previous look end.
    fn quiesce_look(&mut self, now: Instant) {
        // Looks come every LOOK while quiescing: a longer gap means a new quiesce.
        let since = match self.quiescing {
            Some((since, last)) if now.duration_since(last) <= QUIESCE_GAP => since,
            _ => now,
        };
        self.quiescing = Some((since, now));
        for slot in 0..self.slots.len() {
            let idle = match &mut self.slots[slot].conn {
                Some(c) => c.quiesce_look(now, since),
                None => false,
            };
            if idle {
                if let Some(c) = self.slots[slot].conn.take() {
                    self.end(slot as u32, c, Err(ForwardError::Quiesced));
                }
            }
        }
    }

    /// Quiescing ended: every connection is driven, so a held client is read again.
    fn resume(&mut self, now: Instant, scratch: &mut [MaybeUninit<u8>], again: &mut Vec<Key>) {
        for slot in 0..self.slots.len() {
            let gen = self.slots[slot].gen;
            self.drive(slot as u32, gen, now, scratch, again);
        }
    }

    /// Ends the connections whose (remote) backend was retired.
    fn retire(&mut self, now: Instant, _scratch: &mut [MaybeUninit<u8>]) {
        let mut retirable = 0;
        for slot in 0..self.slots.len() {
            let Some(b) = self.slots[slot].conn.as_ref().and_then(|c| c.backend()) else {
                continue;
            };
            if !b.can_close() {
                continue;
            }
            if b.is_closing() {
                if let Some(c) = self.slots[slot].conn.take() {
                    self.end(slot as u32, c, Err(ForwardError::Closed));
                }
            } else {
                retirable += 1;
            }
        }
        self.retire_at = (retirable > 0).then(|| now + RETIRE_LOOK);
    }
}

/// Rings `bell` when `stop` or `abort` is cancelled, every [`crate::quiesce::LOOK`]
/// while `quiesce` is on and once when it goes off, until `done` is cancelled (the engine's thread ended). Runs on
/// the master's tokio runtime, where the tokens and the quiesce flag are awaited.
pub async fn relay(
    bell: Arc<Bell>,
    stop: CancellationToken,
    abort: CancellationToken,
    quiesce: Arc<Quiesce>,
    done: CancellationToken,
) {
    // An activity that answered once and then never moved: `idle` resolves one LOOK after
    // quiescing is on (an untouched one would wait for its first bytes' time).
    let never = Activity::default();
    never.to_client();
    let on_stop = async {
        stop.cancelled().await;
        bell.ring();
    };
    let on_abort = async {
        abort.cancelled().await;
        bell.ring();
    };
    let on_quiesce = async {
        loop {
            // Resolves one LOOK after quiescing is on, for an activity that never moves.
            quiesce.idle(&never, || false, || {}).await;
            loop {
                bell.quiesce.store(true, Ordering::Relaxed);
                bell.ring();
                tokio::select! {
                    () = quiesce.resumed() => break,
                    () = tokio::time::sleep(crate::quiesce::LOOK) => {}
                }
            }
            bell.resume.store(true, Ordering::Relaxed);
            bell.ring();
        }
    };
    tokio::select! {
        _ = done.cancelled() => {}
        _ = async { tokio::join!(on_stop, on_abort, on_quiesce) } => {}
    }
}
