//! What the master knows about its workers right now, for the admin endpoint: a small
//! registry the instances update on every state change (never on the per-connection path).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::state::{Reason, State};

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
    /// Which instance it is (the backend key: a replacement in the same slot gets a new one).
    pub instance: u64,
}

/// What a slot has been through, as shown by `/status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SlotStats {
    /// Workers spawned in it, the first included.
    pub spawns: u64,
    /// How its last worker ended (`None` while none has).
    pub last_exit: Option<String>,
}

/// Every live worker instance by backend key, plus what each slot has been through.
#[derive(Debug)]
pub struct Registry {
    workers: Mutex<BTreeMap<u64, WorkerStatus>>,
    /// By slot; grows when the worker count is scaled up.
    slots: Mutex<Vec<SlotStats>>,
    /// Whether any worker has been ready yet: a socket-activated master starts accepting only
    /// then, so the connection that activated it waits in the backlog instead of failing.
    served: tokio::sync::watch::Sender<bool>,
    /// In-place upgrades so far (`/status`'s `upgrades`: what `balancer upgrade` waits on).
    upgrades: std::sync::atomic::AtomicU64,
}

impl Registry {
    /// An empty registry for `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self {
            workers: Mutex::new(BTreeMap::new()),
            slots: Mutex::new(vec![SlotStats::default(); slots]),
            served: tokio::sync::watch::Sender::new(false),
            upgrades: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A worker instance `key` was spawned in `slot`.
    pub fn spawned(&self, key: u64, slot: usize, pid: u32) {
        self.with_slot(slot, |s| s.spawns += 1);
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.starting(key, slot, pid, started, Reason::Spawned);
    }

    /// A worker carried across an in-place upgrade, spawned at `started` (seconds since the
    /// Unix epoch), is instance `key` of `slot` in this image (its spawn was counted before).
    pub fn adopted(&self, key: u64, slot: usize, pid: u32, started: u64) {
        self.with_slot(slot, |_| {});
        self.starting(key, slot, pid, started, Reason::Adopted);
    }

    /// Records instance `key` of `slot` as starting, for `reason` (a spawn or an adoption:
    /// both enter the lifecycle at its first row and move on by [`Self::set`]).
    fn starting(&self, key: u64, slot: usize, pid: u32, started: u64, reason: Reason) {
        self.lock().insert(
            key,
            WorkerStatus {
                slot,
                pid,
                state: State::Starting,
                reason: reason.to_string(),
                addr: None,
                started,
                instance: key,
            },
        );
    }

    /// The slots' histories as the previous master image had them (after an upgrade).
    pub fn restore_slots(&self, slots: Vec<SlotStats>) {
        *self.slots.lock().unwrap_or_else(|p| p.into_inner()) = slots;
    }

    /// How many in-place upgrades this master has been through.
    pub fn upgrades(&self) -> u64 {
        self.upgrades.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the count of in-place upgrades (carried from the previous image, plus one).
    pub fn set_upgrades(&self, n: u64) {
        self.upgrades.store(n, std::sync::atomic::Ordering::Relaxed);
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

    /// Instance `key` was reaped; `how` says why it ended and with what status.
    pub fn gone(&self, key: u64, how: &str) {
        let removed = self.lock().remove(&key);
        if let Some(w) = removed {
            self.with_slot(w.slot, |s| s.last_exit = Some(how.to_owned()));
        }
    }

    /// Every live instance, by slot.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|w| (w.slot, w.started));
        all
    }

    /// Times each slot has spawned a worker (the first start included).
    pub fn spawns(&self) -> Vec<u64> {
        self.slots().iter().map(|s| s.spawns).collect()
    }

    /// Slot `slot` starts anew (scaled up again after it was removed): its history goes.
    pub fn new_slot(&self, slot: usize) {
        self.with_slot(slot, |s| *s = SlotStats::default());
    }

    /// Every slot's history, by slot.
    pub fn slots(&self) -> Vec<SlotStats> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn with_slot(&self, slot: usize, change: impl FnOnce(&mut SlotStats)) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() <= slot {
            slots.resize(slot + 1, SlotStats::default());
        }
        change(&mut slots[slot]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, WorkerStatus>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
