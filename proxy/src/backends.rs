//! The backend set and selection: which backends (local workers and remote `--upstream`
//! addresses alike) are in rotation, and which one gets the next connection.
//!
//! The set is an immutable pair of `Vec`s behind an [`ArcSwap`]: the per-connection path
//! (`pick`) takes no lock, only an atomic load and an atomic add; the rare writers (a worker
//! entering or leaving rotation) copy the vectors and swap them in under a mutex of their own.
//!
//! Backends marked down (failing health checks, alive) are kept aside rather than dropped:
//! when *every* backend is down, connections go to all of them (Envoy's panic threshold, at
//! 0 % healthy). Overload makes every backend look sick at once; failing every client then
//! would turn a slowdown into an outage, while a truly dead backend refuses at once and the
//! client is offered to the next.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How the next backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each new connection goes to the next backend in slot order. Exact for sequential
    /// connections: with N backends, N consecutive picks return N different backends.
    #[default]
    RoundRobin,
    /// The backend with the fewest open connections; ties broken round-robin, so a set of
    /// idle backends still shares the load evenly.
    LeastConn,
}

/// One backend in rotation: a local worker or a remote address.
#[derive(Debug)]
pub struct Backend {
    /// Unique per worker *instance*: a replacement in the same slot gets a new key, so a late
    /// `remove` for the old instance never takes the new one out.
    pub key: u64,
    /// The supervisor's slot number, for logs; for a remote backend, its number among the
    /// remote backends (order and logs only).
    pub slot: usize,
    /// For a remote backend, the `--upstream` it was found through (`app:8080`); `None` for
    /// a local worker. Only logs and status read it: the rotation treats both alike.
    pub upstream: Option<Arc<str>>,
    /// Where the worker accepts connections (for a hand-off backend: the client address,
    /// for logs).
    pub addr: SocketAddr,
    /// Set for a worker that takes accepted connections themselves (hand-off): the proxy
    /// passes the client socket here instead of connecting and copying.
    pub handoff: Option<mpsc::Sender<TcpStream>>,
    /// Connections currently forwarded to this backend.
    active: AtomicUsize,
    /// Connections ever forwarded to this backend (for `/status`).
    served: AtomicU64,
    /// Connect failures in a row (reset by a successful connect). Read by the supervisor to
    /// take a failing worker out of rotation between active health checks.
    connect_failures: AtomicU32,
    /// Connections in a row that the backend accepted and then left unanswered for the
    /// response timeout (reset by a connection it answered). Another passive failure: a
    /// backend that accepts and reads but never answers passes a TCP check.
    response_failures: AtomicU32,
    /// Connections that got at least one byte from the backend, ever: passive proof of life,
    /// read by the supervisor so that a worker failing its checks under load (answering the
    /// clients it gets) is not replaced as hung.
    answered: AtomicU64,
    /// Cancelled to close every connection still open to this backend (a remote backend
    /// whose address left DNS, once `--grace` is over). `None` for local workers: they are
    /// stopped instead, and their connections pay nothing for it.
    closing: Option<CancellationToken>,
}

impl Backend {
    /// A remote backend at `addr`, found through `upstream`, not yet in any rotation (see
    /// [`Backends::put`]).
    pub fn remote(key: u64, index: usize, upstream: Arc<str>, addr: SocketAddr) -> Self {
        Self::new(key, index, Some(upstream), addr, None)
    }

    fn new(
        key: u64,
        slot: usize,
        upstream: Option<Arc<str>>,
        addr: SocketAddr,
        handoff: Option<mpsc::Sender<TcpStream>>,
    ) -> Self {
        Self {
            key,
            slot,
            addr,
            handoff,
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            response_failures: AtomicU32::new(0),
            answered: AtomicU64::new(0),
            closing: upstream.is_some().then(CancellationToken::new),
            upstream,
        }
    }

    /// Closes every connection still forwarded to this backend (they end as aborted).
    pub fn close_connections(&self) {
        if let Some(t) = &self.closing {
            t.cancel();
        }
    }

    /// Resolves once [`close_connections`](Self::close_connections) is called; never for a
    /// local worker. Each call waits on a child token of its own: a connection's copy loop
    /// polls this at every wake-up, and a child's lock is that connection's alone, where the
    /// backend's token would be one lock for all its connections.
    pub async fn closed(&self) {
        match &self.closing {
            Some(t) => t.child_token().cancelled_owned().await,
            None => std::future::pending().await,
        }
    }

    /// Whether [`close_connections`](Self::close_connections) was called (never for a
    /// local worker): for the epoll engine and the http pool's sweep, which look instead
    /// of awaiting.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Whether this backend's connections can be closed by it (a remote backend).
    pub(crate) fn can_close(&self) -> bool {
        self.closing.is_some()
    }

    /// [`closed`](Self::closed) as an owned future, for what must hold it across polls (an
    /// HTTP response body still streaming from this backend); `None` for a local worker.
    pub fn closed_owned(&self) -> Option<WaitForCancellationFutureOwned> {
        self.closing
            .as_ref()
            .map(|t| t.child_token().cancelled_owned())
    }

    /// Open connections forwarded to this backend right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Connections forwarded to this backend since it entered rotation.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Connect failures in a row since the last successful connect.
    pub fn connect_failures(&self) -> u32 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// Unanswered connections in a row (see [`ForwardConfig::response_timeout`]).
    ///
    /// [`ForwardConfig::response_timeout`]: crate::ForwardConfig::response_timeout
    pub fn response_failures(&self) -> u32 {
        self.response_failures.load(Ordering::Relaxed)
    }

    /// Connections this backend has answered (see the field's doc).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    pub(crate) fn record_response(&self, answered: bool) {
        if answered {
            self.answered.fetch_add(1, Ordering::Relaxed);
            if self.response_failures.load(Ordering::Relaxed) != 0 {
                self.response_failures.store(0, Ordering::Relaxed);
            }
        } else {
            self.response_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_connect(&self, ok: bool) {
        if ok {
            if self.connect_failures.load(Ordering::Relaxed) != 0 {
                self.connect_failures.store(0, Ordering::Relaxed);
            }
        } else {
            self.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one open connection until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.upstream {
            Some(name) => write!(f, "{name} ({})", self.addr),
            None => write!(f, "slot {} ({})", self.slot, self.addr),
        }
    }
}

/// Rotation order: workers first, by slot; then remote backends.
fn order(b: &Arc<Backend>) -> (bool, usize, u64) {
    (b.upstream.is_some(), b.slot, b.key)
}

/// Holds one unit of [`Backend::active`] for the life of a forwarded connection.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends in rotation (`up`) and those marked down but still alive (`down`).
#[derive(Debug, Default)]
struct Sets {
    up: Vec<Arc<Backend>>,
    down: Vec<Arc<Backend>>,
}

impl Sets {
    /// What picks choose from: the backends up, or in panic (none up) all the down ones.
    fn candidates(&self) -> &[Arc<Backend>] {
        if self.up.is_empty() {
            &self.down
        } else {
            &self.up
        }
    }

    fn panicking(&self) -> bool {
        self.up.is_empty() && !self.down.is_empty()
    }
}

/// The set of backends in rotation.
#[derive(Debug, Default)]
pub struct Backends {
    set: ArcSwap<Sets>,
    next: AtomicUsize,
    /// The [`Policy`], as its `u8`: atomic so that a re-read configuration can change it
    /// while connections pick (one relaxed load per pick).
    policy: AtomicU8,
    /// Serialises writers; readers never take it.
    write: Mutex<()>,
    /// Woken at every change of the set, for [`Self::in_rotation`] (the master waits on it
    /// to start accepting); the per-connection path never touches it.
    changed: tokio::sync::Notify,
}

impl Backends {
    /// An empty set using `policy`.
    pub fn new(policy: Policy) -> Self {
        let set = Self::default();
        set.set_policy(policy);
        set
    }

    /// Changes how the next backends are chosen; picks already made stand.
    pub fn set_policy(&self, policy: Policy) {
        let raw = match policy {
            Policy::RoundRobin => 0,
            Policy::LeastConn => 1,
        };
        self.policy.store(raw, Ordering::Relaxed);
    }

    /// How the next backend is chosen.
    pub fn policy(&self) -> Policy {
        match self.policy.load(Ordering::Relaxed) {
            0 => Policy::RoundRobin,
            _ => Policy::LeastConn,
        }
    }

    /// Puts a worker instance into rotation (replacing any entry with the same key).
    pub fn insert(&self, key: u64, slot: usize, addr: SocketAddr) -> Arc<Backend> {
        self.insert_backend(key, slot, addr, None)
    }

    /// Puts a hand-off worker into rotation: new client sockets for it go to `conns`.
    pub fn insert_handoff(
        &self,
        key: u64,
        slot: usize,
        addr: SocketAddr,
        conns: mpsc::Sender<TcpStream>,
    ) -> Arc<Backend> {
        self.insert_backend(key, slot, addr, Some(conns))
    }

    fn insert_backend(
        &self,
        key: u64,
        slot: usize,
        addr: SocketAddr,
        handoff: Option<mpsc::Sender<TcpStream>>,
    ) -> Arc<Backend> {
        let backend = Arc::new(Backend::new(key, slot, None, addr, handoff));
        self.put(Arc::clone(&backend));
        backend
    }

    /// Puts `backend` into rotation (replacing any entry with the same key, up or down). A
    /// backend that comes back after being down is put again as the same entry, so its open
    /// connections stay counted; its record of failed connects and responses starts clean.
    pub fn put(&self, backend: Arc<Backend>) {
        backend.connect_failures.store(0, Ordering::Relaxed);
        backend.response_failures.store(0, Ordering::Relaxed);
        let key = backend.key;
        self.update(|sets| {
            sets.up.retain(|b| b.key != key);
            sets.down.retain(|b| b.key != key);
            sets.up.push(backend);
            sets.up.sort_by_key(order);
        });
    }

    /// Takes a worker instance out of the set altogether (it is gone, or going). Returns it
    /// if it was in, up or down.
    pub fn remove(&self, key: u64) -> Option<Arc<Backend>> {
        let mut found = None;
        self.update(|sets| {
            for list in [&mut sets.up, &mut sets.down] {
                if let Some(i) = list.iter().position(|b| b.key == key) {
                    found = Some(list.remove(i));
                }
            }
        });
        found
    }

    /// Takes a worker instance out of rotation but keeps it aside: it gets connections
    /// again only if every backend is down (panic). Returns it if it was up.
    pub fn mark_down(&self, key: u64) -> Option<Arc<Backend>> {
        let mut found = None;
        self.update(|sets| {
            if let Some(i) = sets.up.iter().position(|b| b.key == key) {
                let b = sets.up.remove(i);
                found = Some(Arc::clone(&b));
                sets.down.push(b);
                sets.down.sort_by_key(order);
            }
        });
        found
    }

    /// Copies the sets, applies `change`, swaps the result in, and logs a change of panic.
    fn update(&self, change: impl FnOnce(&mut Sets)) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.set.load_full();
        let mut next = Sets {
            up: current.up.clone(),
            down: current.down.clone(),
        };
        change(&mut next);
        match (current.panicking(), next.panicking()) {
            (false, true) => tracing::warn!(
                down = next.down.len(),
                "every backend is down: sending to all of them until one is up (panic mode)"
            ),
            (true, false) if next.up.is_empty() => {
                tracing::warn!("panic mode over: no backend left")
            }
            (true, false) => tracing::info!(up = next.up.len(), "panic mode over: a backend is up"),
            _ => {}
        }
        self.set.store(Arc::new(next));
        self.changed.notify_waiters();
    }

    /// Resolves once some backend is in rotation (at once if one is), local or remote.
    pub async fn in_rotation(&self) {
        loop {
            // Registered before the check, so a change between the two is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// Whether the instance `key` is in rotation (up).
    #[cfg(test)]
    pub fn contains(&self, key: u64) -> bool {
        self.set.load().up.iter().any(|b| b.key == key)
    }

    /// How many backends are in rotation (up).
    pub fn len(&self) -> usize {
        self.set.load().up.len()
    }

    /// How many backends are marked down but kept aside for panic mode.
    pub fn down(&self) -> usize {
        self.set.load().down.len()
    }

    /// Whether every backend is down, so picks choose among the down ones.
    pub fn panicking(&self) -> bool {
        self.set.load().panicking()
    }

    /// Whether no backend is in rotation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the backends in rotation (up), for status pages and tests.
    pub fn snapshot(&self) -> Vec<Arc<Backend>> {
        self.set.load().up.clone()
    }

    /// Chooses the backend for a new connection, or `None` when the set is empty. Chooses
    /// among the backends up, or in panic mode among all the down ones.
    pub fn pick(&self) -> Option<Arc<Backend>> {
        self.pick_excluding(&[])
    }

    /// Like [`pick`](Self::pick), skipping the keys in `tried` (a retry after a refused
    /// connect must not land on the same worker). Bounded: one pass over the set at most.
    pub fn pick_excluding(&self, tried: &[u64]) -> Option<Arc<Backend>> {
        let sets = self.set.load();
        let set = sets.candidates();
        let n = set.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|i| &set[(start + i) % n])
            .filter(|b| !tried.contains(&b.key));
        match self.policy() {
            Policy::RoundRobin => candidates.into_iter().next().cloned(),
            // `min_by_key` keeps the first minimum, and candidates start at the round-robin
            // offset: that is the tie-break.
            Policy::LeastConn => candidates.min_by_key(|b| b.active()).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test]
    async fn in_rotation_wakes_on_the_first_backend() {
        let set = Arc::new(Backends::new(Policy::RoundRobin));
        let waiting = tokio::spawn({
            let set = Arc::clone(&set);
            async move { set.in_rotation().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        set.insert(1, 0, "127.0.0.1:1".parse().unwrap());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        // At once when one already is.
        set.in_rotation().await;
    }

    fn set(policy: Policy, n: u16) -> Backends {
        let b = Backends::new(policy);
        for i in 0..n {
            b.insert(u64::from(i) + 100, usize::from(i), addr(1000 + i));
        }
        b
    }

    #[test]
    fn round_robin_is_exact_for_sequential_picks() {
        let b = set(Policy::RoundRobin, 3);
        for _ in 0..4 {
            let mut slots: Vec<_> = (0..3).map(|_| b.pick().unwrap().slot).collect();
            slots.sort();
            assert_eq!(slots, vec![0, 1, 2]);
        }
    }

    #[test]
    fn empty_set_picks_nothing() {
        let b = Backends::new(Policy::RoundRobin);
        assert!(b.pick().is_none());
        assert!(b.is_empty());
    }

    #[test]
    fn removal_is_by_instance_key() {
        let b = set(Policy::RoundRobin, 2);
        // A replacement of slot 0 with a new key...
        b.insert(7, 0, addr(2000));
        // ...is not removed by the old instance's late removal of a different key.
        assert!(b.remove(999).is_none());
        assert!(b.remove(100).is_some());
        assert!(b.contains(7));
        assert_eq!(b.len(), 2);
        assert!((0..10).all(|_| b.pick().unwrap().key != 100));
    }

    #[test]
    fn retries_skip_tried_backends() {
        let b = set(Policy::RoundRobin, 3);
        let first = b.pick().unwrap();
        let second = b.pick_excluding(&[first.key]).unwrap();
        assert_ne!(first.key, second.key);
        let third = b.pick_excluding(&[first.key, second.key]).unwrap();
        assert!(third.key != first.key && third.key != second.key);
        assert!(b.pick_excluding(&[100, 101, 102]).is_none());
    }

    #[test]
    fn all_down_is_panic_mode_and_one_up_ends_it() {
        let b = set(Policy::RoundRobin, 2);
        assert!(b.mark_down(100).is_some());
        // One up: only it gets connections.
        assert!((0..4).all(|_| b.pick().unwrap().key == 101));
        assert!(!b.panicking());
        assert!(b.mark_down(101).is_some());
        // None up: all the down ones share the connections.
        assert!(b.panicking() && b.is_empty() && b.down() == 2);
        let mut keys: Vec<_> = (0..2).map(|_| b.pick().unwrap().key).collect();
        keys.sort();
        assert_eq!(keys, vec![100, 101]);
        // Back up (re-inserted by a passing check): panic over, the other one waits.
        b.insert(101, 1, addr(1001));
        assert!(!b.panicking() && b.down() == 1);
        assert!((0..4).all(|_| b.pick().unwrap().key == 101));
        // Gone for good: out of both lists.
        assert!(b.remove(100).is_some() && b.down() == 0);
        assert!(b.remove(101).is_some() && b.pick().is_none() && !b.panicking());
    }

    #[test]
    fn remote_backends_share_the_rotation_and_keep_their_counts() {
        let b = set(Policy::RoundRobin, 2);
        let remote = Arc::new(Backend::remote(1 << 63, 0, "app:8080".into(), addr(3000)));
        b.put(Arc::clone(&remote));
        assert_eq!(b.len(), 3);
        // Workers first, then the remote backend.
        assert_eq!(b.snapshot()[2].key, 1 << 63);
        let mut picked: Vec<_> = (0..3).map(|_| b.pick().unwrap().key).collect();
        picked.sort();
        assert_eq!(picked, vec![100, 101, 1 << 63]);
        assert_eq!(remote.to_string(), "app:8080 (127.0.0.1:3000)");
        // Out and back in as the same entry: an open connection stays counted, the failed
        // connects are forgotten.
        let guard = remote.open();
        remote.record_connect(false);
        assert!(b.remove(1 << 63).is_some());
        b.put(Arc::clone(&remote));
        assert_eq!(remote.connect_failures(), 0);
        assert_eq!(b.snapshot()[2].active(), 1);
        drop(guard);
        assert_eq!(remote.active(), 0);
    }

    #[tokio::test]
    async fn closing_a_backend_wakes_its_connections() {
        let remote = Backend::remote(1, 0, "app:1".into(), addr(1));
        let waiter = remote.closed();
        remote.close_connections();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("closed() resolves once close_connections() is called");
    }

    #[test]
    fn least_conn_prefers_idle_and_breaks_ties_round_robin() {
        let b = set(Policy::LeastConn, 2);
        let busy = b.snapshot()[0].clone();
        let _g = busy.open();
        for _ in 0..5 {
            assert_eq!(b.pick().unwrap().slot, 1);
        }
        drop(_g);
        let mut slots: Vec<_> = (0..2).map(|_| b.pick().unwrap().slot).collect();
        slots.sort();
        assert_eq!(slots, vec![0, 1]);
    }
}
