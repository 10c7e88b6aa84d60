//! Starting one instance: the worker process (with a port chosen for it under `--ready
//! port` and the shared listener as fd 3 where it applies), its output relays, its registry
//! entry, and the [`Worker`] that drives the rest of its life.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use worker::protocol::Mode;

use crate::child::{self, Spawned};
use crate::cli::ReadyArg;
use crate::config::WorkerProgram;
use crate::health::Tally;
use crate::output::Output;

use super::admission::Admission;
use super::context::{Context, StopTokens};
use super::handoff;
use super::health::Health;
use super::ipc::Ipc;
use super::node::Node;
use super::process::Process;
use super::rotation::Rotation;
use super::run::Worker;
use super::strikes::Strikes;
use super::Ending;
use crate::state::{Reason, State};

impl Worker {
    /// Spawns the worker process for `slot` and everything that follows it; an [`Ending`]
    /// if the process could not be started.
    pub(super) fn spawn(
        slot: usize,
        ctx: Arc<Context>,
        stop: StopTokens,
        retire: mpsc::Receiver<()>,
        state: watch::Sender<State>,
    ) -> Result<Self, Ending> {
        let config = ctx.config().clone();
        let (spawned, assigned_port) = match spawn_process(slot, &ctx) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(slot, error = %e, "could not start worker");
                return Err(Ending {
                    was_ready: false,
                    reason: Reason::SpawnFailed(e.to_string()).to_string(),
                    last_stderr: None,
                    daemonized: false,
                });
            }
        };
        let Spawned {
            mut child,
            pid,
            ipc,
        } = spawned;
        // Its instance reaps it: the orphan reaper must never wait for it.
        ctx.orphans.started(pid);
        let key = ctx.next_key();
        tracing::info!(slot, pid, "worker spawned");
        ctx.registry.spawned(key, slot, pid);
        let output = Output::start(&mut child, slot, pid, config.worker_output);
        let parts = Parts {
            slot,
            pid,
            key,
            child: Process::Spawned(child),
            ipc,
            output,
            assigned_port,
        };
        Ok(Worker::assemble(parts, ctx, stop, retire, state))
    }

    /// A worker's state at the start of its life in this image, around its process, channel
    /// and output (spawned now, or adopted after an upgrade).
    pub(super) fn assemble(
        parts: Parts,
        ctx: Arc<Context>,
        stop: StopTokens,
        retire: mpsc::Receiver<()>,
        state: watch::Sender<State>,
    ) -> Self {
        let Parts {
            slot,
            pid,
            key,
            child,
            ipc,
            output,
            assigned_port,
        } = parts;
        let config = ctx.config().clone();
        let (events_tx, events) = mpsc::channel(4);
        // Hand-off: the proxy queues clients here; `delivery` passes them to the worker.
        let (handoff_tx, handoff_rx) = mpsc::channel::<TcpStream>(handoff::QUEUE);
        let health = &config.health;
        Worker {
            rotation: Rotation::new(Arc::clone(&ctx), slot, pid, key, state),
            admission: Admission::new(
                tokio::time::Instant::now() + config.ready_timeout,
                assigned_port,
            ),
            health: Health::new(Tally::new(health.rise, health.fall)),
            ctx,
            stop,
            slot,
            pid,
            key,
            child,
            ipc: Ipc::new(ipc),
            retire,
            events_tx,
            events,
            strikes: Strikes::default(),
            output,
            spoke_ipc: false,
            supports_ping: false,
            listener_sends: 0,
            drain_deadline: None,
            asked_to_stop: false,
            node: Node::default(),
            handoff_tx,
            handoff_rx,
            delivery: None,
        }
    }
}

/// What a worker's life in this image starts from.
pub(super) struct Parts {
    pub(super) slot: usize,
    pub(super) pid: u32,
    /// Its backend key.
    pub(super) key: u64,
    pub(super) child: Process,
    /// The master's end of its channel.
    pub(super) ipc: tokio::net::UnixStream,
    pub(super) output: Output,
    /// The port chosen for it under `--ready port`.
    pub(super) assigned_port: Option<u16>,
}

/// Spawns the worker process, with a port chosen for it under `--ready port`.
fn spawn_process(slot: usize, ctx: &Context) -> std::io::Result<(Spawned, Option<u16>)> {
    let config = ctx.config();
    let port = match (config.mode, config.ready) {
        (Mode::Proxy, ReadyArg::Port) => Some(child::free_port()?),
        _ => None,
    };
    // Programs other than the built-in worker also get the shared listener as fd 3.
    let listen_fd = match (&ctx.shared_listener, &config.program) {
        (Some(l), WorkerProgram::Command { .. }) => Some(l.as_raw_fd()),
        _ => None,
    };
    let spawned = child::spawn(&child::SpawnSpec {
        program: &config.program,
        slot,
        output: config.worker_output,
        port,
        mode: config.mode,
        listen: ctx.listen,
        node_unique_id: config.node_cluster.then_some(slot + 1),
        listen_fd,
    })?;
    Ok((spawned, port))
}
