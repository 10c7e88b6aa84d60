//! Stopping: retirement and its drain (`Draining`), the master's stop, and the end of every
//! instance (`Stopping` → `Exited`): the `shutdown` message, the patience a worker that
//! speaks IPC gets, SIGTERM, SIGKILL, reaping, and the hand-offs it never answered.

use std::ops::ControlFlow;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::net::TcpStream;

use worker::protocol::{MasterMessage, Mode};

use crate::child;
use crate::orphans::LEFTOVER_STOP_TIMEOUT;

use super::context::StopTokens;
use super::process::Process;
use super::run::{End, Worker};
use super::Ending;
use crate::state::{Reason, State};

/// How long a worker that speaks IPC gets to exit after the `shutdown` message before it is
/// sent SIGTERM. Its connections are already drained by then, so exiting is quick.
const SHUTDOWN_MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the IPC channel reaches EOF, how long to wait for the worker's exit before treating
/// it as a live worker that closed its channel.
pub(super) const EXIT_AFTER_EOF: Duration = Duration::from_millis(100);
/// How long a stopping worker gets after SIGTERM before SIGKILL.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a drain starts a worker that drains on `shutdown` is told: a connection
/// the proxy sent it just before it left rotation has delivered its first request by then
/// (a worker's graceful shutdown closes a connection still waiting for one).
const DRAIN_SETTLE: Duration = Duration::from_millis(200);
/// How often a retiring worker's open connections are counted while it drains.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(20);

impl Worker {
    /// A rolling reload retires this worker: out of rotation, `Draining` up to `--grace`,
    /// and told to drain at once (`shutdown`): it closes its idle keep-alive connections and
    /// finishes busy ones, so a reload does not wait `--grace` for idle clients.
    pub(super) async fn on_retire(&mut self) {
        self.rotation.leave(Reason::Retired, false);
        self.start_drain(Reason::Retired).await;
    }

    /// The master's drain started: out of rotation and told to drain, like a retirement.
    pub(super) async fn on_master_drain(&mut self) {
        self.rotation.leave(Reason::MasterStopping, true);
        self.start_drain(Reason::MasterStopping).await;
    }

    async fn start_drain(&mut self, reason: Reason) {
        // Retired before it was ever in rotation: it drains nothing, but is draining all the
        // same.
        self.rotation.publish(State::Draining, &reason);
        self.drain_deadline = Some(tokio::time::Instant::now() + self.ctx.config().grace);
        tracing::info!(
            slot = self.slot,
            pid = self.pid,
            open_connections = self.rotation.open_connections(),
            "worker draining"
        );
    }

    /// Whether `shutdown` is known to mean "drain" for this worker (the built-in worker's
    /// graceful hyper shutdown, Node's cluster `disconnect`), so it is told early in the
    /// drain. A program that exits on it at once would cut its in-flight requests: it is
    /// told once its connections are done.
    fn drains_on_shutdown(&self) -> bool {
        self.ctx.config().program == crate::config::WorkerProgram::Builtin || self.node.online
    }

    /// Why a draining worker is draining.
    pub(super) fn drain_reason(&self) -> Reason {
        if self.stop.drain.is_cancelled() || self.stop.graceful.is_cancelled() {
            Reason::MasterStopping
        } else {
            Reason::Retired
        }
    }

    /// While draining: once its connections are done (or `--grace` is over), it is asked to
    /// stop.
    pub(super) async fn on_drain_poll(&mut self) -> ControlFlow<End> {
        let open = self.rotation.open_connections();
        let now = tokio::time::Instant::now();
        let over = self.drain_deadline.is_some_and(|d| now >= d);
        let settled = self
            .drain_deadline
            .is_some_and(|d| now + self.ctx.config().grace >= d + DRAIN_SETTLE);
        if open > 0 && settled && self.drains_on_shutdown() {
            // Connections sent to it just before it left rotation have delivered their
            // first request by now, so its graceful shutdown finishes them; only idle
            // keep-alive connections are closed.
            self.ask_to_stop().await;
        }
        if open > 0 && !over {
            return ControlFlow::Continue(());
        }
        if open > 0 {
            tracing::warn!(
                slot = self.slot,
                pid = self.pid,
                open_connections = open,
                "drain deadline reached; stopping worker anyway"
            );
        }
        self.ask_to_stop().await;
        ControlFlow::Break(End::running(self.drain_reason()))
    }

    /// The master is stopping.
    pub(super) async fn on_stop(&mut self) -> ControlFlow<End> {
        self.rotation.leave(Reason::MasterStopping, true);
        // Best effort: a worker that reads its channel drains and exits by itself.
        self.ask_to_stop().await;
        ControlFlow::Break(End::running(Reason::MasterStopping))
    }

    /// Asks the worker to stop: balancer's `shutdown` to every worker (a Node cluster
    /// worker's `process.on('message')` sees it too), and Node's cluster `disconnect` to a
    /// cluster worker, which closes its servers and lets it exit once its connections are
    /// done.
    async fn ask_to_stop(&mut self) {
        if std::mem::replace(&mut self.asked_to_stop, true) {
            return;
        }
        self.ipc.send_line(&MasterMessage::Shutdown.to_line()).await;
        if self.node.online {
            let line = self.node.primary.disconnect();
            self.ipc.send_line(&line).await;
        }
    }

    /// The end of the life: out of rotation, queued clients to other workers, stopped (if
    /// still running) and reaped, unanswered hand-offs to other workers.
    pub(super) async fn finish(mut self, end: End) -> Ending {
        let End { reason, status } = end;
        self.admission.cancel();
        self.health.cancel();
        let master_stopping = self.stop.graceful.is_cancelled() || self.stop.drain.is_cancelled();
        self.rotation.leave(Reason::Ended, master_stopping);
        if status.is_none() {
            self.rotation.publish(State::Stopping, &reason);
        }
        // Connections queued for this worker and never sent go to the others now.
        self.handoff_rx.close();
        let queued: Vec<TcpStream> =
            std::iter::from_fn(|| self.handoff_rx.try_recv().ok()).collect();
        self.give_to_others(queued);
        let owns_connections =
            self.ctx.config().mode != Mode::Proxy || self.rotation.handoff.is_some();
        let expected = master_stopping || reason == Reason::Retired;
        // A worker being stopped was sent `shutdown`. One that speaks IPC may take a moment
        // to exit by itself: in proxy mode its connections are already drained, so briefly;
        // in the other modes it holds its own connections, so up to --grace. One that never
        // spoke IPC gets SIGTERM at once.
        let asked = reason.is_requested_stop() && self.admission.admitted();
        let patience = match (asked, self.spoke_ipc, owns_connections) {
            (true, true, true) => Some(self.ctx.config().grace),
            (true, true, false) => Some(SHUTDOWN_MESSAGE_TIMEOUT),
            _ => None,
        };
        let has_pending = self.delivery.as_ref().is_some_and(|d| d.has_pending());
        let status = match status {
            Some(Ok(status)) => status,
            _ if has_pending => self.wait_for_answers(patience).await,
            _ => terminate(&mut self.child, self.pid, &self.stop, patience).await,
        };
        // Reaped: its last answers are still in the channel; whatever it never answered, it
        // did not take, and goes to the others.
        if self.delivery.is_some() {
            while let Ok(Some(Ok(Ok(text)))) =
                tokio::time::timeout(EXIT_AFTER_EOF, self.ipc.next_line()).await
            {
                self.apply_answer(&text);
            }
            if let Some(d) = self.delivery.take() {
                self.give_to_others(d.into_unanswered().collect());
            }
        }
        self.ctx.uncarry(self.key);
        self.ctx.orphans.reaped(self.pid);
        let daemonized = reason == Reason::Exited
            && status.success()
            && !expected
            && self.ctx.orphans.any_leftovers();
        // Its last lines first (a process it started may be writing them), then what it
        // left behind is stopped.
        if !expected {
            self.output.settle().await;
        }
        self.stop_leftovers(daemonized).await;
        log_exit(
            self.slot,
            self.pid,
            status,
            expected,
            self.output.last_error(),
        );
        let reason = match daemonized {
            true => format!("daemonized ({})", describe(status)),
            false => format!("{reason} ({})", describe(status)),
        };
        self.ctx.registry.gone(self.key, &reason);
        Ending {
            was_ready: self.admission.admitted(),
            reason,
            last_stderr: Some(self.output.explain()),
            daemonized,
        }
    }

    /// Stops what the worker left behind once it is reaped: the rest of its process group
    /// (SIGKILL too, although its leader is dead) and every other process re-parented to the
    /// master outside a live worker's group (see [`crate::orphans`]).
    async fn stop_leftovers(&self, daemonized: bool) {
        let (slot, pid) = (self.slot, self.pid);
        if daemonized {
            tracing::warn!(
                slot,
                pid,
                hint =
                    "balancer supervises the process it starts: run the program in the foreground",
                "worker daemonized"
            );
        }
        let patience = if self.stop.force.is_cancelled() {
            Duration::ZERO
        } else {
            LEFTOVER_STOP_TIMEOUT
        };
        let stopped = self.ctx.orphans.stop_leftovers(Some(pid), patience).await;
        if stopped > 0 {
            tracing::info!(
                slot,
                pid,
                processes = stopped,
                "stopped processes the worker left behind"
            );
        }
    }

    /// Connections already sent stay the worker's until it answers or is gone: a worker that
    /// is draining still answers `accepted` or `rejected` for what was in its channel.
    async fn wait_for_answers(&mut self, patience: Option<Duration>) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + patience.unwrap_or(SHUTDOWN_MESSAGE_TIMEOUT);
        let exited = loop {
            if !self.delivery.as_ref().is_some_and(|d| d.has_pending()) {
                break None;
            }
            tokio::select! {
                status = self.child.wait() => break status.ok(),
                line = self.ipc.next_line() => match line {
                    Some(Ok(Ok(text))) => self.apply_answer(&text),
                    Some(Ok(Err(_))) => {}
                    Some(Err(_)) | None => break None,
                },
                _ = tokio::time::sleep_until(deadline) => break None,
                _ = self.stop.force.cancelled() => break None,
            }
        };
        match exited {
            Some(status) => status,
            None => terminate(&mut self.child, self.pid, &self.stop, patience).await,
        }
    }
}

/// Stops a worker that is still running: given `patience` (it was sent `shutdown`), it first
/// gets that long to exit by itself; then SIGTERM (and SIGCONT, in case it is stopped) to
/// its process group, SIGKILL after [`WORKER_STOP_TIMEOUT`] (at once if `stop.force`
/// fires), then reaps it.
async fn terminate(
    child: &mut Process,
    pid: u32,
    stop: &StopTokens,
    patience: Option<Duration>,
) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    if let Some(patience) = patience.filter(|_| !stop.force.is_cancelled()) {
        tokio::select! {
            status = child.wait() => if let Ok(status) = status { return status },
            _ = tokio::time::sleep(patience) => {}
            _ = stop.force.cancelled() => {}
        }
    }
    if !stop.force.is_cancelled() {
        child::signal(pid, Signal::SIGTERM);
        child::signal(pid, Signal::SIGCONT);
        tokio::select! {
            status = child.wait() => if let Ok(status) = status { return status },
            _ = tokio::time::sleep(WORKER_STOP_TIMEOUT) => {
                tracing::warn!(pid, timeout = ?WORKER_STOP_TIMEOUT, "worker ignored SIGTERM; sending SIGKILL");
            }
            _ = stop.force.cancelled() => {}
        }
    }
    // Still unreaped here, so the pid is still ours to signal.
    if matches!(child.try_wait(), Ok(None)) {
        child::signal(pid, Signal::SIGKILL);
    }
    loop {
        match child.wait().await {
            Ok(status) => return status,
            // wait() fails only on an interrupted syscall; try again.
            Err(e) => tracing::debug!(pid, error = %e, "waiting for worker"),
        }
    }
}

fn log_exit(slot: usize, pid: u32, status: ExitStatus, expected: bool, last_error: Option<String>) {
    let status = describe(status);
    if expected {
        tracing::info!(slot, pid, %status, "worker stopped");
        return;
    }
    match last_error {
        Some(line) => tracing::warn!(slot, pid, %status, last_stderr = ?line, "worker exited"),
        None => tracing::warn!(slot, pid, %status, "worker exited"),
    }
}

/// `exit code 3` or `signal 9 (SIGKILL)`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(name) => format!("signal {sig} ({name})"),
            Err(_) => format!("signal {sig}"),
        },
        (None, None) => status.to_string(),
    }
}
