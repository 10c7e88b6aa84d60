//! uring-proxy: a measurement spike for issue #15's "kernel data paths: io_uring" lead, not a
//! product. One thread, one io_uring: a multishot accept on the listener, a connect to the next
//! backend round-robin, then recv/send both ways with one plain 16 KiB buffer per direction,
//! and both sockets closed (through the ring) at EOF or error of either side, as balancer's
//! default tcp path does. Every socket operation after `listen` goes through the ring, so the
//! only per-connection system calls are `socket`, two `setsockopt(TCP_NODELAY)` and the
//! `io_uring_enter`s that batch everything else.
//!
//! Hand-written because what it measures is the raw ring: tokio-uring and monoio add their
//! own runtimes and buffer ownership on top, which is exactly what the spike must not
//! count. It is a standalone package (an empty `[workspace]` table) so CI never builds it.
//!
//!     uring-proxy LISTEN BACKEND [BACKEND...]

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;

/// Bytes per direction per connection: one HTTP exchange fits, like balancer's 16 KiB.
const BUF: usize = 16 * 1024;
/// Ring entries: enough for every in-flight op of a few hundred connections per enter.
const ENTRIES: u32 = 4096;

/// What a completion is for, in the low byte of its user_data (the connection slot above).
const ACCEPT: u64 = 0;
const CONNECT: u64 = 1;
const RECV_C: u64 = 2; // recv from the client, into `up`
const SEND_B: u64 = 3; // send `up` to the backend
const RECV_B: u64 = 4; // recv from the backend, into `down`
const SEND_C: u64 = 5; // send `down` to the client
/// Completions of cancels and closes carry no connection: nothing waits on them.
const IGNORE: u64 = 6;

/// One proxied pair. Boxed so the buffers and the sockaddr the kernel reads stay put.
struct Conn {
    client: RawFd,
    backend: RawFd,
    addr: libc::sockaddr_storage,
    addrlen: libc::socklen_t,
    up: Box<[u8; BUF]>,
    down: Box<[u8; BUF]>,
    /// Bytes of `up`/`down` received and of them already sent.
    up_len: usize,
    up_sent: usize,
    down_len: usize,
    down_sent: usize,
    /// Ops in the ring that point into this struct; it is freed when this reaches 0.
    inflight: u32,
    closing: bool,
}

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (unspecified) address.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: fd is a TCP socket we own; the option value is a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

struct Proxy {
    ring: IoUring,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    backends: Vec<(libc::sockaddr_storage, libc::socklen_t, i32)>,
    next: usize,
    listener: RawFd,
}

impl Proxy {
    /// Queues `e`, submitting what is queued first when the ring is full.
    fn push(&mut self, e: squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: every entry built here points into a boxed Conn that stays alive (its
            // `inflight` counts the entry) until the entry's completion is reaped.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn accept(&mut self) -> std::io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(self.listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ACCEPT);
        self.push(e)
    }

    fn op(&mut self, slot: usize, kind: u64) -> std::io::Result<()> {
        let Some(c) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        let ud = (slot as u64) << 8 | kind;
        let e = match kind {
            CONNECT => opcode::Connect::new(
                types::Fd(c.backend),
                &c.addr as *const _ as *const libc::sockaddr,
                c.addrlen,
            )
            .build(),
            RECV_C => opcode::Recv::new(types::Fd(c.client), c.up.as_mut_ptr(), BUF as u32).build(),
            RECV_B => {
                opcode::Recv::new(types::Fd(c.backend), c.down.as_mut_ptr(), BUF as u32).build()
            }
            SEND_B => opcode::Send::new(
                types::Fd(c.backend),
                c.up[c.up_sent..].as_ptr(),
                (c.up_len - c.up_sent) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build(),
            SEND_C => opcode::Send::new(
                types::Fd(c.client),
                c.down[c.down_sent..].as_ptr(),
                (c.down_len - c.down_sent) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build(),
            _ => unreachable!("op kinds are the constants above"),
        };
        c.inflight += 1;
        self.push(e.user_data(ud))
    }

    /// EOF or error on either side: cancel what is in flight on both sockets; the
    /// connection is closed and freed when its last op completes (`reap`).
    fn close(&mut self, slot: usize) -> std::io::Result<()> {
        let Some(c) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        if c.closing {
            return Ok(());
        }
        c.closing = true;
        let (a, b) = (c.client, c.backend);
        for fd in [a, b] {
            let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(IGNORE);
            self.push(e)?;
        }
        self.reap(slot)
    }

    /// Frees a closing connection once nothing in the ring points into it.
    fn reap(&mut self, slot: usize) -> std::io::Result<()> {
        let Some(c) = self.conns[slot].as_ref() else {
            return Ok(());
        };
        if !c.closing || c.inflight > 0 {
            return Ok(());
        }
        let (a, b) = (c.client, c.backend);
        self.conns[slot] = None;
        self.free.push(slot);
        for fd in [a, b] {
            self.push(opcode::Close::new(types::Fd(fd)).build().user_data(IGNORE))?;
        }
        Ok(())
    }

    fn new_conn(&mut self, client: RawFd) -> std::io::Result<()> {
        let (addr, addrlen, family) = self.backends[self.next % self.backends.len()];
        self.next = self.next.wrapping_add(1);
        // SAFETY: plain socket(2); the result is checked.
        let backend = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if backend < 0 {
            // SAFETY: client is the fd accept just gave us and nothing else holds it.
            unsafe { libc::close(client) };
            return Ok(());
        }
        nodelay(client);
        nodelay(backend);
        let conn = Box::new(Conn {
            client,
            backend,
            addr,
            addrlen,
            up: Box::new([0; BUF]),
            down: Box::new([0; BUF]),
            up_len: 0,
            up_sent: 0,
            down_len: 0,
            down_sent: 0,
            inflight: 0,
            closing: false,
        });
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.op(slot, CONNECT)
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) -> std::io::Result<()> {
        let kind = ud & 0xff;
        if kind == IGNORE {
            return Ok(());
        }
        if kind == ACCEPT {
            if res >= 0 {
                self.new_conn(res)?;
            }
            if !cqueue::more(flags) {
                self.accept()?;
            }
            return Ok(());
        }
        let slot = (ud >> 8) as usize;
        let Some(c) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        c.inflight -= 1;
        if c.closing {
            return self.reap(slot);
        }
        if res < 0 || (res == 0 && kind != CONNECT) {
            // An error on any op, or EOF (a 0-byte recv; connect's success is 0 too):
            // close both, like balancer's default.
            return self.close(slot);
        }
        let n = res as usize;
        match kind {
            CONNECT => {
                self.op(slot, RECV_C)?;
                self.op(slot, RECV_B)
            }
            RECV_C => {
                (c.up_len, c.up_sent) = (n, 0);
                self.op(slot, SEND_B)
            }
            RECV_B => {
                (c.down_len, c.down_sent) = (n, 0);
                self.op(slot, SEND_C)
            }
            SEND_B => {
                c.up_sent += n;
                let next = if c.up_sent < c.up_len { SEND_B } else { RECV_C };
                self.op(slot, next)
            }
            SEND_C => {
                c.down_sent += n;
                let next = if c.down_sent < c.down_len {
                    SEND_C
                } else {
                    RECV_B
                };
                self.op(slot, next)
            }
            _ => Ok(()),
        }
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.accept()?;
        let mut done = Vec::with_capacity(ENTRIES as usize);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            done.clear();
            done.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &done {
                self.complete(ud, res, flags)?;
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: uring-proxy LISTEN BACKEND [BACKEND...]");
        return ExitCode::from(2);
    }
    let mut backends = Vec::new();
    for b in &args[1..] {
        match b.parse::<SocketAddr>() {
            Ok(a) => {
                let (ss, len) = sockaddr(&a);
                let fam = if a.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                backends.push((ss, len, fam));
            }
            Err(e) => {
                eprintln!("uring-proxy: backend {b:?}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match TcpListener::bind(&args[0]) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("uring-proxy: listen {}: {e}", args[0]);
            return ExitCode::FAILURE;
        }
    };
    let ring = match IoUring::new(ENTRIES) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("uring-proxy: io_uring_setup: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(a) = listener.local_addr() {
        println!("listening addr={a}");
    }
    let mut p = Proxy {
        ring,
        conns: Vec::new(),
        free: Vec::new(),
        backends,
        next: 0,
        listener: listener.as_raw_fd(),
    };
    match p.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uring-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
