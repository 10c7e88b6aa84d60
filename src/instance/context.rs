//! What every instance of every slot shares: the [`Context`] (configuration, the backend
//! set, the client address, the rotation count, the registry) and the [`StopTokens`] that
//! tell them to stop. Owned by the instance side; the supervisor builds one and hands it to
//! each slot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use proxy::{Backends, Connections, Proxy};

use super::carry::CarriedWorker;
use crate::config::Config;
use crate::orphans::Orphans;
use crate::status::Registry;

/// How instances are told to stop.
#[derive(Debug, Clone, Default)]
pub struct StopTokens {
    /// Stop every worker in order (shutdown message, SIGTERM, SIGKILL after a timeout).
    pub graceful: CancellationToken,
    /// Skip the waiting: SIGKILL whatever is still running.
    pub force: CancellationToken,
    /// The master's drain has started (before `graceful`): every worker is told to drain
    /// now (`shutdown`), so it closes idle keep-alive connections and finishes busy ones
    /// while the master waits for them; none is respawned from now on.
    pub drain: CancellationToken,
}

/// State shared by all slots and instances.
#[derive(Debug)]
pub struct Context {
    /// The validated configuration; replaced when SIGHUP re-reads `--config` (new instances
    /// start with the new one; see [`Context::config`]).
    config: ArcSwap<Config>,
    /// How many slots the supervisor keeps: `--cpus`, then whatever scaling set.
    desired: AtomicUsize,
    /// The backend set the proxy reads (the proxy's own).
    pub backends: Arc<Backends>,
    /// The data path, for connections the master serves itself after a hand-off failed.
    pub proxy: Arc<Proxy>,
    /// Where the data path's connection tasks live (drained and aborted at stop).
    pub conns: Connections,
    /// The address clients connect to (with the real port when `--listen` asked for 0).
    pub listen: SocketAddr,
    /// In shared mode, the listening socket every worker is handed.
    pub shared_listener: Option<Arc<std::net::TcpListener>>,
    /// Worker states, for the admin endpoint.
    pub registry: Arc<Registry>,
    /// The master's adopted children: what workers left behind, told apart from workers.
    pub orphans: Orphans,
    /// Source of unique backend keys (one per worker instance).
    next_key: AtomicU64,
    /// Workers in rotation right now.
    in_rotation: AtomicUsize,
    /// Whether "all workers ready" has been logged at info level already.
    announced_all_ready: AtomicBool,
    /// Admitted workers an in-place upgrade can carry, by backend key.
    carried: Mutex<BTreeMap<u64, CarriedWorker>>,
}

impl Context {
    /// A context for the slots of one master.
    pub fn new(
        config: Arc<Config>,
        proxy: Arc<Proxy>,
        conns: Connections,
        listen: SocketAddr,
        shared_listener: Option<Arc<std::net::TcpListener>>,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            desired: AtomicUsize::new(config.workers),
            config: ArcSwap::new(config),
            backends: Arc::clone(&proxy.backends),
            proxy,
            conns,
            listen,
            shared_listener,
            registry,
            orphans: Orphans::default(),
            next_key: AtomicU64::new(1),
            in_rotation: AtomicUsize::new(0),
            announced_all_ready: AtomicBool::new(false),
            carried: Mutex::new(BTreeMap::new()),
        }
    }

    /// The configuration in force (a new instance reads it once at spawn and keeps it).
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Puts `config` in force for every instance started from now on.
    pub fn set_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// How many slots the supervisor keeps now.
    pub fn desired(&self) -> usize {
        self.desired.load(Ordering::Relaxed)
    }

    /// Scaling changed the number of slots.
    pub fn set_desired(&self, n: usize) {
        self.desired.store(n, Ordering::Relaxed);
    }

    /// A backend key no other instance has.
    pub fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Backend keys from now on start above `key` (after an upgrade, above every carried
    /// worker's).
    pub fn keys_above(&self, key: u64) {
        self.next_key.fetch_max(key + 1, Ordering::Relaxed);
    }

    /// Every admitted worker an upgrade can carry, by slot.
    pub fn carried(&self) -> Vec<CarriedWorker> {
        let mut all: Vec<_> = self.carried_lock().values().cloned().collect();
        all.sort_by_key(|w| w.slot);
        all
    }

    /// Lists an admitted worker as one an upgrade can carry.
    pub(super) fn carry(&self, worker: CarriedWorker) {
        self.carried_lock().insert(worker.key, worker);
    }

    /// Instance `key` ended: its descriptors are about to close.
    pub(super) fn uncarry(&self, key: u64) {
        self.carried_lock().remove(&key);
    }

    fn carried_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CarriedWorker>> {
        self.carried.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Workers in rotation right now.
    pub fn in_rotation(&self) -> usize {
        self.in_rotation.load(Ordering::Relaxed)
    }

    /// Whether every slot has been in rotation at once since the start.
    pub fn all_were_ready(&self) -> bool {
        self.announced_all_ready.load(Ordering::Relaxed)
    }

    /// One more worker in rotation; returns how many are now.
    pub(super) fn entered_rotation(&self) -> usize {
        self.in_rotation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Logs "all workers ready" when `now` workers in rotation is every slot: at info the
    /// first time, at debug after (a worker back from a health flip or a reload).
    pub(super) fn note_all_ready(&self, now: usize) {
        if now == self.desired() {
            if self.announced_all_ready.swap(true, Ordering::Relaxed) {
                tracing::debug!(workers = now, "all workers ready");
            } else {
                tracing::info!(workers = now, "all workers ready");
                crate::systemd::ready(now, self.listen);
            }
        }
    }

    /// One worker fewer in rotation; returns how many are left.
    pub(super) fn left_rotation(&self) -> usize {
        self.in_rotation.fetch_sub(1, Ordering::Relaxed) - 1
    }
}
