//! Hand-off: passing accepted client sockets to a worker over its IPC channel, and keeping
//! the master's copy of each until the worker says it took it, so that a worker that
//! refuses a connection or dies before taking it does not lose the client.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::OwnedWriteHalf;
use tokio::net::TcpStream;

use proxy::{Backends, ForwardConfig};
use worker::protocol::MasterMessage;

use crate::node_cluster::Primary;

/// Connections queued for one worker before the proxy offers them to the next one instead.
pub const QUEUE: usize = 1024;
/// How long a hand-off write may take before the worker is considered stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a handle is sent again after Node's `NODE_HANDLE_NACK`.
const MAX_RESENDS: u32 = 3;

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
        write: &OwnedWriteHalf,
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
        if let Err(e) = send_fd(write, &line, &stream).await {
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
    pub async fn handle_nacked(&mut self, write: &OwnedWriteHalf) -> Option<TcpStream> {
        let (id, line, resent) = self.unacked.pop_front()?;
        let stream = self.pending.get(&id)?;
        if resent < MAX_RESENDS && send_fd(write, &line, stream).await.is_ok() {
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

async fn send_fd(write: &OwnedWriteHalf, line: &str, stream: &TcpStream) -> std::io::Result<()> {
    let fds = [stream.as_fd()];
    match tokio::time::timeout(
        SEND_TIMEOUT,
        worker::fdpass::send_with_fds(write.as_ref(), line.as_bytes(), &fds),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Gives connections that a worker did not take to other workers, through the same path as
/// new clients (hand-off or proxy). Runs on the supervisor's runtime; rare.
pub fn redispatch(backends: &Arc<Backends>, streams: impl IntoIterator<Item = TcpStream>) {
    for stream in streams {
        let backends = Arc::clone(backends);
        tokio::spawn(async move {
            match proxy::forward(stream, &backends, &ForwardConfig::default()).await {
                Ok(_) => tracing::debug!("connection re-dispatched"),
                Err(e) => {
                    tracing::warn!(error = %e, "connection lost after its worker did not take it")
                }
            }
        });
    }
}
