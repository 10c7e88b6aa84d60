//! What an admitted worker leaves for the next master image at an in-place upgrade (see
//! `crate::upgrade`): its pid, slot, backend key and address, the descriptor numbers of its
//! IPC channel and output pipes, and what it said about itself. An instance records itself
//! here when it is admitted and removes itself when its life ends, so the record's
//! descriptors are open for exactly as long as it is listed.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::context::Context;
use super::process::{Adopted, Process};
use super::run::Worker;
use crate::state::{Reason, State};

/// One worker, as one master image hands it to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedWorker {
    /// Its slot.
    pub slot: usize,
    /// Its pid (the same after the upgrade).
    pub pid: u32,
    /// Its backend key; the next image hands out keys above every carried one.
    pub key: u64,
    /// Where it was admitted.
    pub addr: SocketAddr,
    /// When it was spawned (seconds since the Unix epoch), for its uptime.
    pub started: u64,
    /// The master's end of its IPC channel.
    pub ipc_fd: RawFd,
    /// The read ends of its stdout and stderr pipes (`--worker-output prefix`).
    pub output_fds: [Option<RawFd>; 2],
    /// Whether it spoke the IPC protocol (it acts on `shutdown`).
    pub spoke_ipc: bool,
    /// Whether it announced the `ping` feature (its checks are IPC pings).
    pub supports_ping: bool,
}

impl CarriedWorker {
    /// Every descriptor this record names.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(self.ipc_fd).chain(self.output_fds.iter().flatten().copied())
    }
}

impl Worker {
    /// Records this worker, just admitted at `addr`, as one an upgrade can carry.
    pub(super) fn record_carried(&self, addr: SocketAddr) {
        let started = (self.ctx.registry.workers().into_iter())
            .find(|w| w.instance == self.key)
            .map_or(0, |w| w.started);
        self.ctx.carry(CarriedWorker {
            slot: self.slot,
            pid: self.pid,
            key: self.key,
            addr,
            started,
            ipc_fd: self.ipc.as_raw_fd(),
            output_fds: self.output.carried_fds(),
            spoke_ipc: self.spoke_ipc,
            supports_ping: self.supports_ping,
        });
    }

    /// Takes a carried worker over in this image: its channel, pipes and pid become an
    /// instance's, admitted at its address. `Err` says why it cannot be (its process is
    /// gone, an fd is not what it should be); the caller then treats it as exited.
    pub(super) fn adopt(
        carried: Inherited,
        ctx: Arc<Context>,
        stop: super::context::StopTokens,
        retire: tokio::sync::mpsc::Receiver<()>,
        state: tokio::sync::watch::Sender<State>,
    ) -> Result<Self, super::Ending> {
        let Inherited {
            record,
            ipc,
            output,
        } = carried;
        let (slot, pid) = (record.slot, record.pid);
        let fail = |why: String| {
            tracing::error!(slot, pid, error = %why, "could not adopt worker after the upgrade");
            super::Ending {
                was_ready: false,
                reason: Reason::SpawnFailed(why).to_string(),
                last_stderr: None,
                daemonized: false,
            }
        };
        let process = Adopted::open(pid).map_err(|e| fail(format!("pidfd_open: {e}")))?;
        ipc.set_nonblocking(true)
            .map_err(|e| fail(format!("ipc channel: {e}")))?;
        let ipc =
            tokio::net::UnixStream::from_std(ipc).map_err(|e| fail(format!("ipc channel: {e}")))?;
        let config = ctx.config().clone();
        ctx.registry.adopted(record.key, slot, pid, record.started);
        let output = crate::output::Output::adopt(output, slot, pid, config.worker_output);
        let mut worker = Worker::assemble(
            super::spawn::Parts {
                slot,
                pid,
                key: record.key,
                child: Process::Adopted(process),
                ipc,
                output,
                assigned_port: None,
            },
            ctx,
            stop,
            retire,
            state,
        );
        worker.spoke_ipc = record.spoke_ipc;
        worker.supports_ping = record.supports_ping;
        tracing::info!(slot, pid, addr = %record.addr, "worker adopted after the upgrade");
        worker.on_admitted_as(record.addr, Reason::Adopted);
        worker.record_carried(record.addr);
        Ok(worker)
    }
}

/// A carried worker with its descriptors taken over by this image.
#[derive(Debug)]
pub struct Inherited {
    /// What the previous image said about it.
    pub record: CarriedWorker,
    /// Its IPC channel.
    pub ipc: std::os::unix::net::UnixStream,
    /// Its stdout and stderr pipes.
    pub output: [Option<std::os::fd::OwnedFd>; 2],
}
