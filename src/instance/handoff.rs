//! Hand-off delivery: passing accepted client sockets to a worker over its IPC channel, and
//! keeping the master's copy of each until the worker says it took it, so that a worker
//! that refuses a connection or dies before taking it does not lose the client.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;

use tokio::net::TcpStream;

use worker::protocol::{MasterMessage, WorkerMessage};

use worker::node::{ClusterMessage, Primary};

use super::context::Context;
use super::ipc::{Ipc, WRITE_TIMEOUT};
use super::run::Worker;

/// Connections queued for one worker before the proxy offers them to the next one instead.
pub const QUEUE: usize = 1024;
/// How often a handle (a connection, or the shared listener) is sent again after Node's
/// `NODE_HANDLE_NACK`; Node's own primary gives up after 3 retransmissions too.
pub(super) const MAX_RESENDS: u32 = 3;

/// How the worker expects connections.
#[derive(Debug, Clone)]
pub enum Format {
    /// balancer's `{"type":"conn","id":N}`, answered by `accepted`/`rejected`.
    Balancer,
    /// Node cluster's `newconn` for server `key`, answered by `{"ack":seq,"accepted":…}`.
    NodeCluster {
        /// The key balancer gave the worker's balanced server.
        key: String,
    },
}

/// The hand-off state of one worker.
#[derive(Debug)]
pub struct Delivery {
    format: Format,
    next_id: u64,
    /// Connections sent and not yet answered, by id (Node: by the `newconn`'s seq).
    pending: HashMap<u64, TcpStream>,
    /// Node only: ids whose handle Node has not acknowledged yet, oldest first, with how
    /// often each was re-sent.
    unacked: VecDeque<(u64, String, u32)>,
}

impl Delivery {
    /// A worker that takes connections in `format`.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            next_id: 0,
            pending: HashMap::new(),
            unacked: VecDeque::new(),
        }
    }

    /// Sends `stream` to the worker. On a failed send the stream is returned, to go to
    /// another worker.
    pub async fn deliver(
        &mut self,
        ipc: &Ipc,
        primary: &mut Primary,
        stream: TcpStream,
    ) -> Result<(), TcpStream> {
        let (id, line) = match &self.format {
            Format::Balancer => {
                let id = self.next_id;
                self.next_id += 1;
                (id, MasterMessage::Conn { id }.to_line())
            }
            Format::NodeCluster { key } => {
                let (line, seq) = primary.newconn(key);
                (seq, line)
            }
        };
        if let Err(e) = send_fd(ipc, &line, &stream).await {
            tracing::debug!(error = %e, "hand-off send failed");
            return Err(stream);
        }
        if matches!(self.format, Format::NodeCluster { .. }) {
            self.unacked.push_back((id, line, 0));
        }
        self.pending.insert(id, stream);
        Ok(())
    }

    /// The worker answered for connection `id`. Returns the master's copy if it refused, so
    /// it can go to another worker; a taken connection's copy is closed here.
    pub fn answered(&mut self, id: u64, accepted: bool) -> Option<TcpStream> {
        let stream = self.pending.remove(&id)?;
        (!accepted).then_some(stream)
    }

    /// Node acknowledged the oldest handle.
    pub fn handle_acked(&mut self) {
        self.unacked.pop_front();
    }

    /// Node did not get the oldest handle: send it again (a few times at most). Returns a
    /// connection that is given up on, to go to another worker.
    pub async fn handle_nacked(&mut self, ipc: &Ipc) -> Option<TcpStream> {
        let (id, line, resent) = self.unacked.pop_front()?;
        let stream = self.pending.get(&id)?;
        if resent < MAX_RESENDS && send_fd(ipc, &line, stream).await.is_ok() {
            self.unacked.push_front((id, line, resent + 1));
            return None;
        }
        self.pending.remove(&id)
    }

    /// Whether some sent connection is still unanswered.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Every connection the worker has not taken, for other workers.
    pub fn into_unanswered(self) -> impl Iterator<Item = TcpStream> {
        self.pending.into_values()
    }
}

async fn send_fd(ipc: &Ipc, line: &str, stream: &TcpStream) -> std::io::Result<()> {
    ipc.send(line, &[stream.as_fd()], WRITE_TIMEOUT).await
}

/// Gives connections that a worker did not take to other workers, through the proxy's own
/// entry point, as if just accepted: `--connect-timeout`, `--idle-timeout`, a `--max-conns`
/// permit, the connection tracker (drained at stop) and the counters.
pub(super) fn redispatch(ctx: &Context, streams: impl IntoIterator<Item = TcpStream>) {
    for stream in streams {
        ctx.proxy.dispatch(stream, &ctx.conns);
    }
}

impl Worker {
    /// The proxy queued a client for this worker: send it, or give it to another worker if
    /// the send fails.
    pub(super) async fn on_client(&mut self, client: TcpStream) {
        if let Some(d) = self.delivery.as_mut() {
            if let Err(client) = d.deliver(&self.ipc, &mut self.node.primary, client).await {
                redispatch(&self.ctx, [client]);
            }
        }
    }

    /// Node did not get the oldest handle of a connection: sent again, or given up on and
    /// given to another worker. `false` if no connection was waiting for it.
    pub(super) async fn on_connection_nack(&mut self) -> bool {
        let Some(d) = self.delivery.as_mut() else {
            return false;
        };
        if let Some(lost) = d.handle_nacked(&self.ipc).await {
            redispatch(&self.ctx, [lost]);
        }
        true
    }

    /// The worker answered for hand-off `id`: the master's copy is closed if it took the
    /// connection, and the connection goes to another worker if it refused.
    pub(super) fn answered(&mut self, id: u64, accepted: bool) {
        if let Some(refused) = self
            .delivery
            .as_mut()
            .and_then(|d| d.answered(id, accepted))
        {
            redispatch(&self.ctx, [refused]);
        }
    }

    /// A line read while stopping, when only answers to hand-offs still matter.
    pub(super) fn apply_answer(&mut self, text: &str) {
        let answer = match WorkerMessage::parse(text) {
            Ok(WorkerMessage::Cluster(ClusterMessage::Accepted { ack, accepted })) => {
                Some((ack, accepted))
            }
            Ok(WorkerMessage::Accepted { id }) => Some((id, true)),
            Ok(WorkerMessage::Rejected { id }) => Some((id, false)),
            _ => None,
        };
        if let Some((id, accepted)) = answer {
            self.answered(id, accepted);
        }
    }

    /// Re-dispatches connections this worker will never take, with one log line.
    pub(super) fn give_to_others(&self, streams: Vec<TcpStream>) {
        if !streams.is_empty() {
            tracing::info!(
                slot = self.slot,
                pid = self.pid,
                connections = streams.len(),
                "giving connections the worker did not take to other workers"
            );
            redispatch(&self.ctx, streams);
        }
    }
}
