//! A worker's membership of the backend set and the publication of its [`State`]: entering
//! and leaving rotation, each with its log line, its state (in the registry, for `/status`,
//! and on the instance's watch, for its slot) and the master-wide rotation count.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use proxy::Backend;
use worker::protocol::Mode;

use super::context::Context;
use crate::state::{Reason, State};

/// One worker's place in the backend set.
pub(super) struct Rotation {
    ctx: Arc<Context>,
    slot: usize,
    pid: u32,
    key: u64,
    /// The state as the slot sees it (see [`super::Instance::wait_ready`]).
    state: watch::Sender<State>,
    /// The backend entry while in rotation, and the last one after (to count its
    /// connections while draining).
    backend: Option<Arc<Backend>>,
    in_rotation: bool,
    /// Set for a hand-off worker: the queue the proxy puts its clients in.
    pub(super) handoff: Option<mpsc::Sender<TcpStream>>,
}

impl Rotation {
    /// Out of rotation, as a worker starts.
    pub(super) fn new(
        ctx: Arc<Context>,
        slot: usize,
        pid: u32,
        key: u64,
        state: watch::Sender<State>,
    ) -> Self {
        Self {
            ctx,
            slot,
            pid,
            key,
            state,
            backend: None,
            in_rotation: false,
            handoff: None,
        }
    }

    /// Puts the worker in rotation at `addr` (no-op if it is already).
    pub(super) fn enter(&mut self, addr: SocketAddr, why: Reason) {
        if self.in_rotation {
            return;
        }
        let ctx = Arc::clone(&self.ctx);
        if self.handoff.is_none() && addr == ctx.listen && ctx.config().mode == Mode::Handoff {
            // It would send every client back into the master. Config validation rules this
            // out; this keeps a future path from looping.
            tracing::error!(slot = self.slot, pid = self.pid, %addr, "refusing a backend at the master's own address");
            return;
        }
        self.backend = Some(match &self.handoff {
            Some(conns) => ctx
                .backends
                .insert_handoff(self.key, self.slot, addr, conns.clone()),
            None => ctx.backends.insert(self.key, self.slot, addr),
        });
        self.in_rotation = true;
        ctx.registry.set(self.key, State::Ready, &why, Some(addr));
        self.state.send_replace(State::Ready);
        let now = ctx.entered_rotation();
        tracing::info!(slot = self.slot, pid = self.pid, %addr, in_rotation = now, reason = %why, "worker ready");
        ctx.note_all_ready(now);
    }

    /// Takes the worker out of rotation (no-op if it is not in it). `stopping`: the master
    /// is stopping, so an empty rotation is expected and not warned about.
    ///
    /// A worker that goes down (failing checks) stays in the set aside, marked down, for the
    /// proxy's panic mode; any other reason removes it, also one already down.
    pub(super) fn leave(&mut self, why: Reason, stopping: bool) {
        let down = why.state_out_of_rotation() == State::Down;
        if !self.in_rotation {
            if !down {
                self.ctx.backends.remove(self.key);
            }
            return;
        }
        self.in_rotation = false;
        if down {
            self.ctx.backends.mark_down(self.key);
        } else {
            self.ctx.backends.remove(self.key);
        }
        self.publish(why.state_out_of_rotation(), &why);
        let left = self.ctx.left_rotation();
        tracing::info!(
            slot = self.slot,
            pid = self.pid,
            reason = %why,
            in_rotation = left,
            "worker out of rotation"
        );
        if left == 0 && !stopping && self.ctx.backends.down() == 0 {
            tracing::warn!("no worker in rotation: new connections fail until one is ready");
        }
    }

    /// Moves the worker to `state` out of rotation (in the registry and on the watch).
    pub(super) fn publish(&self, state: State, why: &Reason) {
        self.ctx.registry.set(self.key, state, why, None);
        self.state.send_replace(state);
    }

    /// Connections still open to this worker.
    pub(super) fn open_connections(&self) -> usize {
        self.backend.as_ref().map_or(0, |b| b.active())
    }

    /// Connections this worker has answered so far (passive liveness).
    pub(super) fn answered(&self) -> u64 {
        self.backend.as_ref().map_or(0, |b| b.answered())
    }

    /// Passive health: connects through the proxy that failed in a row, and connections
    /// in a row left unanswered for `--response-timeout`.
    pub(super) fn passive_failures(&self) -> (u32, u32) {
        self.backend
            .as_ref()
            .map_or((0, 0), |b| (b.connect_failures(), b.response_failures()))
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.leave(Reason::Ended, true);
    }
}
