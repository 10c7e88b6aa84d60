//! Does a worker own the port it announced? Read from `/proc`: the listening socket's inode
//! in `/proc/net/tcp{,6}`, and the socket fds of the worker and its descendants.
//!
//! Without this check a worker could announce another program's port (or the master's own)
//! and the master would send clients there.

use std::collections::{HashMap, HashSet};
use std::fs;

/// TCP state number of `LISTEN` in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// Whether `pid` or one of its descendants holds a socket listening on TCP `port`.
pub fn owns_listening_port(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    family(pid)
        .into_iter()
        .any(|p| holds_any_socket(p, &inodes))
}

/// Inodes of sockets in state LISTEN on `port`, any local address, IPv4 or IPv6. Asks the
/// kernel over `NETLINK_SOCK_DIAG` for listening sockets only; falls back to reading
/// `/proc/net/tcp{,6}`, which lists every socket (tens of thousands after a load test leaves
/// TIME_WAIT entries, a quarter of a second to read).
fn listening_inodes(port: u16) -> HashSet<u64> {
    match diag::listening_inodes(port) {
        Ok(inodes) => inodes,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag failed; reading /proc/net/tcp");
            listening_inodes_from_proc(port)
        }
    }
}

fn listening_inodes_from_proc(port: u16) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if *state == TCP_LISTEN && local_port == Some(port) {
                if let Ok(inode) = inode.parse() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

/// Listening TCP sockets from the kernel's `sock_diag` netlink interface.
mod diag {
    use std::collections::HashSet;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    /// `struct nlmsghdr`.
    const NLMSG_HDR: usize = 16;
    /// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte id.
    const REQ_LEN: usize = 56;
    /// Offsets in `struct inet_diag_msg`: the id's source port, and the inode.
    const MSG_SPORT: usize = 4;
    const MSG_INODE: usize = 68;
    const MSG_LEN: usize = 72;

    pub fn listening_inodes(port: u16) -> io::Result<HashSet<u64>> {
        let mut inodes = HashSet::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            query(family as u8, port, &mut inodes)?;
        }
        Ok(inodes)
    }

    fn query(family: u8, port: u16, inodes: &mut HashSet<u64>) -> io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = [0u8; NLMSG_HDR + REQ_LEN];
        req[0..4].copy_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[16] = family;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        // SAFETY: `req` is a valid buffer of its length for the duration of the call.
        let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: `buf` is a valid writable buffer of its length for the call.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut data = &buf[..n as usize];
            if data.is_empty() {
                return Ok(());
            }
            while data.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                if len < NLMSG_HDR || len > data.len() {
                    return Err(io::Error::other("malformed netlink message"));
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the request")),
                    _ => {
                        let msg = &data[NLMSG_HDR..len];
                        if msg.len() >= MSG_LEN {
                            let sport = u16::from_be_bytes([msg[MSG_SPORT], msg[MSG_SPORT + 1]]);
                            let inode = u32::from_ne_bytes([
                                msg[MSG_INODE],
                                msg[MSG_INODE + 1],
                                msg[MSG_INODE + 2],
                                msg[MSG_INODE + 3],
                            ]);
                            if sport == port {
                                inodes.insert(u64::from(inode));
                            }
                        }
                    }
                }
                // Messages are 4-byte aligned.
                let next = (len + 3) & !3;
                data = &data[next.min(data.len())..];
            }
        }
    }
}

/// `pid` and all its descendants, from one scan of `/proc/*/stat`.
fn family(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent_of(p) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn holds_any_socket(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|fd| {
        fs::read_link(fd.path()).ok().is_some_and(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_owns_its_listener_and_not_others() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(owns_listening_port(std::process::id(), port));
        // An ancestor owns it through its descendants (this process)…
        assert!(owns_listening_port(1, port));
        // …a process that is not an ancestor does not: a child of ours, which did not
        // inherit the socket (std opens it close-on-exec).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let owned_by_child = owns_listening_port(child.id(), port);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !owned_by_child,
            "a child without the socket owns port {port}"
        );
        // Once closed, nobody does.
        drop(listener);
        assert!(!owns_listening_port(std::process::id(), port));
        assert!(!owns_listening_port(1, port));
    }

    #[test]
    fn sock_diag_agrees_with_proc() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let from_diag = diag::listening_inodes(port).unwrap();
        assert_eq!(from_diag.len(), 1);
        assert_eq!(from_diag, listening_inodes_from_proc(port));
    }
}
