//! One worker process's life, from spawn to reaped: its IPC channel, admission into
//! rotation, active and passive health, retirement (drain) and termination.
//!
//! A slot (see [`crate::supervisor`]) owns one [`Instance`] at a time, two during a reload.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{interval_at, Interval, MissedTickBehavior};

use proxy::Backend;
use worker::codec::LineError;
use worker::fdpass::FdReader;
use worker::protocol::{MasterMessage, Mode, WorkerMessage, MAX_LINE};

use crate::child::{self, Spawned};
use crate::cli::ReadyArg;
use crate::cli::WorkerOutput;
use crate::config::WorkerProgram;
use crate::handoff::{self, Delivery};
use crate::health::{Check, CheckKind, Flip, Tally};
use crate::node_cluster::{self, Act, Primary};
use crate::output::{self, LastLine};
use crate::ownership;
use crate::supervisor::{Shared, StopTokens};

/// The least time an admission gets, even late in the ready timeout: a worker may announce
/// just before its `listen()` completes.
const ADMIT_MIN: Duration = Duration::from_secs(2);
/// Pause between admission probes.
const ADMIT_RETRY: Duration = Duration::from_millis(20);
/// Timeout of one admission connect on loopback.
const ADMIT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a worker that speaks IPC gets to exit after the `shutdown` message before it is
/// sent SIGTERM. Its connections are already drained by then, so exiting is quick.
const SHUTDOWN_MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the IPC channel reaches EOF, how long to wait for the worker's exit before treating
/// it as a live worker that closed its channel.
const EXIT_AFTER_EOF: Duration = Duration::from_millis(100);
/// How long a stopping worker gets after SIGTERM before SIGKILL.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a retiring worker's open connections are counted while it drains.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How many times a listener is sent again after Node's `NODE_HANDLE_NACK` (Node's own
/// primary gives up after 3 retransmissions too).
const MAX_HANDLE_RESENDS: u32 = 3;
/// Protocol violations (malformed lines, impossible ports, floods) a worker may commit
/// before it is replaced. High enough that a chatty but honest worker is never hit.
const MAX_STRIKES: u32 = 20;
/// More messages than this in one second is a flood: one strike per such second.
const FLOOD_PER_SECOND: u32 = 1000;
/// An IPC write that takes longer than this is abandoned (the worker is not reading).
const IPC_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where an instance is in its life, as seen by its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned, not yet admitted.
    Starting,
    /// Admitted (it may since have gone down on health checks).
    Ready,
    /// Reaped.
    Ended,
}

/// How one worker's life ended.
#[derive(Debug)]
pub struct Ending {
    /// Whether it was ever in rotation.
    pub was_ready: bool,
    /// Why it ended, with its exit status.
    pub reason: String,
    /// The last line it wrote to stderr (with `--worker-output prefix`).
    pub last_stderr: Option<String>,
}

/// A running worker instance, driven by its own task.
#[derive(Debug)]
pub struct Instance {
    retire: mpsc::Sender<()>,
    phase: watch::Receiver<Phase>,
    task: JoinHandle<Ending>,
}

impl Instance {
    /// Spawns a worker for `slot` and starts driving it.
    pub fn start(slot: usize, shared: Arc<Shared>, stop: StopTokens) -> Self {
        let (retire, retire_rx) = mpsc::channel(1);
        let (phase_tx, phase) = watch::channel(Phase::Starting);
        let task = tokio::spawn(async move {
            let ending = run(slot, &shared, &stop, retire_rx, &phase_tx).await;
            phase_tx.send_replace(Phase::Ended);
            ending
        });
        Self {
            retire,
            phase,
            task,
        }
    }

    /// Waits until the worker is admitted (`true`) or has ended (`false`).
    pub async fn wait_ready(&mut self) -> bool {
        matches!(
            self.phase
                .wait_for(|p| *p != Phase::Starting)
                .await
                .map(|p| *p),
            Ok(Phase::Ready)
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
                reason: format!("instance task failed: {e}"),
                last_stderr: None,
            },
        }
    }
}

/// Events that helper tasks report to the instance task.
#[derive(Debug)]
enum Event {
    /// The admission probe of an announced port finished.
    Admitted(Result<SocketAddr, String>),
    /// An active TCP or HTTP check finished.
    /// `None`: the master could not run the check (out of descriptors), which says nothing
    /// about the worker.
    Checked(Option<Result<(), String>>),
}

/// A helper task that is aborted when its worker's life ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The worker's membership of the backend set, with the log line and counter for each change.
struct Rotation<'a> {
    shared: &'a Shared,
    slot: usize,
    pid: u32,
    key: u64,
    /// The backend entry while in rotation, and the last one after (to count its
    /// connections while draining).
    backend: Option<Arc<Backend>>,
    in_rotation: bool,
    /// Set for a hand-off worker: the queue the proxy puts its clients in.
    handoff: Option<mpsc::Sender<TcpStream>>,
}

impl Rotation<'_> {
    fn enter(&mut self, addr: SocketAddr, why: &str) {
        if self.in_rotation {
            return;
        }
        if self.handoff.is_none()
            && addr == self.shared.listen
            && self.shared.config.mode == Mode::Handoff
        {
            // It would send every client back into the master. Config validation rules this
            // out; this keeps a future path from looping.
            tracing::error!(slot = self.slot, pid = self.pid, %addr, "refusing a backend at the master's own address");
            return;
        }
        self.backend = Some(match &self.handoff {
            Some(conns) => {
                self.shared
                    .backends
                    .insert_handoff(self.key, self.slot, addr, conns.clone())
            }
            None => self.shared.backends.insert(self.key, self.slot, addr),
        });
        self.in_rotation = true;
        self.shared.registry.set(self.key, "ready", why, Some(addr));
        let now = self.shared.in_rotation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(slot = self.slot, pid = self.pid, %addr, in_rotation = now, reason = why, "worker ready");
        if now == self.shared.config.workers {
            if self
                .shared
                .announced_all_ready
                .swap(true, Ordering::Relaxed)
            {
                tracing::debug!(workers = now, "all workers ready");
            } else {
                tracing::info!(workers = now, "all workers ready");
            }
        }
    }

    fn leave(&mut self, why: &str, stopping: bool) {
        if !self.in_rotation {
            return;
        }
        self.in_rotation = false;
        self.shared.backends.remove(self.key);
        let state = match why {
            "health checks failing" | "connects failing" => "down",
            "retired" => "draining",
            _ => "stopping",
        };
        self.shared.registry.set(self.key, state, why, None);
        let left = self.shared.in_rotation.fetch_sub(1, Ordering::Relaxed) - 1;
        tracing::info!(
            slot = self.slot,
            pid = self.pid,
            reason = why,
            in_rotation = left,
            "worker out of rotation"
        );
        if left == 0 && !stopping {
            tracing::warn!("no worker in rotation: new connections fail until one is ready");
        }
    }

    /// Connections still open to this worker.
    fn open_connections(&self) -> usize {
        self.backend.as_ref().map_or(0, |b| b.active())
    }
}

impl Drop for Rotation<'_> {
    fn drop(&mut self) {
        self.leave("ended", true);
    }
}

/// Drives one worker from spawn to reaped.
async fn run(
    slot: usize,
    shared: &Arc<Shared>,
    stop: &StopTokens,
    mut retire: mpsc::Receiver<()>,
    phase: &watch::Sender<Phase>,
) -> Ending {
    let config = &shared.config;
    let (
        Spawned {
            mut child,
            pid,
            ipc,
        },
        assigned_port,
    ) = match spawn(slot, shared) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(slot, error = %e, "could not start worker");
            return Ending {
                was_ready: false,
                reason: format!("spawn failed: {e}"),
                last_stderr: None,
            };
        }
    };
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    tracing::info!(slot, pid, "worker spawned");
    shared.registry.spawned(key, slot, pid);

    let last_stderr = LastLine::default();
    if config.worker_output == WorkerOutput::Prefix {
        if let Some(out) = child.stdout.take() {
            tokio::spawn(output::relay(out, slot, pid, "stdout", None));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(output::relay(
                err,
                slot,
                pid,
                "stderr",
                Some(Arc::clone(&last_stderr)),
            ));
        }
    }

    let (read, mut write) = ipc.into_split();
    // Read with recvmsg: a worker that sends descriptors uninvited gets them closed (and
    // logged), and a short read at the message that carried them does not stall the rest.
    let mut lines = FdReader::new(read, MAX_LINE);
    let (events_tx, mut events) = mpsc::channel::<Event>(4);
    let mut rotation = Rotation {
        shared,
        slot,
        pid,
        key,
        backend: None,
        in_rotation: false,
        handoff: None,
    };
    let health = &config.health;
    let mut probe: Option<AbortOnDrop> = None;
    let mut addr: Option<SocketAddr> = None;
    let mut check: Option<Check> = None;
    let mut tally = Tally::new(health.rise, health.fall);
    let mut ticker: Option<Interval> = None;
    let mut ping: (u64, Option<Instant>) = (0, None);
    let mut strikes = Strikes::default();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let ready_by = tokio::time::Instant::now() + config.ready_timeout;
    // Admission keeps trying until the ready deadline: one passing glitch must not leave a
    // worker that announces only once idle until its ready timeout.
    let admit_patience = || {
        ready_by
            .saturating_duration_since(tokio::time::Instant::now())
            .max(ADMIT_MIN)
    };
    let ready_deadline = tokio::time::sleep_until(ready_by);
    tokio::pin!(ready_deadline);
    let builtin = config.program == WorkerProgram::Builtin;
    // Whether the worker has an address of its own (proxy mode) that checks can reach.
    let own_address = config.mode == Mode::Proxy;
    let mut supports_ping = false;
    // Whether the worker sent `ready` itself: it speaks balancer's protocol, and will act on
    // `shutdown`.
    let mut spoke_ipc = false;
    let mut listener_sends = 0u32;
    // The port of the `ready` whose admission is under way.
    let mut probing: Option<u16> = None;
    // Node cluster: the primary's message numbering, the key of the server balancer serves
    // for this worker, and handles sent outside hand-off that Node will acknowledge.
    let mut primary = Primary::default();
    let mut cluster_online = false;
    let mut balanced_key: Option<String> = None;
    let mut other_handles_unacked = 0u32;
    // Hand-off: the proxy queues clients here; `delivery` passes them to the worker.
    let (handoff_tx, mut handoff_rx) = mpsc::channel::<TcpStream>(handoff::QUEUE);
    let mut delivery: Option<Delivery> = None;
    let admit_now = |gate: Gate, patience: Duration| {
        let (tx, timeout, listen) = (events_tx.clone(), health.timeout, shared.listen);
        AbortOnDrop(tokio::spawn(async move {
            let r = admit(pid, gate, listen, timeout, patience).await;
            let _ = tx.send(Event::Admitted(r)).await;
        }))
    };
    if config.mode == Mode::Shared && !config.node_cluster {
        listener_sends += 1;
        send_listener(&write, shared).await;
    }
    let mut admission = match (config.mode, config.ready, assigned_port) {
        // Nothing will be announced: admit the assigned port as soon as it answers.
        (Mode::Proxy, ReadyArg::Port, Some(port)) => {
            Some(admit_now(Gate::Probe(port, None), config.ready_timeout))
        }
        (Mode::ReusePort, ReadyArg::Port, _) => {
            Some(admit_now(Gate::Listens, config.ready_timeout))
        }
        (_, ReadyArg::Spawn, _) => Some(admit_now(Gate::Trust, config.ready_timeout)),
        _ => None,
    };

    // Each branch either carries on or ends the loop with a reason; `None` for the status
    // means the worker still runs and must be stopped.
    let (reason, status): (String, Option<std::io::Result<ExitStatus>>) = loop {
        let mut result: Option<bool> = None;
        tokio::select! {
            status = child.wait() => {
                rotation.leave("exited", stop.graceful.is_cancelled());
                break ("exited".to_owned(), Some(status));
            }
            line = next_line(&mut lines) => match line {
                Some(Ok(Ok(text))) => {
                    strikes.message(slot, pid);
                    strikes.uninvited(slot, pid, lines.take_discarded());
                    if let Some(act) = node_cluster::parse_line(&text) {
                        match act {
                            Act::Online => {
                                cluster_online = true;
                                spoke_ipc = true;
                                tracing::info!(slot, pid, "node cluster worker online");
                            }
                            Act::QueryServer { seq, port, address, address_type, index } => {
                                let server = node_cluster::server_key(address.as_deref(), port, address_type, index);
                                let balanced = port > 0 && balanced_key.as_ref().is_none_or(|k| *k == server);
                                match answer_query(shared, port, address.as_deref(), address_type, balanced) {
                                    Answer::Key => {
                                        balanced_key = Some(server.clone());
                                        send_line(&mut write, &primary.reply_key(seq, &server)).await;
                                    }
                                    Answer::Handle(listener) => {
                                        if balanced {
                                            balanced_key = Some(server.clone());
                                        }
                                        other_handles_unacked += 1;
                                        send_handle(&write, &primary.reply_handle(seq, &server), &listener).await;
                                    }
                                    Answer::Refuse(why) => {
                                        tracing::warn!(slot, pid, port, "node cluster worker's listen refused: {why}");
                                        send_line(&mut write, &primary.reply_error(seq, node_cluster::UV_EADDRINUSE)).await;
                                    }
                                }
                            }
                            Act::Listening { key: server } => {
                                if balanced_key.as_ref() == Some(&server) && addr.is_none() && admission.is_none() && drain_deadline.is_none() {
                                    if matches!(config.mode, Mode::Proxy | Mode::Handoff) {
                                        delivery = Some(Delivery::new(handoff::Format::NodeCluster { key: server }));
                                    }
                                    admission = Some(admit_now(Gate::Trust, admit_patience()));
                                }
                            }
                            Act::Accepted { ack, accepted } => answered(shared, delivery.as_mut(), ack, accepted),
                            Act::Close { key: server } => {
                                if balanced_key.as_ref() == Some(&server) {
                                    rotation.leave("closed its server", stop.graceful.is_cancelled());
                                }
                            }
                            Act::ExitedAfterDisconnect { seq } => send_line(&mut write, &primary.ack(seq)).await,
                            Act::Other(act) => tracing::debug!(slot, pid, act, "node cluster message ignored"),
                        }
                    } else {
                    match WorkerMessage::parse(&text) {
                        Ok(WorkerMessage::Ready { port, features }) => {
                            spoke_ipc = true;
                            supports_ping |= features.iter().any(|f| f == "ping");
                            // A second `ready` while the first is being probed replaces it
                            // if it names another port (a worker correcting itself); the
                            // same port again, or any `ready` once admitted, is a duplicate.
                            if addr.is_some() || drain_deadline.is_some() || (admission.is_some() && probing == port) {
                                tracing::debug!(slot, pid, ?port, "duplicate ready ignored");
                            } else {
                                probing = port;
                                match gate_for_ready(config.mode, port, shared.listen.port(), &health.kind, builtin, supports_ping) {
                                    Ok(gate) => {
                                        if config.mode == Mode::Handoff {
                                            delivery = Some(Delivery::new(handoff::Format::Balancer));
                                        }
                                        admission = Some(admit_now(gate, admit_patience()));
                                    }
                                    Err(why) => strikes.add(slot, pid, &format!("ready: {why}")),
                                }
                            }
                        }
                        Ok(WorkerMessage::HandleAck) => {
                            // It reads its channel: it will see `shutdown` too.
                            spoke_ipc = true;
                            if other_handles_unacked > 0 {
                                other_handles_unacked -= 1;
                            } else if let Some(d) = delivery.as_mut() {
                                d.handle_acked();
                            } else if config.mode == Mode::Shared && addr.is_none() && admission.is_none() && drain_deadline.is_none() {
                                // Shared mode: a Node worker takes the listener and never says
                                // `ready`; the acknowledgement is its readiness.
                                admission = Some(admit_now(Gate::Trust, admit_patience()));
                            }
                        }
                        Ok(WorkerMessage::HandleNack) => {
                            if let Some(d) = delivery.as_mut() {
                                if let Some(lost) = d.handle_nacked(&write).await {
                                    handoff::redispatch(&shared.backends, [lost]);
                                }
                            } else if config.mode == Mode::Shared && listener_sends <= MAX_HANDLE_RESENDS {
                                listener_sends += 1;
                                send_listener(&write, shared).await;
                            } else {
                                strikes.add(slot, pid, "unexpected NODE_HANDLE_NACK");
                            }
                        }
                        Ok(WorkerMessage::Accepted { id }) => answered(shared, delivery.as_mut(), id, true),
                        Ok(WorkerMessage::Rejected { id }) => answered(shared, delivery.as_mut(), id, false),
                        Ok(WorkerMessage::Pong { seq }) => {
                            if let (expected, Some(sent)) = ping {
                                if seq == expected {
                                    ping.1 = None;
                                    result = Some(sent.elapsed() <= health.timeout);
                                }
                            }
                        }
                        Ok(WorkerMessage::Unknown) => tracing::debug!(slot, pid, line = %truncate(&text), "unknown ipc message ignored"),
                        Err(e) => strikes.add(slot, pid, &format!("malformed message: {e}")),
                    }
                    }
                }
                Some(Ok(Err(e))) => strikes.add(slot, pid, &e.to_string()),
                Some(Err(_)) | None => {
                    rotation.leave("ipc channel closed", stop.graceful.is_cancelled());
                    // A dying worker closes its channel an instant before it is reaped: tell
                    // the two apart before calling it a worker that dropped its channel.
                    if let Ok(status) = tokio::time::timeout(EXIT_AFTER_EOF, child.wait()).await {
                        break ("exited".to_owned(), Some(status));
                    }
                    if !stop.graceful.is_cancelled() {
                        tracing::warn!(slot, pid, "worker closed its ipc channel; stopping it");
                    }
                    break ("ipc channel closed".to_owned(), None);
                }
            },
            Some(event) = events.recv() => match event {
                Event::Admitted(Ok(at)) => {
                    admission = None;
                    addr = Some(at);
                    if delivery.is_some() {
                        rotation.handoff = Some(handoff_tx.clone());
                    }
                    // A hand-off worker is admitted with the client address, which is the
                    // master's own: only IPC or liveness checks reach the worker itself.
                    check = Some(health.kind.resolve(builtin, supports_ping, own_address && delivery.is_none()));
                    rotation.enter(at, "admitted");
                    phase.send_replace(Phase::Ready);
                    let mut t = interval_at(tokio::time::Instant::now() + health.interval, health.interval);
                    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    ticker = Some(t);
                }
                Event::Admitted(Err(why)) => {
                    admission = None;
                    strikes.add(slot, pid, &format!("announced port not admitted: {why}"));
                }
                Event::Checked(r) => {
                    probe = None;
                    match r {
                        Some(Err(why)) => {
                            tracing::debug!(slot, pid, error = %why, "health check failed");
                            result = Some(false);
                        }
                        Some(Ok(())) => result = Some(true),
                        None => tracing::debug!(slot, pid, "health check skipped: the master is out of descriptors"),
                    }
                }
            },
            _ = tick(&mut ticker), if drain_deadline.is_none() => {
                let passive_failures = rotation.backend.as_ref().map_or(0, |b| b.connect_failures());
                if tally.is_up() && passive_failures >= health.fall {
                    if tally.force_down() == Flip::Down {
                        tracing::warn!(slot, pid, connect_failures = passive_failures, "worker down: connects keep failing");
                        rotation.leave("connects failing", false);
                    }
                }
                match (&check, addr) {
                    (Some(Check::Ipc), _) => {
                        if ping.1.take().is_some() {
                            result = Some(false);
                        }
                        ping.0 += 1;
                        ping.1 = Some(Instant::now());
                        send(&mut write, &MasterMessage::Ping { seq: ping.0 }).await;
                    }
                    (Some(Check::Liveness), _) => {}
                    (Some(check), Some(at)) if probe.is_none() => {
                        let (tx, check, timeout) = (events_tx.clone(), check.clone(), health.timeout);
                        probe = Some(AbortOnDrop(tokio::spawn(async move {
                            let r = match check {
                                Check::Http(path) => proxy::health::http(at, &path, timeout).await,
                                _ => proxy::health::tcp(at, timeout).await,
                            };
                            let r = match r {
                                Err(e) if e.is_local_exhaustion() => None,
                                r => Some(r.map_err(|e| e.to_string())),
                            };
                            let _ = tx.send(Event::Checked(r)).await;
                        })));
                    }
                    // A probe still running at the next tick has taken a whole interval.
                    (Some(_), Some(_)) => result = Some(false),
                    _ => {}
                }
            }
            Some(client) = handoff_rx.recv(), if delivery.is_some() => {
                if let Some(d) = delivery.as_mut() {
                    if let Err(client) = d.deliver(&write, &mut primary, client).await {
                        handoff::redispatch(&shared.backends, [client]);
                    }
                }
            }
            _ = &mut ready_deadline, if addr.is_none() && drain_deadline.is_none() => {
                tracing::warn!(slot, pid, timeout = ?config.ready_timeout, "worker did not become ready within --ready-timeout; replacing it");
                break (format!("no ready within {:?}", config.ready_timeout), None);
            }
            Some(()) = retire.recv(), if drain_deadline.is_none() => {
                rotation.leave("retired", false);
                drain_deadline = Some(tokio::time::Instant::now() + config.grace);
                tracing::info!(slot, pid, open_connections = rotation.open_connections(), "worker draining");
            }
            _ = tokio::time::sleep(DRAIN_POLL), if drain_deadline.is_some() => {
                let open = rotation.open_connections();
                if open == 0 || drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    if open > 0 {
                        tracing::warn!(slot, pid, open_connections = open, "drain deadline reached; stopping worker anyway");
                    }
                    ask_to_stop(&mut write, cluster_online, &mut primary).await;
                    break ("retired".to_owned(), None);
                }
            }
            _ = stop.graceful.cancelled() => {
                rotation.leave("master stopping", true);
                // Best effort: a worker that reads its channel drains and exits by itself.
                ask_to_stop(&mut write, cluster_online, &mut primary).await;
                break ("master stopping".to_owned(), None);
            }
        }
        if let Some(ok) = result {
            match tally.record(ok) {
                Flip::Down => {
                    tracing::warn!(
                        slot,
                        pid,
                        fall = health.fall,
                        "worker down: health checks failing"
                    );
                    rotation.leave("health checks failing", false);
                }
                Flip::Up => {
                    tracing::info!(
                        slot,
                        pid,
                        rise = health.rise,
                        "worker up: health checks passing"
                    );
                    if let Some(at) = addr {
                        rotation.enter(at, "health checks passing");
                    }
                }
                Flip::None => {}
            }
            if !tally.is_up() && tally.down_failures() >= health.fall {
                tracing::warn!(slot, pid, "worker unresponsive; replacing it");
                break ("unresponsive".to_owned(), None);
            }
        }
        if strikes.count >= MAX_STRIKES {
            rotation.leave("misbehaving", false);
            tracing::warn!(
                slot,
                pid,
                strikes = strikes.count,
                "worker keeps breaking the ipc protocol; replacing it"
            );
            break ("ipc protocol violations".to_owned(), None);
        }
    };
    drop((admission, probe));
    // Connections queued for this worker and never sent go to the others now.
    rotation.leave("ended", stop.graceful.is_cancelled());
    handoff_rx.close();
    let queued: Vec<TcpStream> = std::iter::from_fn(|| handoff_rx.try_recv().ok()).collect();
    give_to_others(shared, slot, pid, queued);
    let owns_connections = config.mode != Mode::Proxy || rotation.handoff.is_some();
    let expected = stop.graceful.is_cancelled() || reason == "retired";
    // A worker being stopped was sent `shutdown`. One that speaks IPC may take a moment to
    // exit by itself: in proxy mode its connections are already drained, so briefly; in the
    // other modes it holds its own connections, so up to --grace.
    let stopping = reason == "retired" || reason == "master stopping";
    // One that never spoke IPC gets SIGTERM at once.
    let patience = match (stopping && addr.is_some(), spoke_ipc, owns_connections) {
        (true, true, true) => Some(config.grace),
        (true, true, false) => Some(SHUTDOWN_MESSAGE_TIMEOUT),
        _ => None,
    };
    // Connections already sent stay the worker's until it answers or is gone: a worker that is
    // draining still answers `accepted` or `rejected` for what was in its channel.
    let status = match (status, delivery.as_mut()) {
        (Some(Ok(status)), _) => status,
        (_, Some(d)) if d.has_pending() => {
            let deadline =
                tokio::time::Instant::now() + patience.unwrap_or(SHUTDOWN_MESSAGE_TIMEOUT);
            let exited = loop {
                if !d.has_pending() {
                    break None;
                }
                tokio::select! {
                    status = child.wait() => break status.ok(),
                    line = next_line(&mut lines) => match line {
                        Some(Ok(Ok(text))) => apply_answer(shared, d, &text),
                        Some(Ok(Err(_))) => {}
                        Some(Err(_)) | None => break None,
                    },
                    _ = tokio::time::sleep_until(deadline) => break None,
                    _ = stop.force.cancelled() => break None,
                }
            };
            match exited {
                Some(status) => status,
                None => terminate(&mut child, pid, stop, patience).await,
            }
        }
        _ => terminate(&mut child, pid, stop, patience).await,
    };
    // Reaped: its last answers are still in the channel; whatever it never answered, it did
    // not take, and goes to the others.
    if let Some(mut d) = delivery.take() {
        while let Ok(Some(Ok(Ok(text)))) =
            tokio::time::timeout(EXIT_AFTER_EOF, next_line(&mut lines)).await
        {
            apply_answer(shared, &mut d, &text);
        }
        give_to_others(shared, slot, pid, d.into_unanswered().collect());
    }
    log_exit(slot, pid, status, expected, &last_stderr);
    shared.registry.gone(key);
    Ending {
        was_ready: addr.is_some(),
        reason: format!("{reason} ({})", describe(status)),
        last_stderr: last_stderr.lock().ok().and_then(|l| l.clone()),
    }
}

/// The next line from a worker's channel, in the shape of a stream item: `None` at EOF.
async fn next_line(
    reader: &mut FdReader<OwnedReadHalf>,
) -> Option<std::io::Result<Result<String, LineError>>> {
    reader.next_line().await.transpose()
}

/// Applies a worker's answer to a hand-off (balancer's `accepted`/`rejected` or Node's
/// `newconn` acknowledgement); a refused connection goes to another worker.
fn apply_answer(shared: &Arc<Shared>, delivery: &mut Delivery, text: &str) {
    let answer = match node_cluster::parse_line(text) {
        Some(Act::Accepted { ack, accepted }) => Some((ack, accepted)),
        Some(_) => None,
        None => match WorkerMessage::parse(text) {
            Ok(WorkerMessage::Accepted { id }) => Some((id, true)),
            Ok(WorkerMessage::Rejected { id }) => Some((id, false)),
            _ => None,
        },
    };
    if let Some((id, accepted)) = answer {
        answered(shared, Some(delivery), id, accepted);
    }
}

/// A worker answered for hand-off `id`: the master's copy is closed if it took the
/// connection, and the connection goes to another worker if it refused.
fn answered(shared: &Arc<Shared>, delivery: Option<&mut Delivery>, id: u64, accepted: bool) {
    if let Some(refused) = delivery.and_then(|d| d.answered(id, accepted)) {
        handoff::redispatch(&shared.backends, [refused]);
    }
}

/// Re-dispatches connections a worker will never take, with one log line.
fn give_to_others(shared: &Arc<Shared>, slot: usize, pid: u32, streams: Vec<TcpStream>) {
    if !streams.is_empty() {
        tracing::info!(
            slot,
            pid,
            connections = streams.len(),
            "giving connections the worker did not take to other workers"
        );
        handoff::redispatch(&shared.backends, streams);
    }
}

/// Spawns the worker process, with a port chosen for it under `--ready port`.
fn spawn(slot: usize, shared: &Shared) -> std::io::Result<(Spawned, Option<u16>)> {
    let config = &shared.config;
    let port = match (config.mode, config.ready) {
        (Mode::Proxy, ReadyArg::Port) => Some(child::free_port()?),
        _ => None,
    };
    // Programs other than the built-in worker also get the shared listener as fd 3.
    let listen_fd = match (&shared.shared_listener, &config.program) {
        (Some(l), WorkerProgram::Command { .. }) => Some(l.as_raw_fd()),
        _ => None,
    };
    let spawned = child::spawn(&child::SpawnSpec {
        program: &config.program,
        slot,
        output: config.worker_output,
        port,
        mode: config.mode,
        listen: shared.listen,
        node_unique_id: config.node_cluster.then_some(slot + 1),
        listen_fd,
    })?;
    Ok((spawned, port))
}

/// Protocol violations of one worker, plus a message-rate window to detect floods.
#[derive(Debug)]
struct Strikes {
    count: u32,
    /// When uninvited descriptors were last counted as a strike.
    last_uninvited: Option<Instant>,
    window: Instant,
    in_window: u32,
}

impl Default for Strikes {
    fn default() -> Self {
        Self {
            count: 0,
            last_uninvited: None,
            window: Instant::now(),
            in_window: 0,
        }
    }
}

impl Strikes {
    fn add(&mut self, slot: usize, pid: u32, what: &str) {
        self.count += 1;
        tracing::warn!(slot, pid, strikes = self.count, "ipc: {what}; ignored");
    }

    /// Descriptors the worker sent that no message asked for (already closed): one strike
    /// and one log line per second in which it happened, however many there were.
    fn uninvited(&mut self, slot: usize, pid: u32, closed: usize) {
        if closed == 0 {
            return;
        }
        let now = Instant::now();
        if self
            .last_uninvited
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_uninvited = Some(now);
            self.add(
                slot,
                pid,
                &format!("{closed} file descriptor(s) sent uninvited, closed"),
            );
        }
    }

    fn message(&mut self, slot: usize, pid: u32) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window == FLOOD_PER_SECOND {
            self.count += 1;
            tracing::warn!(
                slot,
                pid,
                strikes = self.count,
                "ipc: more than {FLOOD_PER_SECOND} messages in a second"
            );
        }
    }
}

/// The next health tick, or never when checks have not started.
async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What must hold before a worker enters rotation.
#[derive(Debug, Clone)]
enum Gate {
    /// Proxy mode: the port is a listening socket held by the worker (or a descendant),
    /// accepts the master's TCP connect and, with an HTTP check, passes it once.
    Probe(u16, Option<String>),
    /// Reuseport mode: the worker holds a socket listening on the client port.
    Listens,
    /// Nothing to check: shared mode, where a worker that is not yet accepting takes no
    /// connections, or `--ready spawn`.
    Trust,
}

/// The gate for a `ready` message, or why the message cannot be admitted.
fn gate_for_ready(
    mode: Mode,
    port: Option<u16>,
    listen_port: u16,
    kind: &CheckKind,
    builtin: bool,
    supports_ping: bool,
) -> Result<Gate, String> {
    match (mode, port) {
        (Mode::Proxy, None) => Err("no port (proxy mode needs the worker's own port)".into()),
        (Mode::Proxy, Some(0)) => Err("port 0".into()),
        (Mode::Proxy, Some(p)) if p == listen_port => Err("the master's own listening port".into()),
        (Mode::Proxy, Some(p)) => {
            let http = match kind.resolve(builtin, supports_ping, true) {
                Check::Http(path) => Some(path),
                _ => None,
            };
            Ok(Gate::Probe(p, http))
        }
        (Mode::ReusePort, Some(p)) if p != listen_port => Err(format!(
            "port {p}, but reuseport workers listen on {listen_port}"
        )),
        (Mode::ReusePort, _) => Ok(Gate::Listens),
        (Mode::Shared, _) => Ok(Gate::Trust),
        (Mode::Handoff, _) => Ok(Gate::Trust),
    }
}

/// Waits until `gate` holds (retrying for up to `patience`, since a worker may announce just
/// before its `listen()` completes) and returns the address it is admitted with.
async fn admit(
    pid: u32,
    gate: Gate,
    listen: SocketAddr,
    timeout: Duration,
    patience: Duration,
) -> Result<SocketAddr, String> {
    let started = Instant::now();
    // A port the worker does not even hold is given up on soon (and logged); one it holds
    // but that fails the probe gets the whole patience, since that may be a passing glitch.
    let mut held = false;
    let mut last;
    loop {
        match &gate {
            Gate::Trust => return Ok(listen),
            Gate::Listens => {
                if owns(pid, listen.port()).await {
                    return Ok(listen);
                }
                last = format!("not listening on port {}", listen.port());
            }
            Gate::Probe(port, http) => {
                let port = *port;
                if owns(pid, port).await {
                    held = true;
                    last = String::new();
                    for addr in [
                        SocketAddr::from(([127, 0, 0, 1], port)),
                        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                    ] {
                        let probed = match proxy::health::tcp(addr, ADMIT_CONNECT_TIMEOUT).await {
                            Ok(()) => match http {
                                Some(path) => proxy::health::http(addr, path, timeout).await,
                                None => Ok(()),
                            },
                            Err(e) => Err(e),
                        };
                        match probed {
                            Ok(()) => return Ok(addr),
                            Err(e) => {
                                if !last.is_empty() {
                                    last.push_str("; ");
                                }
                                last.push_str(&format!("{addr}: {e}"));
                            }
                        }
                    }
                } else {
                    last = format!("port {port} is not a listening socket of this worker");
                }
            }
        }
        let limit = if held || matches!(gate, Gate::Listens) {
            patience
        } else {
            patience.min(ADMIT_MIN)
        };
        if started.elapsed() >= limit {
            return Err(format!("{last} (gave up after {limit:?})"));
        }
        tokio::time::sleep(ADMIT_RETRY).await;
    }
}

/// [`ownership::owns_listening_port`] off the supervisor's thread: it reads `/proc`, which
/// can be slow on a loaded machine, and the supervisor must keep noticing exits meanwhile.
async fn owns(pid: u32, port: u16) -> bool {
    tokio::task::spawn_blocking(move || ownership::owns_listening_port(pid, port))
        .await
        .unwrap_or(false)
}

/// Hands the shared listening socket to a worker, in Node's handle form (see
/// [`worker::protocol::node`]). A failure is only logged: the worker then never acknowledges
/// and is replaced at its ready timeout.
async fn send_listener(write: &OwnedWriteHalf, shared: &Shared) {
    let Some(listener) = &shared.shared_listener else {
        return;
    };
    let fds = [listener.as_fd()];
    let send = worker::fdpass::send_message(write.as_ref(), &MasterMessage::Listener, &fds);
    match tokio::time::timeout(IPC_WRITE_TIMEOUT, send).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not hand the listener to a worker"),
        Err(_) => tracing::warn!("handing the listener to a worker timed out"),
    }
}

/// Stops a worker that is still running: given `patience` (it was sent `shutdown`), it first
/// gets that long to exit by itself; then SIGTERM (and SIGCONT, in case it is stopped) to
/// its process group, SIGKILL after [`WORKER_STOP_TIMEOUT`] (at once if `stop.force`
/// fires), then reaps it.
async fn terminate(
    child: &mut tokio::process::Child,
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

fn log_exit(slot: usize, pid: u32, status: ExitStatus, expected: bool, last_stderr: &LastLine) {
    let status = describe(status);
    if expected {
        tracing::info!(slot, pid, %status, "worker stopped");
        return;
    }
    match last_stderr.lock().ok().and_then(|l| l.clone()) {
        Some(line) => tracing::warn!(slot, pid, %status, last_stderr = %line, "worker exited"),
        None => tracing::warn!(slot, pid, %status, "worker exited"),
    }
}

/// `exit code 3` or `signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
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

/// How a Node cluster worker's `listen()` is answered.
enum Answer {
    /// The primary accepts and hands connections over (`newconn`).
    Key,
    /// The worker accepts on this listening socket itself.
    Handle(Arc<std::net::TcpListener>),
    /// It cannot be served.
    Refuse(String),
}

/// Decides how to serve a cluster worker's `listen()` on `port`. The server balancer balances
/// (the first on a real port) is served by hand-off in proxy and handoff modes, by the shared
/// socket in shared mode and by a socket of its own on the client address in reuseport mode
/// (these two need the ports to agree: Node refuses a handle on another port). Any other
/// server (port 0, or a second port) gets a socket bound as asked, as Node's own primary
/// would do; balancer does not balance it.
fn answer_query(
    shared: &Shared,
    port: i64,
    address: Option<&str>,
    address_type: i64,
    balanced: bool,
) -> Answer {
    let Ok(port) = u16::try_from(port) else {
        return Answer::Refuse("pipes and inherited handles are not supported".into());
    };
    let listen = shared.listen;
    if balanced {
        match shared.config.mode {
            Mode::Proxy | Mode::Handoff => return Answer::Key,
            _ if port != listen.port() => {
                return Answer::Refuse(format!(
                    "it asked for port {port}, but balancer serves port {} in {} mode (use --listen :{port} or --mode handoff)",
                    listen.port(),
                    shared.config.mode
                ))
            }
            Mode::Shared => {
                if let Some(l) = &shared.shared_listener {
                    return Answer::Handle(Arc::clone(l));
                }
            }
            Mode::ReusePort => {
                return match crate::bind_one(listen, true) {
                    Ok(l) => Answer::Handle(Arc::new(l)),
                    Err(e) => Answer::Refuse(format!("binding {listen}: {e}")),
                }
            }
        }
    }
    let ip: std::net::IpAddr = match address.and_then(|a| a.parse().ok()) {
        Some(ip) => ip,
        None if address_type == 6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
        None => std::net::Ipv4Addr::UNSPECIFIED.into(),
    };
    match crate::bind_one(SocketAddr::new(ip, port), port != 0) {
        Ok(l) => Answer::Handle(Arc::new(l)),
        Err(e) => Answer::Refuse(format!("binding {ip}:{port}: {e}")),
    }
}

/// Asks a worker to stop: balancer's `shutdown` to every worker (a Node cluster worker's
/// `process.on('message')` sees it too), and Node's cluster `disconnect` to a cluster worker,
/// which closes its servers and lets it exit once its connections are done.
async fn ask_to_stop(write: &mut OwnedWriteHalf, cluster: bool, primary: &mut Primary) {
    send(write, &MasterMessage::Shutdown).await;
    if cluster {
        send_line(write, &primary.disconnect()).await;
    }
}

/// Sends a line with a listening socket attached (Node cluster replies).
async fn send_handle(write: &OwnedWriteHalf, line: &str, listener: &std::net::TcpListener) {
    let fds = [listener.as_fd()];
    let sent = worker::fdpass::send_with_fds(write.as_ref(), line.as_bytes(), &fds);
    match tokio::time::timeout(IPC_WRITE_TIMEOUT, sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not send a listening socket to a worker"),
        Err(_) => tracing::warn!("sending a listening socket to a worker timed out"),
    }
}

/// Writes one prepared line to a worker (see [`send`]).
async fn send_line(write: &mut OwnedWriteHalf, line: &str) {
    match tokio::time::timeout(IPC_WRITE_TIMEOUT, write.write_all(line.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "ipc send failed"),
        Err(_) => tracing::debug!("ipc send timed out"),
    }
}

/// Writes one message to a worker. Errors and timeouts are only logged: a worker that
/// cannot be written to is gone, going, or not reading, and that is handled elsewhere.
async fn send(write: &mut OwnedWriteHalf, msg: &MasterMessage) {
    match tokio::time::timeout(IPC_WRITE_TIMEOUT, write.write_all(msg.to_line().as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "ipc send failed"),
        Err(_) => tracing::debug!("ipc send timed out"),
    }
}

/// The first 200 characters of an IPC line, for logs.
fn truncate(line: &str) -> &str {
    match line.char_indices().nth(200) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_messages_by_mode() {
        let gate = |mode, port| gate_for_ready(mode, port, 80, &CheckKind::Auto, true, true);
        assert!(gate(Mode::Proxy, None).is_err());
        assert!(gate(Mode::Proxy, Some(0)).is_err());
        assert!(
            gate(Mode::Proxy, Some(80)).is_err(),
            "the master's own port"
        );
        assert!(matches!(
            gate(Mode::Proxy, Some(8080)),
            Ok(Gate::Probe(8080, Some(_)))
        ));
        assert!(matches!(gate(Mode::ReusePort, Some(80)), Ok(Gate::Listens)));
        assert!(matches!(gate(Mode::ReusePort, None), Ok(Gate::Listens)));
        assert!(gate(Mode::ReusePort, Some(8080)).is_err());
        assert!(matches!(gate(Mode::Shared, Some(1)), Ok(Gate::Trust)));
    }

    #[test]
    fn truncate_is_char_safe() {
        let long = "é".repeat(300);
        assert_eq!(truncate(&long).chars().count(), 200);
        assert_eq!(truncate("short"), "short");
    }
}
