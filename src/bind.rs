//! Binding the client address as each `--mode` needs it: one `SO_REUSEPORT` listener per
//! proxy thread (proxy, handoff), one shared socket (shared), or a probe bind that checks the
//! address and resolves port 0 (reuseport). Also the one place sockets are bound for Node
//! cluster workers.

use std::net::SocketAddr;
use std::sync::Arc;

use worker::protocol::Mode;

use crate::config::Config;

/// Listen backlog: connections wait here while all `--max-conns` are busy, and during bursts.
const LISTEN_BACKLOG: u32 = 4096;

/// The client address, bound as the mode needs it.
pub struct Bound {
    /// The address clients connect to, with the real port.
    pub local: SocketAddr,
    /// Proxy mode: one listener per proxy thread.
    pub proxy_listeners: Vec<std::net::TcpListener>,
    /// Shared mode: the one listener handed to every worker.
    pub shared_listener: Option<Arc<std::net::TcpListener>>,
}

impl Bound {
    /// Binds `config.listen` for `config.mode`, with one listener per proxy thread.
    pub fn new(config: &Config, threads: usize) -> std::io::Result<Self> {
        let addr = config.listen;
        Ok(match config.mode {
            Mode::Proxy | Mode::Handoff => {
                let listeners = bind_all(addr, threads)?;
                Self {
                    local: listeners[0].local_addr()?,
                    proxy_listeners: listeners,
                    shared_listener: None,
                }
            }
            Mode::Shared => {
                // One socket and no SO_REUSEPORT: nothing else may bind beside it.
                let listener = bind_one(addr, false)?;
                Self {
                    local: listener.local_addr()?,
                    proxy_listeners: Vec::new(),
                    shared_listener: Some(Arc::new(listener)),
                }
            }
            Mode::ReusePort => {
                // The workers bind it; binding once here reports a taken port or a denied
                // one at start-up, and resolves port 0. It is closed before any worker runs,
                // or the kernel would queue connections on a socket nobody accepts from.
                let probe = bind_one(addr, true)?;
                Self {
                    local: probe.local_addr()?,
                    proxy_listeners: Vec::new(),
                    shared_listener: None,
                }
            }
        })
    }
}

/// Binds `count` client listeners on `addr` with `SO_REUSEPORT`, one per proxy thread, so
/// the kernel spreads new connections over the threads and no connection ever moves between
/// threads. `SO_REUSEADDR` lets a restarted master bind while old connections sit in
/// TIME_WAIT. With port 0, the first bind picks the port and the others share it.
fn bind_all(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr, true)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_one(addr, true)?);
    }
    Ok(all)
}

/// Binds one listening socket on `addr` (non-blocking, close-on-exec, `TCP_NODELAY` for
/// accepted sockets, IPv6-only for an IPv6 address), with `SO_REUSEPORT` if `reuse_port`.
pub fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    if addr.is_ipv6() {
        // `[::]:P` means IPv6 only here; IPv4 clients use an IPv4 address.
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit it: one system call here instead of one per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
