//! The tcp data path seen from outside (issue 9 items 2, 4, 9, 10; issue 11's PROXY
//! protocol): real backends written for each case (python workers speaking the IPC protocol
//! by hand, or plain listeners the test owns), the real binary in front, and real clients.

mod epoll;
mod half_close;
mod listen;
mod overload;
mod proxy_protocol;
mod resets;
mod timeouts;

use std::net::SocketAddr;

use crate::helper::*;

/// How long workers may take from spawn to rotation on a busy 2-core machine.
const READY: std::time::Duration = std::time::Duration::from_secs(30);

/// The head of a python worker: a listener on its own loopback port, announced over the IPC
/// channel, and `request(c)`, which reads one HTTP request head (`None` for connections that
/// send none, such as the master's admission probe and TCP health checks). Each case
/// appends its own accept loop.
const WORKER_HEAD: &str = r#"
import os, socket, struct, sys
ipc = int(os.environ["BALANCER_IPC_FD"])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
os.write(ipc, b'{"type":"ready","port":%d}\n' % srv.getsockname()[1])
def request(c):
    c.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    return data
def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
"#;

/// Starts `balancer ARGS -- python3 -c WORKER_HEAD+body`, and waits until its one worker is in
/// rotation. Returns the master and the worker's own address (from `worker ready`).
fn start_python(args: &[&str], body: &str) -> (Balancer, SocketAddr) {
    start_python_n(1, args, body)
}

/// Like [`start_python`] with `n` workers; waits until all are in rotation, and returns the
/// first one's address.
fn start_python_n(n: usize, args: &[&str], body: &str) -> (Balancer, SocketAddr) {
    let script = format!("{WORKER_HEAD}{body}");
    let python = python3().to_str().expect("UTF-8 python path").to_owned();
    let cpus = n.to_string();
    let mut all: Vec<&str> = vec!["--listen", "127.0.0.1:0", "--cpus", &cpus];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", &python, "-S", "-c", &script]);
    let b = Balancer::start_exact(&all);
    let (_, line) = b.expect_line(0, "`worker ready`", READY, |l| is_event(l, "worker ready"));
    let addr = field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"));
    wait_all_ready(&b, n);
    (b, addr)
}
