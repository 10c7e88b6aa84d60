//! In-place upgrade of the master (SIGUSR2, `POST /upgrade`, `balancer upgrade`): the
//! binary is executed again from disk *in the same pid*, so a supervisor that is PID 1 in a
//! container or a systemd service's main PID stays what it was. The client listeners, the
//! admin listener and the running workers (with their IPC channels and output pipes)
//! survive the exec; [`handover`] carries their state to the new image.
//!
//! The sequence ([`Upgrader::upgrade`]), each step before the point of no return checked:
//! 1. refused at once (one log line) where it cannot be carried: handoff mode, Node
//!    cluster workers, a worker that is not `ready` (starting, draining, a reload
//!    under way), no worker ready yet under socket activation;
//! 2. [`preflight`]: the binary is an executable file, and `NEWBIN --check ARGS` passes;
//! 3. stop accepting (the listen backlog holds new connections: the sockets stay open) and
//!    let the connections being proxied finish, up to [`DRAIN_LIMIT`] or `--grace`,
//!    whichever is shorter; those still open then are cut by the exec;
//! 4. [`exec`], with the master's signals blocked: the new image finds them pending once
//!    its handlers are installed. If `execve` itself fails, the flags are put back and the
//!    master accepts again.
//!
//! The new image ([`handover::take`], first thing in `run_master`) adopts the listeners
//! instead of binding and the workers instead of spawning: each worker gets an instance
//! waiting for its pid through a pidfd, reading its existing channel, in rotation at once.

mod adopt;
mod exec;
pub mod handover;
mod preflight;

pub use adopt::{bound, restore};

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use worker::protocol::Mode;

use proxy::Connections;

use crate::accept::ProxyThreads;
use crate::instance::Context;
use crate::signals::Signals;
use crate::state::State;
use handover::Handover;

/// Longest wait for proxied connections before the exec: a new connection per request
/// finishes in milliseconds, and a long-lived one (a download, a WebSocket) would hold the
/// upgrade for as long as it lives. `--grace` bounds it further when shorter.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// An upgrade asked for over the admin endpoint, answered once it is refused or under way.
pub type Request = oneshot::Sender<Result<(), String>>;

/// What an upgrade needs from the running master.
#[derive(Debug)]
pub struct Upgrader {
    /// The binary as it was at start-up (`/proc/self/exe` says `(deleted)` once replaced).
    exe: PathBuf,
    /// The master's own arguments, `argv[0]` included.
    args: Vec<OsString>,
    ctx: Arc<Context>,
    /// A duplicate of the admin listener and a Unix socket's path.
    admin: Option<(OwnedFd, Option<PathBuf>)>,
}

impl Upgrader {
    /// Captures the binary's path now, before anyone can replace it.
    pub fn new(args: Vec<OsString>, ctx: Arc<Context>) -> std::io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            args,
            ctx,
            admin: None,
        })
    }

    /// The admin listener to carry (a duplicate of it and a Unix socket's path).
    pub fn carry_admin(&mut self, admin: (OwnedFd, Option<PathBuf>)) {
        self.admin = Some(admin);
    }

    /// Upgrades in place. Returns only if the upgrade was refused or the exec failed (then
    /// the master serves on as before), with the one line that says why.
    pub async fn upgrade(
        &self,
        proxy: &mut ProxyThreads,
        conns: &Connections,
        signals: &mut Signals,
        serving: bool,
        reply: Option<Request>,
    ) -> String {
        let refused = match self.refusal(serving) {
            Some(why) => Err(why),
            None => preflight::check(&self.exe, &self.args[1..]).await,
        };
        if let Err(why) = refused {
            if let Some(r) = reply {
                let _ = r.send(Err(why.clone()));
            }
            return format!("upgrade refused: {why}");
        }
        if let Some(r) = reply {
            let _ = r.send(Ok(()));
            // Lets the admin task write its `202` before the exec; `balancer upgrade` does
            // not depend on it (it reads `/status` afterwards).
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        let config = self.ctx.config();
        let limit = DRAIN_LIMIT.min(config.grace);
        tracing::info!(binary = %self.exe.display(), open_connections = conns.tracker.len(), drain = ?limit, "upgrading in place: stopping accepting, draining connections");
        let started = tokio::time::Instant::now();
        let deadline = started + limit;
        // Every accept loop returns first, so no accepted connection is still on its way
        // into the tracker when the tracker is found empty.
        let paused = tokio::time::timeout_at(deadline, proxy.pause())
            .await
            .is_ok();
        conns.tracker.close();
        // Keep-alive clients would hold the drain for its whole bound, and new clients wait
        // in the backlog meanwhile: their idle connections end now (they retry on a new
        // connection, which the new image accepts).
        let quiesce = &self.ctx.proxy.forward.quiesce;
        quiesce.start();
        let drained = paused
            && tokio::time::timeout_at(deadline, conns.tracker.wait())
                .await
                .is_ok();
        if !drained {
            tracing::warn!(
                open_connections = conns.tracker.len(),
                "upgrade drain over; the exec cuts the connections still open"
            );
        }
        crate::signals::block();
        let pending = signals.pending().await;
        let state = self.state(proxy, &pending);
        tracing::info!(workers = state.workers.len(), drained_in = ?started.elapsed(), "executing the new binary");
        let err = exec::exec(&self.exe, &self.args, &state);
        // The exec failed: this image goes on.
        quiesce.stop();
        crate::signals::unblock();
        for intent in pending {
            // SAFETY: kill with this process's own pid and a valid signal number.
            unsafe { libc::kill(libc::getpid(), intent.signal()) };
        }
        let resumed = match proxy.resume() {
            Ok(()) => "accepting again",
            Err(ref e) => {
                tracing::error!(error = %e, "could not accept again after the failed upgrade");
                "not accepting"
            }
        };
        format!(
            "upgrade failed: exec {}: {err}; the old master serves on ({resumed})",
            self.exe.display()
        )
    }

    /// Why the running master cannot be carried across an exec now, if it cannot.
    fn refusal(&self, serving: bool) -> Option<String> {
        let config = self.ctx.config();
        if config.mode == Mode::Handoff {
            // Connections handed to a worker and not yet answered live in the instance.
            return Some(
                "--mode handoff cannot be carried across an upgrade yet (proxy, shared and reuseport can)"
                    .into(),
            );
        }
        if config.node_cluster {
            return Some("Node cluster workers cannot be carried across an upgrade yet".into());
        }
        if !serving {
            return Some("not accepting yet (no worker has been ready)".into());
        }
        let workers = self.ctx.registry.workers();
        let carried = self.ctx.carried();
        if let Some(w) = workers.iter().find(|w| w.state != State::Ready) {
            return Some(format!(
                "the worker in slot {} (pid {}) is {}; try again once every worker is ready",
                w.slot, w.pid, w.state
            ));
        }
        let mut slots: Vec<usize> = workers.iter().map(|w| w.slot).collect();
        slots.dedup();
        if slots.len() != workers.len() || workers.len() != self.ctx.desired() {
            return Some("a reload or a scaling is under way; try again once it is done".into());
        }
        if let Some(w) = workers
            .iter()
            .find(|w| !carried.iter().any(|c| c.key == w.instance))
        {
            return Some(format!(
                "the worker in slot {} (pid {}) has no descriptors to carry",
                w.slot, w.pid
            ));
        }
        None
    }

    /// The state to hand over, read now (after the drain).
    fn state(&self, proxy: &ProxyThreads, pending: &[crate::signals::Intent]) -> Handover {
        let ctx = &self.ctx;
        // Only workers still ready: one that died during the drain is respawned by the new
        // image like any other empty slot.
        let ready: Vec<u64> = (ctx.registry.workers().into_iter())
            .filter(|w| w.state == State::Ready)
            .map(|w| w.instance)
            .collect();
        Handover {
            version: handover::VERSION,
            mode: ctx.config().mode.as_str().to_owned(),
            listen: ctx.listen,
            proxy_fds: proxy.listener_fds(),
            shared_fd: (ctx.shared_listener.as_ref()).map(|l| l.as_raw_fd()),
            admin: (self.admin.as_ref()).map(|(fd, path)| (fd.as_raw_fd(), path.clone())),
            desired: ctx.desired(),
            slots: ctx.registry.slots(),
            workers: (ctx.carried().into_iter())
                .filter(|w| ready.contains(&w.key))
                .collect(),
            upgrades: ctx.registry.upgrades(),
            pending_signals: pending.iter().map(|i| i.signal()).collect(),
        }
    }
}

/// In the new image, once the signal handlers are installed: unblocks the master's signals
/// (inherited blocked from the old image's exec; harmless at a fresh start) and raises again
/// the ones that arrived while the exec was prepared.
pub fn signals_ready(pending: &[i32]) {
    crate::signals::unblock();
    for &sig in pending {
        // SAFETY: kill with this process's own pid; an invalid number only fails.
        unsafe { libc::kill(libc::getpid(), sig) };
    }
}
