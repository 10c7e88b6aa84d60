//! sockmap-proxy: a measurement spike for issue #15's "socket splicing with a sockmap /
//! `sk_skb` stream-verdict program" lead, not a product. One thread accepts a client,
//! connects to the next backend round-robin and puts both sockets into a `SOCKHASH`, each
//! under the key of its own 4-tuple (as its `__sk_buff` shows it) with its peer as the
//! value. From then on the kernel moves the bytes: the verdict program builds that key from
//! the skb's `remote_ip4`, `local_ip4`, `remote_port` and `local_port` and calls
//! `bpf_sk_redirect_hash(skb, map, key, 0)`, which queues the skb for the egress of the peer
//! socket. User space only forwards what the client sent before its socket was in the map
//! (the request that arrived with the handshake), then waits for EOF or an error on either
//! side, waits until the other side has sent all the bytes the first received (`TCP_INFO`:
//! the redirect goes through a workqueue, so EOF can overtake the data) and closes both, as
//! balancer's default tcp path does.
//!
//! The eBPF is hand-assembled (21 instructions) and loaded with the raw `bpf(2)` syscall
//! because this machine has no clang or bpf-linker, and aya/libbpf-rs would need one of them
//! to build the program; the program is small enough to read as instructions. If the
//! verifier refuses it, its log is printed: that is a result too. It is a standalone package
//! (an empty `[workspace]` table) so CI never builds it. IPv4 only.
//!
//!     sockmap-proxy LISTEN BACKEND [BACKEND...]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

// Constants of <linux/bpf.h> (checked against the uapi header of this machine).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_FUNC_SK_REDIRECT_HASH: i32 = 72;
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// Offsets in `struct __sk_buff` of the fields an sk_skb program may read.
const SKB_REMOTE_IP4: i16 = 92;
const SKB_LOCAL_IP4: i16 = 96;
const SKB_REMOTE_PORT: i16 = 132;
const SKB_LOCAL_PORT: i16 = 136;
/// `union bpf_attr` is 144 bytes on this kernel's uapi.
const ATTR_LEN: usize = 144;
/// Key: remote_ip4, local_ip4, remote port (network order, in the low 16 bits), local port.
const KEY_LEN: usize = 16;
/// Map entries: two per proxied pair.
const MAX_ENTRIES: u32 = 65536;
/// How long a pair may wait for the kernel to flush the redirected bytes after an EOF.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Accepts per wake-up before the loop looks at EOFs again.
const ACCEPT_BATCH: usize = 64;
/// epoll data of the listener; pairs use `id << 1 | side`.
const LISTENER: u64 = u64::MAX;

/// One eBPF instruction, as `struct bpf_insn` lays it out.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The verdict program: `key = {remote_ip4, local_ip4, port16(remote_port), local_port}` on
/// the stack, `return bpf_sk_redirect_hash(skb, map, &key, 0)` (SK_PASS once queued to the
/// peer's egress, SK_DROP when the key is not in the map). `remote_port` is folded
/// (`hi | lo` 16 bits) so the key does not depend on which half the kernel puts it in.
fn verdict_program(map_fd: RawFd) -> Vec<Insn> {
    const LDXW: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const STXW: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const MOV64X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const RSH32K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
    const AND32K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const OR32X: u8 = 0x4c; // BPF_ALU | BPF_OR | BPF_X
    const LDDW: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    vec![
        insn(MOV64X, 6, 1, 0, 0), // r6 = skb
        insn(LDXW, 2, 6, SKB_REMOTE_IP4, 0),
        insn(STXW, 10, 2, -16, 0),
        insn(LDXW, 2, 6, SKB_LOCAL_IP4, 0),
        insn(STXW, 10, 2, -12, 0),
        insn(LDXW, 2, 6, SKB_REMOTE_PORT, 0),
        insn(MOV64X, 3, 2, 0, 0),
        insn(RSH32K, 3, 0, 0, 16),
        insn(AND32K, 2, 0, 0, 0xffff),
        insn(OR32X, 2, 3, 0, 0),
        insn(STXW, 10, 2, -8, 0),
        insn(LDXW, 2, 6, SKB_LOCAL_PORT, 0),
        insn(STXW, 10, 2, -4, 0),
        insn(MOV64X, 1, 6, 0, 0),                    // r1 = skb
        insn(LDDW, 2, BPF_PSEUDO_MAP_FD, 0, map_fd), // r2 = &map
        insn(0, 0, 0, 0, 0),
        insn(MOV64X, 3, 10, 0, 0),
        insn(ADD64K, 3, 0, 0, -16), // r3 = &key
        insn(MOV64K, 4, 0, 0, 0),   // r4 = flags 0: the peer's egress
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_REDIRECT_HASH),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// A zeroed `union bpf_attr` that fields are written into at their uapi offsets.
struct Attr([u8; ATTR_LEN]);

impl Attr {
    fn new() -> Self {
        Attr([0; ATTR_LEN])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    /// `bpf(cmd, &attr, sizeof attr)`: the return value, or the errno.
    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<libc::c_long> {
        // SAFETY: the attr buffer is ATTR_LEN bytes, the size passed; every pointer written
        // into it (insns, license, log, key, value) outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), ATTR_LEN) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

/// The map and the attached program; both fds stay open for the process's life.
fn load() -> Result<RawFd, String> {
    let map = Attr::new()
        .u32(0, BPF_MAP_TYPE_SOCKHASH)
        .u32(4, KEY_LEN as u32)
        .u32(8, 4)
        .u32(12, MAX_ENTRIES)
        .call(BPF_MAP_CREATE)
        .map_err(|e| format!("BPF_MAP_CREATE(SOCKHASH): {e}"))? as RawFd;
    let prog = verdict_program(map);
    let license = b"GPL\0";
    let mut log = vec![0u8; 1 << 16];
    let loaded = Attr::new()
        .u32(0, BPF_PROG_TYPE_SK_SKB)
        .u32(4, prog.len() as u32)
        .u64(8, prog.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .call(BPF_PROG_LOAD);
    let prog_fd = match loaded {
        Ok(fd) => fd as u32,
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            return Err(format!(
                "BPF_PROG_LOAD(SK_SKB): {e}; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            ));
        }
    };
    Attr::new()
        .u32(0, map as u32)
        .u32(4, prog_fd)
        .u32(8, BPF_SK_SKB_STREAM_VERDICT)
        .call(BPF_PROG_ATTACH)
        .map_err(|e| format!("BPF_PROG_ATTACH(SK_SKB_STREAM_VERDICT): {e}"))?;
    Ok(map)
}

/// The key the program builds for skbs arriving on a socket with these addresses.
fn key(local: SocketAddrV4, remote: SocketAddrV4) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0..4].copy_from_slice(&remote.ip().octets());
    k[4..8].copy_from_slice(&local.ip().octets());
    // The skb's remote port is in network byte order; read as a native u16 it is to_be().
    k[8..12].copy_from_slice(&(remote.port().to_be() as u32).to_ne_bytes());
    k[12..16].copy_from_slice(&(local.port() as u32).to_ne_bytes());
    k
}

fn insert(map: RawFd, key: &[u8; KEY_LEN], sock: RawFd) -> std::io::Result<()> {
    let value = sock as u32;
    Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, &value as *const u32 as u64)
        .call(BPF_MAP_UPDATE_ELEM)
        .map(|_| ())
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// `TCP_INFO`'s (bytes received, bytes sent) of a socket.
fn tcp_bytes(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some((info.tcpi_bytes_received, info.tcpi_bytes_sent))
}

/// Data bytes a socket that has seen the peer's FIN received: `tcpi_bytes_received`
/// counts the FIN's sequence number too.
fn received_data(fd: RawFd) -> u64 {
    tcp_bytes(fd).map_or(0, |b| b.0.saturating_sub(1))
}

struct Pair {
    client: TcpStream,
    backend: TcpStream,
    /// After an EOF on one side: (its fd, bytes it received, the other side's fd, since).
    drain: Option<(RawFd, u64, RawFd, Instant)>,
}

fn epoll_add(ep: RawFd, fd: RawFd, events: u32, data: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts one client, pairs it with a backend socket in the map. Errors drop both.
fn open_pair(
    map: RawFd,
    client: TcpStream,
    peer: SocketAddrV4,
    backend: SocketAddr,
) -> std::io::Result<Pair> {
    let local = v4(client.local_addr()?).ok_or(ErrorKind::Unsupported)?;
    let b = TcpStream::connect(backend)?;
    let b_local = v4(b.local_addr()?).ok_or(ErrorKind::Unsupported)?;
    let b_remote = v4(backend).ok_or(ErrorKind::Unsupported)?;
    client.set_nodelay(true)?;
    b.set_nodelay(true)?;
    // The backend first: it has no bytes yet, so all it receives goes through the program.
    insert(map, &key(b_local, b_remote), client.as_raw_fd())?;
    insert(map, &key(local, peer), b.as_raw_fd())?;
    // What the client sent before its socket was in the map (its first request, which came
    // with the handshake) sits in its receive queue: the program only sees later skbs.
    let mut pair = Pair {
        client,
        backend: b,
        drain: None,
    };
    let mut buf = [0u8; 16 * 1024];
    pair.client.set_nonblocking(true)?;
    loop {
        match pair.client.read(&mut buf) {
            Ok(0) => {
                let got = received_data(pair.client.as_raw_fd());
                let (c, bk) = (pair.client.as_raw_fd(), pair.backend.as_raw_fd());
                pair.drain = Some((c, got, bk, Instant::now()));
                break;
            }
            Ok(n) => pair.backend.write_all(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(pair)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: sockmap-proxy LISTEN BACKEND [BACKEND...]");
        return ExitCode::from(2);
    }
    let mut backends = Vec::new();
    for b in &args[1..] {
        match b.parse::<SocketAddr>() {
            Ok(a) if a.is_ipv4() => backends.push(a),
            Ok(_) => {
                eprintln!("sockmap-proxy: backend {b}: IPv4 only (the program reads remote_ip4)");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("sockmap-proxy: backend {b:?}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let map = match load() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sockmap-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(&args[0]) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sockmap-proxy: listen {}: {e}", args[0]);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("sockmap-proxy: listener: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: plain syscall; the fd is checked below and lives as long as the process.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        eprintln!(
            "sockmap-proxy: epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) = epoll_add(ep, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER) {
        eprintln!("sockmap-proxy: epoll_ctl(listener): {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "sockmap-proxy: sockhash verdict program attached; listening on {}",
        args[0]
    );
    // Pairs only wait for the end: one-shot, so an EOF is reported once per socket.
    let watch = (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
    let mut pairs: HashMap<u64, Pair> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut rr = 0usize;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut lost_drains = 0u64;
    loop {
        let draining = pairs.values().any(|p| p.drain.is_some());
        let timeout = if draining { 1 } else { -1 };
        // SAFETY: `events` holds `events.len()` epoll_event slots for the kernel to fill.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            eprintln!("sockmap-proxy: epoll_wait: {e}");
            return ExitCode::FAILURE;
        }
        for ev in &events[..n as usize] {
            let (data, flags) = (ev.u64, ev.events);
            if data == LISTENER {
                // At most ACCEPT_BATCH per wake-up (the listener is level-triggered): a
                // backlog that never empties must not starve the closes below.
                for _ in 0..ACCEPT_BATCH {
                    match listener.accept() {
                        Ok((c, SocketAddr::V4(peer))) => {
                            let backend = backends[rr % backends.len()];
                            rr += 1;
                            match open_pair(map, c, peer, backend) {
                                Ok(p) => {
                                    let id = next_id;
                                    next_id += 1;
                                    let ok = epoll_add(ep, p.client.as_raw_fd(), watch, id << 1)
                                        .and_then(|_| {
                                            epoll_add(ep, p.backend.as_raw_fd(), watch, id << 1 | 1)
                                        });
                                    match ok {
                                        Ok(()) => {
                                            pairs.insert(id, p);
                                        }
                                        Err(e) => eprintln!("sockmap-proxy: epoll_ctl: {e}"),
                                    }
                                }
                                Err(e) => eprintln!("sockmap-proxy: pair to {backend}: {e}"),
                            }
                        }
                        Ok((_, peer)) => eprintln!("sockmap-proxy: {peer}: IPv4 only"),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("sockmap-proxy: accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let id = data >> 1;
            let Some(p) = pairs.get_mut(&id) else {
                continue;
            };
            if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                pairs.remove(&id); // a reset: nothing left to flush, drop both
                continue;
            }
            if p.drain.is_none() {
                let (from, to) = if data & 1 == 0 {
                    (p.client.as_raw_fd(), p.backend.as_raw_fd())
                } else {
                    (p.backend.as_raw_fd(), p.client.as_raw_fd())
                };
                let got = received_data(from);
                p.drain = Some((from, got, to, Instant::now()));
            }
        }
        // Close the pairs whose other side has sent every byte the EOF side received.
        pairs.retain(|_, p| match p.drain {
            None => true,
            Some((_, got, to, since)) => {
                let sent = tcp_bytes(to).map_or(u64::MAX, |b| b.1);
                if sent >= got {
                    false
                } else if since.elapsed() > DRAIN_LIMIT {
                    lost_drains += 1;
                    eprintln!("sockmap-proxy: gave up flushing ({sent} of {got} bytes), {lost_drains} so far");
                    false
                } else {
                    true
                }
            }
        });
    }
}
