//! The Node cluster primary's policy: how balancer answers an unchanged cluster program's
//! `online`, `queryServer`, `listening`, `newconn` answers, `close` and
//! `exitedAfterDisconnect`. The wire shapes are [`worker::node`]'s; this file decides
//! which server balancer balances and how each `listen()` is served.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use worker::protocol::Mode;

use worker::node::{self as wire, ClusterMessage as Act, Primary};

use super::admission::Gate;
use super::context::Context;
use super::handoff::{self, Delivery};
use super::ipc::WRITE_TIMEOUT;
use super::run::Worker;
use crate::state::Reason;

/// One cluster worker, as its primary sees it.
#[derive(Debug, Default)]
pub(super) struct Node {
    /// The primary's message numbering.
    pub(super) primary: Primary,
    /// Whether it sent cluster `online`: it is a cluster worker, stopped with `disconnect`.
    pub(super) online: bool,
    /// The key of the server balancer serves for this worker.
    balanced_key: Option<String>,
    /// The port that server's `listen()` asked for: a `ready` naming it means that server
    /// (the seed's `listen(port); process.send(`${port} ready`)`).
    pub(super) balanced_port: Option<u16>,
    /// Handles sent outside hand-off that Node will acknowledge.
    pub(super) other_handles_unacked: u32,
}

impl Worker {
    /// One `NODE_CLUSTER` message.
    pub(super) async fn on_cluster(&mut self, act: Act) {
        let (slot, pid) = (self.slot, self.pid);
        match act {
            Act::Online => {
                self.node.online = true;
                self.spoke_ipc = true;
                tracing::info!(slot, pid, "node cluster worker online");
            }
            Act::QueryServer {
                seq,
                port,
                address,
                address_type,
                index,
            } => {
                let server = wire::server_key(address.as_deref(), port, address_type, index);
                self.on_query_server(seq, port, address.as_deref(), address_type, server)
                    .await;
            }
            Act::Listening { key: server } => {
                if self.node.balanced_key.as_ref() == Some(&server) && self.may_admit() {
                    if matches!(self.ctx.config().mode, Mode::Proxy | Mode::Handoff) {
                        let format = handoff::Format::NodeCluster { key: server };
                        self.delivery = Some(Delivery::new(format));
                    }
                    self.admit_announced(Gate::Trust);
                }
            }
            Act::Accepted { ack, accepted } => self.answered(ack, accepted),
            Act::Close { key: server } => {
                if self.node.balanced_key.as_ref() == Some(&server) {
                    let stopping = self.stop.graceful.is_cancelled();
                    self.rotation.leave(Reason::ClosedServer, stopping);
                }
            }
            Act::ExitedAfterDisconnect { seq } => {
                let line = self.node.primary.ack(seq);
                self.ipc.send_line(&line).await;
            }
            Act::Other(act) => tracing::debug!(slot, pid, act, "node cluster message ignored"),
        }
    }

    /// `server.listen()` in the worker: answered with a key, a listening handle, or an
    /// error.
    async fn on_query_server(
        &mut self,
        seq: u64,
        port: i64,
        address: Option<&str>,
        address_type: i64,
        server: String,
    ) {
        let balanced = port > 0 && self.node.balanced_key.as_ref().is_none_or(|k| *k == server);
        let answer = answer_query(&self.ctx, port, address, address_type, balanced);
        if balanced && !matches!(answer, Answer::Refuse(_)) {
            if let Ok(port) = u16::try_from(port) {
                self.node.balanced_port = Some(port);
                // A `ready` for this port that came first (whatever the order of `listen`
                // and `send`) is not probed as a port of the worker's own: the worker never
                // binds it; its `listening` admits it.
                if self.admission.cancel_probe_of(port) {
                    tracing::debug!(
                        slot = self.slot,
                        pid = self.pid,
                        port,
                        "ready named the worker's cluster server; admitted on its listening"
                    );
                }
            }
        }
        match answer {
            Answer::Key => {
                let line = self.node.primary.reply_key(seq, &server);
                self.node.balanced_key = Some(server);
                self.ipc.send_line(&line).await;
            }
            Answer::Handle(listener) => {
                let line = self.node.primary.reply_handle(seq, &server);
                if balanced {
                    self.node.balanced_key = Some(server);
                }
                self.node.other_handles_unacked += 1;
                match self
                    .ipc
                    .send(&line, &[listener.as_fd()], WRITE_TIMEOUT)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        tracing::warn!("sending a listening socket to a worker timed out")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not send a listening socket to a worker")
                    }
                }
            }
            Answer::Refuse(why) => {
                let (slot, pid) = (self.slot, self.pid);
                tracing::warn!(
                    slot,
                    pid,
                    port,
                    "node cluster worker's listen refused: {why}"
                );
                let line = self.node.primary.reply_error(seq, wire::UV_EADDRINUSE);
                self.ipc.send_line(&line).await;
            }
        }
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
    ctx: &Context,
    port: i64,
    address: Option<&str>,
    address_type: i64,
    balanced: bool,
) -> Answer {
    let Ok(port) = u16::try_from(port) else {
        return Answer::Refuse("pipes and inherited handles are not supported".into());
    };
    let listen = ctx.listen;
    if balanced {
        match ctx.config().mode {
            Mode::Proxy | Mode::Handoff => return Answer::Key,
            _ if port != listen.port() => {
                return Answer::Refuse(format!(
                    "it asked for port {port}, but balancer serves port {} in {} mode (use --listen :{port} or --mode handoff)",
                    listen.port(),
                    ctx.config().mode
                ))
            }
            Mode::Shared => {
                if let Some(l) = &ctx.shared_listener {
                    return Answer::Handle(Arc::clone(l));
                }
            }
            Mode::ReusePort => {
                return match crate::bind::bind_one(listen, true) {
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
    match crate::bind::bind_one(SocketAddr::new(ip, port), port != 0) {
        Ok(l) => Answer::Handle(Arc::new(l)),
        Err(e) => Answer::Refuse(format!("binding {ip}:{port}: {e}")),
    }
}
