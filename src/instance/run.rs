//! The event loop of one instance: [`Worker`] holds everything one worker's life needs,
//! [`Worker::next_event`] waits for the next [`Event`], and [`Worker::dispatch`] hands it to
//! the `on_*` method that owns that transition (in the file of its concern: admission,
//! health, hand-off, Node, stopping). The loop itself only routes.

use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::process::ExitStatus;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use worker::protocol::{MasterMessage, Mode, WorkerMessage};

use crate::output::Output;

use super::admission::{Admission, Gate};
use super::carry::Inherited;
use super::context::{Context, StopTokens};
use super::handoff::{Delivery, MAX_RESENDS};
use super::health::Health;
use super::ipc::{self, Ipc, WRITE_TIMEOUT};
use super::node::Node;
use super::process::Process;
use super::rotation::Rotation;
use super::stop::{DRAIN_POLL, EXIT_AFTER_EOF};
use super::strikes::Strikes;
use super::Ending;
use crate::state::{Reason, State};

/// How an instance's life in this image begins.
pub(super) enum Start {
    /// A new worker process for the slot.
    Spawn(usize),
    /// A worker carried across an in-place upgrade, already admitted.
    Adopt(Box<Inherited>),
}

/// Drives one worker from spawn (or adoption) to reaped.
pub(super) async fn run(
    start: Start,
    ctx: Arc<Context>,
    stop: StopTokens,
    retire: mpsc::Receiver<()>,
    state: watch::Sender<State>,
) -> Ending {
    let mut worker = match start {
        Start::Spawn(slot) => match Worker::spawn(slot, ctx, stop, retire, state) {
            Ok(mut w) => {
                w.begin().await;
                w
            }
            Err(ending) => return ending,
        },
        Start::Adopt(inherited) => match Worker::adopt(*inherited, ctx, stop, retire, state) {
            Ok(w) => w,
            Err(ending) => return ending,
        },
    };
    let end = loop {
        let event = worker.next_event().await;
        if let ControlFlow::Break(end) = worker.dispatch(event).await {
            break end;
        }
        if let ControlFlow::Break(end) = worker.settle() {
            break end;
        }
    };
    worker.finish(end).await
}

/// Everything one worker's life needs, from spawn to reaped.
pub(super) struct Worker {
    pub(super) ctx: Arc<Context>,
    pub(super) stop: StopTokens,
    pub(super) slot: usize,
    pub(super) pid: u32,
    /// Its backend key (unique per instance).
    pub(super) key: u64,
    pub(super) child: Process,
    pub(super) ipc: Ipc,
    pub(super) rotation: Rotation,
    pub(super) admission: Admission,
    pub(super) health: Health,
    pub(super) strikes: Strikes,
    /// Asks for retirement (a rolling reload).
    pub(super) retire: mpsc::Receiver<()>,
    /// Results of helper tasks (admission probes, health probes).
    pub(super) events_tx: mpsc::Sender<Helper>,
    pub(super) events: mpsc::Receiver<Helper>,
    /// Its output relays, and the last lines of its stderr to explain a failure.
    pub(super) output: Output,
    /// Whether it spoke balancer's or Node's protocol itself (`ready`, a handle
    /// acknowledgement, cluster `online`): it will act on `shutdown`.
    pub(super) spoke_ipc: bool,
    /// Whether it announced the `ping` feature.
    pub(super) supports_ping: bool,
    /// Shared mode: how often the listener was sent (Node may refuse it and ask again).
    pub(super) listener_sends: u32,
    /// Set once retired: when its drain ends at the latest.
    pub(super) drain_deadline: Option<tokio::time::Instant>,
    /// Whether it was sent `shutdown` (and Node's `disconnect`) already.
    pub(super) asked_to_stop: bool,
    /// Node cluster: the primary's side of this worker.
    pub(super) node: Node,
    /// Hand-off: the proxy queues clients here; `delivery` passes them to the worker.
    pub(super) handoff_tx: mpsc::Sender<TcpStream>,
    pub(super) handoff_rx: mpsc::Receiver<TcpStream>,
    pub(super) delivery: Option<Delivery>,
}

/// What helper tasks report to the instance.
#[derive(Debug)]
pub(super) enum Helper {
    /// The admission probe of an announced port finished.
    Admitted(Result<std::net::SocketAddr, String>),
    /// An active TCP or HTTP check finished. `None`: the master could not run the check
    /// (out of descriptors), which says nothing about the worker.
    Checked(Option<Result<(), String>>),
}

/// One thing that happened to a worker.
#[derive(Debug)]
pub(super) enum Event {
    /// The process was reaped.
    Exited(io::Result<ExitStatus>),
    /// Its channel gave a line, a framing error, or EOF.
    Read(ipc::Read),
    /// A helper task finished.
    Helper(Helper),
    /// A health check is due.
    Tick,
    /// The proxy queued a client for it (hand-off).
    Client(TcpStream),
    /// `--ready-timeout` passed without admission.
    ReadyTimeout,
    /// A rolling reload retires it.
    Retire,
    /// The master's drain started.
    Drain,
    /// Time to count its open connections again (while draining).
    DrainPoll,
    /// The master is stopping.
    Stop,
}

/// How the loop ended: why, and the exit status if the process was already reaped (`None`:
/// it still runs and must be stopped).
#[derive(Debug)]
pub(super) struct End {
    pub(super) reason: Reason,
    pub(super) status: Option<io::Result<ExitStatus>>,
}

impl End {
    /// Ended for `reason` with the process still running.
    pub(super) fn running(reason: Reason) -> Self {
        Self {
            reason,
            status: None,
        }
    }
}

/// A helper task that is aborted when its worker's life ends.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Worker {
    /// The first steps after spawn: the shared listener in shared mode, and admission at
    /// once where nothing will be announced.
    async fn begin(&mut self) {
        if self.ctx.config().mode == Mode::Shared && !self.ctx.config().node_cluster {
            self.listener_sends += 1;
            self.send_listener().await;
        }
        self.admit_unannounced();
    }

    /// Waits for the next event.
    async fn next_event(&mut self) -> Event {
        let admitted = self.admission.admitted();
        let draining = self.drain_deadline.is_some();
        let ready_by = self.admission.ready_by;
        tokio::select! {
            status = self.child.wait() => Event::Exited(status),
            read = self.ipc.next_line() => Event::Read(read),
            Some(helper) = self.events.recv() => Event::Helper(helper),
            _ = self.health.tick(), if !draining => Event::Tick,
            Some(client) = self.handoff_rx.recv(), if self.delivery.is_some() => Event::Client(client),
            _ = tokio::time::sleep_until(ready_by), if !admitted && !draining => Event::ReadyTimeout,
            Some(()) = self.retire.recv(), if !draining => Event::Retire,
            _ = self.stop.drain.cancelled(), if !draining => Event::Drain,
            _ = tokio::time::sleep(DRAIN_POLL), if draining => Event::DrainPoll,
            _ = self.stop.graceful.cancelled() => Event::Stop,
        }
    }

    /// Hands `event` to the method that owns its transition.
    async fn dispatch(&mut self, event: Event) -> ControlFlow<End> {
        match event {
            Event::Exited(status) => {
                // Told to drain, it drained and exited: the stop it was asked for.
                let reason = match self.drain_deadline {
                    Some(_) => self.drain_reason(),
                    None => Reason::Exited,
                };
                self.rotation
                    .leave(reason.clone(), self.stop.graceful.is_cancelled());
                return ControlFlow::Break(End {
                    reason,
                    status: Some(status),
                });
            }
            Event::Read(Some(Ok(Ok(text)))) => {
                self.strikes.message(self.slot, self.pid);
                let closed = self.ipc.take_discarded();
                self.strikes.uninvited(self.slot, self.pid, closed);
                self.on_line(&text).await;
            }
            Event::Read(Some(Ok(Err(e)))) => self.strikes.add(self.slot, self.pid, &e.to_string()),
            Event::Read(Some(Err(_)) | None) => return self.on_eof().await,
            Event::Helper(Helper::Admitted(r)) => self.on_admitted(r),
            Event::Helper(Helper::Checked(r)) => self.on_checked(r),
            Event::Tick => self.on_tick().await,
            Event::Client(client) => self.on_client(client).await,
            Event::ReadyTimeout => return self.on_ready_timeout(),
            Event::Retire => self.on_retire().await,
            Event::Drain => self.on_master_drain().await,
            Event::DrainPoll => return self.on_drain_poll().await,
            Event::Stop => return self.on_stop().await,
        }
        ControlFlow::Continue(())
    }

    /// After each event: a health result it produced is recorded, and too many strikes
    /// replace the worker.
    fn settle(&mut self) -> ControlFlow<End> {
        self.record_check()?;
        if self.strikes.exceeded() {
            self.rotation.leave(Reason::Misbehaving, false);
            tracing::warn!(
                slot = self.slot,
                pid = self.pid,
                strikes = self.strikes.count,
                "worker keeps breaking the ipc protocol; replacing it"
            );
            return ControlFlow::Break(End::running(Reason::ProtocolViolations));
        }
        ControlFlow::Continue(())
    }

    /// One line from the worker, parsed once: one of balancer's messages, Node's handle
    /// acknowledgements, or a Node cluster message.
    async fn on_line(&mut self, text: &str) {
        let (slot, pid) = (self.slot, self.pid);
        match WorkerMessage::parse(text) {
            Ok(WorkerMessage::Cluster(act)) => self.on_cluster(act).await,
            Ok(WorkerMessage::Ready { port, features }) => self.on_ready(port, &features),
            Ok(WorkerMessage::HandleAck) => self.on_handle_ack(),
            Ok(WorkerMessage::HandleNack) => self.on_handle_nack().await,
            Ok(WorkerMessage::Accepted { id }) => self.answered(id, true),
            Ok(WorkerMessage::Rejected { id }) => self.answered(id, false),
            Ok(WorkerMessage::Pong { seq }) => self.on_pong(seq),
            Ok(WorkerMessage::Unknown) => {
                tracing::debug!(slot, pid, line = %ipc::truncate(text), "unknown ipc message ignored")
            }
            Err(e) => self
                .strikes
                .add(slot, pid, &format!("malformed message: {e}")),
        }
    }

    /// `NODE_HANDLE_ACK`: a handle arrived (a cluster listener, a hand-off connection, or
    /// the shared listener, whose acknowledgement is a Node worker's readiness).
    fn on_handle_ack(&mut self) {
        // It reads its channel: it will see `shutdown` too.
        self.spoke_ipc = true;
        if self.node.other_handles_unacked > 0 {
            self.node.other_handles_unacked -= 1;
        } else if let Some(d) = self.delivery.as_mut() {
            d.handle_acked();
        } else if self.ctx.config().mode == Mode::Shared && self.may_admit() {
            // Shared mode: a Node worker takes the listener and never says `ready`; the
            // acknowledgement is its readiness.
            self.admit_announced(Gate::Trust);
        }
    }

    /// `NODE_HANDLE_NACK`: a handle did not arrive; it is sent again a few times.
    async fn on_handle_nack(&mut self) {
        if self.on_connection_nack().await {
            return;
        }
        if self.ctx.config().mode == Mode::Shared && self.listener_sends <= MAX_RESENDS {
            self.listener_sends += 1;
            self.send_listener().await;
        } else {
            self.strikes
                .add(self.slot, self.pid, "unexpected NODE_HANDLE_NACK");
        }
    }

    /// Hands the shared listening socket to the worker, in Node's handle form (see
    /// [`worker::node::LISTENER_LINE`]). A failure is only logged: the worker then never
    /// acknowledges and is replaced at its ready timeout.
    async fn send_listener(&self) {
        let Some(listener) = &self.ctx.shared_listener else {
            return;
        };
        let line = MasterMessage::Listener.to_line();
        match self
            .ipc
            .send(&line, &[listener.as_fd()], WRITE_TIMEOUT)
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                tracing::warn!("handing the listener to a worker timed out")
            }
            Err(e) => tracing::warn!(error = %e, "could not hand the listener to a worker"),
        }
    }

    /// The channel reached EOF: out of rotation; an exit right behind it is an exit, a
    /// worker that still runs is stopped.
    async fn on_eof(&mut self) -> ControlFlow<End> {
        self.rotation
            .leave(Reason::ChannelClosed, self.stop.graceful.is_cancelled());
        // A dying worker closes its channel an instant before it is reaped: tell the two
        // apart before calling it a worker that dropped its channel.
        if let Ok(status) = tokio::time::timeout(EXIT_AFTER_EOF, self.child.wait()).await {
            return ControlFlow::Break(End {
                reason: Reason::Exited,
                status: Some(status),
            });
        }
        if !self.stop.graceful.is_cancelled() {
            tracing::warn!(
                slot = self.slot,
                pid = self.pid,
                "worker closed its ipc channel; stopping it"
            );
        }
        ControlFlow::Break(End::running(Reason::ChannelClosed))
    }
}
