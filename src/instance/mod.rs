//! One worker process's life, from spawn to reaped, as a typed state machine (see
//! `docs/LIFECYCLE.md`). A slot (see [`crate::supervisor`]) owns one [`Instance`] at a time,
//! two during a reload; the instance's own task runs the event loop.
//!
//! One concern per file:
//! - [`crate::state`]: [`State`] and [`Reason`], the vocabulary of the life (and of
//!   `/status`), a leaf module that the registry uses too;
//! - [`context`]: what all instances share ([`Context`], [`StopTokens`]);
//! - [`spawn`]: starting the process, its output relays and its registry entry;
//! - [`run`]: the event loop, routing each event to the `on_*` method that owns it;
//! - [`ipc`]: the channel's reader and its one `send`; [`strikes`]: protocol violations;
//! - [`admission`]: `ready` → probe → `Ready`, and the ready timeout;
//! - [`health`]: checks, `Ready` ⇄ `Down`; [`rotation`]: the backend set and the state;
//! - [`handoff`]: passing accepted clients to a worker; [`node`]: the Node primary's policy;
//! - [`stop`]: `Draining`, `Stopping`, SIGTERM/SIGKILL and reaping.

mod admission;
mod carry;
mod context;
mod handoff;
mod health;
mod ipc;
mod node;
mod process;
mod rotation;
mod run;
mod spawn;

mod stop;
mod strikes;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::state::{Reason, State};
pub use carry::{CarriedWorker, Inherited};
pub use context::{Context, StopTokens};

/// How one worker's life ended.
#[derive(Debug)]
pub struct Ending {
    /// Whether it was ever in rotation.
    pub was_ready: bool,
    /// Why it ended, with its exit status.
    pub reason: String,
    /// The line of its stderr that explains its end (with `--worker-output prefix`), or why
    /// there is none to show.
    pub last_stderr: Option<String>,
    /// Its process exited 0 and left processes running (it forked and let the parent exit,
    /// the classic daemon start): not a crash, but balancer cannot supervise what it left,
    /// which was stopped.
    pub daemonized: bool,
}

/// A running worker instance, driven by its own task.
#[derive(Debug)]
pub struct Instance {
    retire: mpsc::Sender<()>,
    state: watch::Receiver<State>,
    task: JoinHandle<Ending>,
}

impl Instance {
    /// Spawns a worker for `slot` and starts driving it.
    pub fn start(slot: usize, ctx: Arc<Context>, stop: StopTokens) -> Self {
        Self::begin(run::Start::Spawn(slot), ctx, stop)
    }

    /// Takes over a worker carried across an in-place upgrade and starts driving it.
    pub fn adopt(inherited: Inherited, ctx: Arc<Context>, stop: StopTokens) -> Self {
        Self::begin(run::Start::Adopt(Box::new(inherited)), ctx, stop)
    }

    fn begin(start: run::Start, ctx: Arc<Context>, stop: StopTokens) -> Self {
        let (retire, retire_rx) = mpsc::channel(1);
        let (state_tx, state) = watch::channel(State::Starting);
        let task = tokio::spawn(async move {
            let ending = run::run(start, ctx, stop, retire_rx, state_tx.clone()).await;
            state_tx.send_replace(State::Exited);
            ending
        });
        Self {
            retire,
            state,
            task,
        }
    }

    /// Waits until the worker is admitted (`true`) or has ended without being admitted
    /// (`false`).
    pub async fn wait_ready(&mut self) -> bool {
        matches!(
            self.state
                .wait_for(|s| *s != State::Starting)
                .await
                .map(|s| *s),
            Ok(State::Ready | State::Down | State::Draining)
        )
    }

    /// Takes the worker out of rotation, lets its connections finish (up to `--grace`),
    /// then stops it. Returns at once; await [`finished`](Self::finished) for the end.
    pub fn retire(&self) {
        let _ = self.retire.try_send(());
    }

    /// Waits for the worker to be reaped.
    pub async fn finished(&mut self) -> Ending {
        match (&mut self.task).await {
            Ok(ending) => ending,
            Err(e) => Ending {
                was_ready: false,
                reason: Reason::TaskFailed(e.to_string()).to_string(),
                last_stderr: None,
                daemonized: false,
            },
        }
    }
}
