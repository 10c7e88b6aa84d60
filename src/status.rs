//! What the master knows about its workers right now, for the admin endpoint: a small
//! registry the instances update on every state change (never on the per-connection path).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::instance::{Reason, State};

/// One worker instance, as shown by `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    /// Its slot.
    pub slot: usize,
    /// Its pid.
    pub pid: u32,
    /// Where it is in its life (serialized as the state's word: `starting`, `ready`, …).
    pub state: State,
    /// Why it is in that state (the last transition's reason).
    pub reason: String,
    /// Where it accepts, once admitted.
    pub addr: Option<String>,
    /// When it was spawned, seconds since the Unix epoch.
    pub started: u64,
}

/// Every live worker instance by backend key, plus spawn counts per slot.
#[derive(Debug)]
pub struct Registry {
    workers: Mutex<BTreeMap<u64, WorkerStatus>>,
    spawns: Vec<AtomicU64>,
    /// Whether any worker has been ready yet: a socket-activated master starts accepting only
    /// then, so the connection that activated it waits in the backlog instead of failing.
    served: tokio::sync::watch::Sender<bool>,
}

impl Registry {
    /// An empty registry for `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self {
            workers: Mutex::new(BTreeMap::new()),
            spawns: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            served: tokio::sync::watch::Sender::new(false),
        }
    }

    /// A worker instance `key` was spawned in `slot`.
    pub fn spawned(&self, key: u64, slot: usize, pid: u32) {
        if let Some(n) = self.spawns.get(slot) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.lock().insert(
            key,
            WorkerStatus {
                slot,
                pid,
                state: State::Starting,
                reason: Reason::Spawned.to_string(),
                addr: None,
                started,
            },
        );
    }

    /// Instance `key` moved to `state` for `reason`.
    pub fn set(&self, key: u64, state: State, reason: &Reason, addr: Option<std::net::SocketAddr>) {
        if state == State::Ready {
            self.served
                .send_if_modified(|served| !std::mem::replace(served, true));
        }
        if let Some(w) = self.lock().get_mut(&key) {
            w.state = state;
            w.reason = reason.to_string();
            if let Some(a) = addr {
                w.addr = Some(a.to_string());
            }
        }
    }

    /// Resolves once some worker has been ready (at once if one has).
    pub async fn first_ready(&self) {
        let mut served = self.served.subscribe();
        // The sender lives as long as `self`, so this cannot see a closed channel.
        let _ = served.wait_for(|served| *served).await;
    }

    /// Instance `key` was reaped.
    pub fn gone(&self, key: u64) {
        self.lock().remove(&key);
    }

    /// Every live instance, by slot.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|w| (w.slot, w.started));
        all
    }

    /// Times each slot has spawned a worker (the first start included).
    pub fn spawns(&self) -> Vec<u64> {
        self.spawns
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, WorkerStatus>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
