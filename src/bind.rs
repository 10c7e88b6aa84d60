//! Binding the client address as each `--mode` needs it: one `SO_REUSEPORT` listener per
//! proxy thread (proxy, handoff), one shared socket (shared), or a probe bind that checks the
//! address and resolves port 0 (reuseport). Also the one place sockets are bound for Node
//! cluster workers.
//!
//! A second instance on the same address must fail with "address in use", and no foreign
//! socket may take a share of our clients. `SO_REUSEPORT` alone lets any socket of the same
//! user join the group (and split the traffic), so two guards, both measured with the
//! `datapath::listen` tests:
//! - a probe bind first, *without* `SO_REUSEPORT` (and not listening, so our own group can
//!   still bind beside it): it fails with `EADDRINUSE` while anyone listens on the address,
//!   including another balancer's group. It also picks the port for port 0.
//! - a classic BPF program on the group (`SO_ATTACH_REUSEPORT_CBPF`) that picks one of *our*
//!   `n` sockets at random: a socket that joins later sits at index `n` or above and is never
//!   chosen. The per-thread listeners are kept: each proxy thread accepts on its own socket,
//!   with no wake-ups shared between threads.
//!
//! Two instances started in the same instant can both pass the probe (nobody listens yet);
//! the second one's sockets then never get a connection, thanks to the program.

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
                let probe = probe(addr)?;
                let listeners = bind_all(probe.local_addr()?, threads)?;
                drop(probe);
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
                let probe = probe(addr)?;
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
    steer_to_own(&all[0], all.len())?;
    Ok(all)
}

/// Binds `addr` without `SO_REUSEPORT` and without listening: fails with `EADDRINUSE` if
/// any socket listens there (ours would join their group otherwise). `SO_REUSEADDR` lets a
/// restarted master past old connections in TIME_WAIT, and lets our own group bind beside
/// this socket while it is held, since it does not listen.
fn probe(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Attaches to the `SO_REUSEPORT` group of `listener` a classic BPF program that returns a
/// random index below `count`: new connections go only to the first `count` sockets of the
/// group (ours, bound before anyone else could join), never to a socket that joined later.
fn steer_to_own(listener: &std::net::TcpListener, count: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let count = u32::try_from(count.max(1)).unwrap_or(u32::MAX);
    // ld rand; mod #count; ret a
    let mut program = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: count,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the fd is open; `prog` points at `program`, which outlives the call, and its
    // size is passed with it. The kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
