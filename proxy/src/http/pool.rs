//! Keep-alive HTTP/1.1 connections to the backends, one pool per proxy thread, over
//! hyper's own client connection (`hyper::client::conn::http1`).
//!
//! Hand-written, replacing hyper-util's legacy client, because that client's pool was a
//! measured share of every request (bench/NOTES.md, "http mode (#15)": ≈3.5k instructions
//! per request for SipHashing its `(Scheme, Authority)` key twice, its lock and a task
//! spawned per response to wait for the connection to be ready again), and it wants an
//! absolute URI built per request to key on. Here the key is the backend's socket address,
//! the idle connections of a backend are a short `Vec` found by a scan (a thread talks to
//! a handful of backends), and a connection goes back to its list when its response body
//! has been read to the end, from the body itself, with no task.
//!
//! The rules are hyper-util's:
//! - at most `--`[`POOL_MAX_IDLE`] idle connections per backend (past it, a connection
//!   whose response is done is closed), each closed after [`POOL_IDLE_TIMEOUT`] idle
//!   (checked when the list is used, and by a sweep every quarter of the timeout);
//! - the newest idle connection is used first (the oldest are the likeliest to be closed
//!   by the backend's own keep-alive timer);
//! - a connection is reused only after its whole response was read: one whose body the
//!   client abandoned, that failed, or that was upgraded (101) is never given back;
//! - a connection belongs to the backend *instance* it was made for ([`Pool::send_to`]),
//!   not only to its address: a remote backend retired (its address left DNS, its
//!   `--grace` over) and found again at the same address is a new instance, which never
//!   gets the old one's connections; and the sweep closes the idle connections of an
//!   instance that is gone or was cut, rather than leave them open to the retired address
//!   until the idle timeout;
//! - a request that never got a byte out on a reused connection (the backend closed it
//!   while idle, and hyper saw it before writing) is sent again on the next connection, a
//!   fresh one at last, whatever its method: the backend never saw it. A request that did
//!   go out is not sent again here; the retry policy ([`super::retry`]) decides.
//!
//! The lock: connection tasks are spawned on the thread's runtime with `tokio::spawn`,
//! which wants `Send` futures, so the pool is shared through an `Arc<Mutex<_>>`. Only the
//! one thread ever takes it, so it is never contended: an uncontended lock is two atomic
//! operations.
//!
//! [`POOL_MAX_IDLE`]: super::POOL_MAX_IDLE
//! [`POOL_IDLE_TIMEOUT`]: super::POOL_IDLE_TIMEOUT

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::backends::Backend;
use crate::connect::{self, Connecting};

/// Why no connection to a backend could be made (nothing was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect failed (refused, unreachable, reset).
    #[error("connect")]
    Io(#[source] std::io::Error),
    /// The connect did not finish within the connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// hyper refused the new connection (does not happen for HTTP/1 over TCP).
    #[error("starting the http/1 connection")]
    Handshake(#[source] hyper::Error),
}

/// Why a request sent to a backend got no response head.
#[derive(Debug)]
pub enum SendError<B> {
    /// No connection: nothing was sent, and here is the request back, whole (its body
    /// not polled), for another backend.
    Connect {
        /// Why.
        source: ConnectError,
        /// The request (boxed: this is the rare path, and the result stays small).
        request: Box<Request<B>>,
    },
    /// The connection failed before a response head came (the request may have been
    /// sent).
    Backend(hyper::Error),
}

/// One proxy thread's connections to all backends, sending request bodies of type `B`
/// (the proxy's is [`ReplayBody`](super::replay::ReplayBody)). Cloning shares them.
pub struct Pool<B>(Arc<Shared<B>>);

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field(
                "idle",
                &self.0.lists().iter().map(|l| l.conns.len()).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

struct Shared<B> {
    /// One list per backend address that has idle connections.
    idle: Mutex<Vec<List<B>>>,
    /// Idle connections kept per backend.
    max_idle: usize,
    /// How long a connection may stay idle.
    idle_timeout: Duration,
    /// How long a connect may take.
    connect_timeout: Duration,
    /// Settings of each new connection.
    builder: http1::Builder,
}

/// The idle connections to one backend instance, oldest first.
struct List<B> {
    addr: SocketAddr,
    /// The instance they were made for; `None` for connections made with [`Pool::send`].
    owner: Option<Owner>,
    conns: Vec<Idle<B>>,
}

/// The backend instance a list's connections belong to.
#[derive(Clone)]
struct Owner {
    /// Its [`Backend::key`] (unique per instance).
    key: u64,
    /// Gone once the instance has left the backend set and finished its responses.
    backend: Weak<Backend>,
}

impl Owner {
    fn of(backend: &Arc<Backend>) -> Self {
        Self {
            key: backend.key,
            backend: Arc::downgrade(backend),
        }
    }

    /// The instance is gone, or its connections were cut (`--grace` over).
    fn gone(&self) -> bool {
        self.backend.upgrade().is_none_or(|b| b.is_closing())
    }
}

/// Which list a connection belongs to: the address, and the owner's key.
fn same<B>(list: &List<B>, addr: SocketAddr, key: Option<u64>) -> bool {
    list.addr == addr && list.owner.as_ref().map(|o| o.key) == key
}

struct Idle<B> {
    tx: SendRequest<B>,
    /// When it went idle.
    since: Instant,
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// An empty pool keeping up to `max_idle` idle connections per backend for
    /// `idle_timeout`, connecting within `connect_timeout`. Inside a runtime it starts
    /// the sweep that closes connections left idle too long (it ends with the pool).
    pub fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Self {
        let builder = http1::Builder::new();
        let shared = Arc::new(Shared {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
            builder,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep(Arc::downgrade(&shared), idle_timeout));
        }
        Self(shared)
    }

    /// Sends `req` (origin-form URI, `Host` set) to `backend` on an idle connection made
    /// for that instance, or a new one. The response body gives the connection back when
    /// read to its end.
    pub async fn send_to(
        &self,
        backend: &Arc<Backend>,
        req: Request<B>,
    ) -> Result<Response<Pooled<B>>, SendError<B>> {
        self.send_as(backend.addr, Some(Owner::of(backend)), req)
            .await
    }

    /// [`send_to`](Self::send_to) an address with no backend instance behind it: its
    /// connections are only ever closed by the backend, an error or the idle timeout.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<B>,
    ) -> Result<Response<Pooled<B>>, SendError<B>> {
        self.send_as(addr, None, req).await
    }

    async fn send_as(
        &self,
        addr: SocketAddr,
        owner: Option<Owner>,
        mut req: Request<B>,
    ) -> Result<Response<Pooled<B>>, SendError<B>> {
        let key = owner.as_ref().map(|o| o.key);
        loop {
            let (mut tx, reused) = match self.checkout(addr, key).await {
                Some(tx) => (tx, true),
                None => match self.connect(addr).await {
                    Ok(tx) => (tx, false),
                    Err(source) => {
                        return Err(SendError::Connect {
                            source,
                            request: Box::new(req),
                        })
                    }
                },
            };
            match tx.try_send_request(req).await {
                Ok(response) => return Ok(self.track(addr, owner, tx, response)),
                Err(mut e) => match e.take_message() {
                    // The backend closed it while idle and hyper saw that before writing
                    // anything: the backend never saw the request. Each turn drops one
                    // pooled connection, so the loop ends on a fresh one at the latest.
                    Some(back) if reused => {
                        tracing::debug!(%addr, error = %e.error(), "pooled connection closed; sending on another");
                        req = back;
                    }
                    _ => return Err(SendError::Backend(e.into_error())),
                },
            }
        }
    }

    /// The newest usable idle connection to `addr`, dropping closed and expired ones on
    /// the way. One given back a moment ago may not be ready yet (its task has not run
    /// since its response ended): it gets one turn of the scheduler. One still not ready
    /// is busy for longer (the backend answered before the request body was all sent, and
    /// that body is still coming): it is kept, as the oldest, and a new connection made.
    async fn checkout(&self, addr: SocketAddr, key: Option<u64>) -> Option<SendRequest<B>> {
        let idle = self.0.take(addr, key, Instant::now())?;
        if idle.tx.is_ready() {
            return Some(idle.tx);
        }
        tokio::task::yield_now().await;
        if idle.tx.is_ready() {
            return Some(idle.tx);
        }
        self.0.keep_oldest(addr, key, idle);
        None
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<B>, ConnectError> {
        let stream = match connect::start(addr, &[]).map_err(ConnectError::Io)? {
            Connecting::Done { stream, .. } => stream,
            Connecting::Pending(stream) => {
                let timeout = self.0.connect_timeout;
                tokio::time::timeout(timeout, connect::finish(stream))
                    .await
                    .map_err(|_| ConnectError::Timeout(timeout))?
                    .map_err(ConnectError::Io)?
            }
        };
        let (tx, conn) = self
            .0
            .builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// `response`'s body, holding `tx` until the body is read (then back in the pool).
    fn track(
        &self,
        addr: SocketAddr,
        owner: Option<Owner>,
        tx: SendRequest<B>,
        response: Response<Incoming>,
    ) -> Response<Pooled<B>> {
        // An upgraded connection is the client's now; it never comes back.
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        let pool = self.clone();
        response.map(|inner| {
            let mut body = Pooled {
                inner,
                back: Some(Back {
                    pool,
                    addr,
                    owner,
                    tx,
                }),
                reusable,
            };
            body.give_back_if_done();
            body
        })
    }
}

impl<B> Pool<B> {
    /// Idle connections to `addr`, all instances (closed ones not yet dropped included),
    /// for tests and the log.
    pub fn idle(&self, addr: SocketAddr) -> usize {
        self.0
            .lists()
            .iter()
            .filter(|l| l.addr == addr)
            .map(|l| l.conns.len())
            .sum()
    }
}

impl<B> Shared<B> {
    fn lists(&self) -> MutexGuard<'_, Vec<List<B>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the newest idle connection to `addr` made for the owner `key` that is neither
    /// closed nor expired.
    fn take(&self, addr: SocketAddr, key: Option<u64>, now: Instant) -> Option<Idle<B>> {
        let mut lists = self.lists();
        let list = lists.iter_mut().find(|l| same(l, addr, key))?;
        while let Some(idle) = list.conns.pop() {
            if idle.tx.is_closed() {
                continue;
            }
            if now.saturating_duration_since(idle.since) >= self.idle_timeout {
                // Older ones are older still.
                list.conns.clear();
                return None;
            }
            return Some(idle);
        }
        None
    }

    /// Puts `idle` back as the oldest of `addr`'s (the last to be tried), if there is room.
    fn keep_oldest(&self, addr: SocketAddr, key: Option<u64>, idle: Idle<B>) {
        let mut lists = self.lists();
        if let Some(list) = lists.iter_mut().find(|l| same(l, addr, key)) {
            if list.conns.len() < self.max_idle {
                list.conns.insert(0, idle);
                return;
            }
        }
        drop(lists);
        drop(idle);
    }

    /// Keeps `tx` as idle for `addr` and `owner` unless that backend has its fill.
    fn put(&self, addr: SocketAddr, owner: Option<Owner>, tx: SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        let idle = Idle {
            tx,
            since: Instant::now(),
        };
        let key = owner.as_ref().map(|o| o.key);
        let mut lists = self.lists();
        let list = match lists.iter().position(|l| same(l, addr, key)) {
            Some(i) => &mut lists[i],
            None => {
                lists.push(List {
                    addr,
                    owner,
                    conns: Vec::new(),
                });
                let last = lists.len() - 1;
                &mut lists[last]
            }
        };
        if list.conns.len() < self.max_idle {
            list.conns.push(idle);
            return;
        }
        // Full: this one is closed, outside the lock (dropping it wakes its task).
        drop(lists);
        drop(idle);
    }

    /// Drops closed and expired connections, those of backend instances gone or cut, and
    /// lists left empty.
    fn sweep(&self, now: Instant) {
        let mut lists = self.lists();
        lists.retain(|l| !l.owner.as_ref().is_some_and(Owner::gone));
        for list in lists.iter_mut() {
            list.conns.retain(|c| {
                !c.tx.is_closed() && now.saturating_duration_since(c.since) < self.idle_timeout
            });
        }
        lists.retain(|l| !l.conns.is_empty());
    }
}

/// Sweeps `pool` every quarter of `idle_timeout` (so no connection stays idle more than
/// 1.25 × the timeout with no request to its backend) until the pool is dropped.
async fn sweep<B>(pool: Weak<Shared<B>>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep(Instant::now());
    }
}

/// What a [`Pooled`] body gives back at its end.
struct Back<B> {
    pool: Pool<B>,
    addr: SocketAddr,
    owner: Option<Owner>,
    tx: SendRequest<B>,
}

/// A backend's response body; its connection goes back to the pool once the body has
/// been read to its end (or was empty), and is closed if the body is dropped before.
pub struct Pooled<B> {
    inner: Incoming,
    back: Option<Back<B>>,
    /// False for a 101: that connection is upgraded, not reused.
    reusable: bool,
}

impl<B> std::fmt::Debug for Pooled<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled")
            .field("inner", &self.inner)
            .field("pooled", &self.back.is_some())
            .finish()
    }
}

impl<B> Pooled<B> {
    fn give_back_if_done(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            if self.reusable {
                back.pool.0.put(back.addr, back.owner, back.tx);
            }
        }
    }
}

impl<B> Drop for Pooled<B> {
    fn drop(&mut self) {
        // A body nobody polled to its end may still be whole (HEAD, 204, 304, or a
        // length-delimited body whose last chunk was read).
        self.give_back_if_done();
    }
}

impl<B> Body for Pooled<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) => this.give_back_if_done(),
            // That connection is broken: closed with its sender.
            Poll::Ready(Some(Err(_))) => this.back = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full};
    use tokio::net::TcpListener;

    /// Longest any single step may take.
    const STEP: Duration = Duration::from_secs(10);

    /// A hyper backend that counts the connections it accepted and those that ended.
    /// `/` answers `ok`; `/slow` after 100 ms; `/stream` a chunked body that never ends.
    struct Counting {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Counting {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn counting() -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (a, e) = (Arc::clone(&accepted), Arc::clone(&ended));
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let e = Arc::clone(&e);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = match req.uri().path() {
                            "/slow" => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Full::new(Bytes::from_static(b"slow")).boxed()
                            }
                            "/stream" => Stalls(Some(Bytes::from_static(b"chunk"))).boxed(),
                            _ => Full::new(Bytes::from_static(b"ok")).boxed(),
                        };
                        Ok::<_, std::io::Error>(Response::new(body))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Counting {
            addr,
            accepted,
            ended,
            task,
        }
    }

    /// A chunked body: one chunk, then nothing for ever.
    struct Stalls(Option<Bytes>);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.get_mut().0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    fn pool(max_idle: usize, idle_timeout: Duration) -> Pool<Empty<Bytes>> {
        Pool::new(max_idle, idle_timeout, STEP)
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header("host", "backend.test")
            .body(Empty::new())
            .unwrap()
    }

    async fn body<B>(resp: Response<Pooled<B>>) -> Bytes {
        tokio::time::timeout(STEP, resp.into_body().collect())
            .await
            .expect("body in time")
            .expect("whole body")
            .to_bytes()
    }

    /// Polls `cond` until it holds or STEP is over.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + STEP;
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within {STEP:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let b = counting().await;
        let pool = pool(4, STEP);
        for _ in 0..3 {
            let resp = pool.send(b.addr, get("/")).await.expect("a response");
            assert_eq!(body(resp).await, "ok");
            assert_eq!(pool.idle(b.addr), 1);
        }
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let b = counting().await;
        let pool = pool(4, STEP);
        let resp = pool.send(b.addr, get("/stream")).await.expect("a response");
        let mut partial = resp.into_body();
        let first = tokio::time::timeout(STEP, partial.frame()).await.unwrap();
        assert!(first.is_some());
        drop(partial);
        assert_eq!(pool.idle(b.addr), 0);
        eventually("backend sees the close", || {
            b.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        let resp = pool.send(b.addr, get("/")).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let b = counting().await;
        let timeout = Duration::from_secs(8);
        let pool = pool(4, timeout);
        let resp = pool.send(b.addr, get("/")).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(pool.idle(b.addr), 1);
        // Just short of the timeout (and past a sweep): still there, and used.
        tokio::time::sleep(timeout - Duration::from_secs(1)).await;
        assert_eq!(pool.idle(b.addr), 1);
        let resp = pool.send(b.addr, get("/")).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        // Left alone past the timeout: the sweep closes it, with no request to trigger it.
        tokio::time::sleep(timeout + timeout / 4).await;
        assert_eq!(pool.idle(b.addr), 0);
        eventually("backend sees the close", || {
            b.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        // And a request after that opens a new one.
        let resp = pool.send(b.addr, get("/")).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_per_backend_are_bounded() {
        let b = counting().await;
        let other = counting().await;
        let pool = pool(2, STEP);
        // Three at once: none idle yet, so three connections.
        let (r1, r2, r3) = tokio::join!(
            pool.send(b.addr, get("/slow")),
            pool.send(b.addr, get("/slow")),
            pool.send(b.addr, get("/slow")),
        );
        for r in [r1, r2, r3] {
            assert_eq!(body(r.expect("a response")).await, "slow");
        }
        assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
        // Two kept, the third closed.
        assert_eq!(pool.idle(b.addr), 2);
        eventually("backend sees one close", || {
            b.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        // The bound is per backend: another one has its own.
        let resp = pool.send(other.addr, get("/")).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(pool.idle(other.addr), 1);
        assert_eq!(pool.idle(b.addr), 2);
    }

    /// A raw backend on its own thread: answers each connection's first request with a
    /// keep-alive response, then closes that connection when told on `close` and says so
    /// on `closed`.
    fn closes_when_told() -> (
        SocketAddr,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (close_tx, close) = std::sync::mpsc::channel();
        let (closed, closed_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                if close.recv_timeout(STEP).is_err() {
                    return;
                }
                drop(s);
                if closed.send(()).is_err() {
                    return;
                }
            }
        });
        (addr, close_tx, closed_rx)
    }

    /// Idle connections to `addr` whose task has not ended.
    fn open_idle<B>(pool: &Pool<B>, addr: SocketAddr) -> usize {
        pool.0
            .lists()
            .iter()
            .filter(|l| l.addr == addr)
            .flat_map(|l| l.conns.iter())
            .filter(|c| !c.tx.is_closed())
            .count()
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_while_idle_is_not_used() {
        let (addr, close, closed) = closes_when_told();
        let pool: Pool<Full<Bytes>> = Pool::new(4, STEP, STEP);
        let post = || {
            Request::post("/")
                .header("host", "backend.test")
                .body(Full::new(Bytes::from_static(b"once")))
                .unwrap()
        };
        let resp = pool.send(addr, post()).await.expect("first response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(pool.idle(addr), 1);
        close.send(()).unwrap();
        closed.recv_timeout(STEP).expect("backend closed");
        // The connection's task sees the end; the pool still lists it until next used.
        eventually("the pool sees the close", || open_idle(&pool, addr) == 0).await;
        assert_eq!(pool.idle(addr), 1);
        // A POST (never replayed by the retry policy) gets through on a new connection.
        close.send(()).unwrap();
        let resp = pool.send(addr, post()).await.expect("second response");
        assert_eq!(body(resp).await, "ok");
        // It was a second connection (this backend answers one request per connection).
        closed.recv_timeout(STEP).expect("the second connection");
    }

    #[tokio::test]
    async fn a_connection_whose_request_body_is_still_going_out_is_not_waited_for() {
        use http_body_util::combinators::BoxBody;
        let b = counting().await;
        let pool: Pool<BoxBody<Bytes, std::convert::Infallible>> = Pool::new(4, STEP, STEP);
        // The backend answers `/` without reading the body; this one never ends.
        let endless = Request::post("/")
            .header("host", "backend.test")
            .header("transfer-encoding", "chunked")
            .body(Stalls(Some(Bytes::from_static(b"part"))).boxed())
            .unwrap();
        let resp = pool.send(b.addr, endless).await.expect("a response");
        assert_eq!(body(resp).await, "ok");
        let get = Request::get("/")
            .header("host", "backend.test")
            .body(Empty::new().boxed())
            .unwrap();
        let resp = tokio::time::timeout(STEP, pool.send(b.addr, get))
            .await
            .expect("not stuck behind the busy connection")
            .expect("a response");
        assert_eq!(body(resp).await, "ok");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = pool(4, STEP);
        match pool.send(addr, get("/")).await {
            Err(SendError::Connect {
                source: ConnectError::Io(e),
                request,
            }) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                assert_eq!(request.uri(), "/", "the request comes back");
            }
            other => panic!("not a refused connect: {other:?}"),
        }
    }
}
