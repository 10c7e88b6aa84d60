//! Hand-off clients that their worker refused go back through the proxy's own entry point
//! (`Proxy::dispatch`), as if just accepted: `--idle-timeout` closes them, and a stop drains
//! them (they are on the connection tracker) and aborts them at the end of `--grace`.
//!
//! The setup mixes the two kinds of backend in one rotation, which only the Node cluster
//! primary allows today: slot 0 is a (python) cluster worker whose balanced server is served
//! by hand-off and that refuses every connection handed to it (`accepted: false`); slot 1
//! announces `ready{port}` with an echo server of its own, so a refused client that is
//! re-dispatched to it is proxied, byte for byte, by the master.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::helper::*;

/// Slot 0: a cluster worker refusing every `newconn`. Slot 1: an echo server that closes
/// when its client half-closes.
const MIXED_WORKERS: &str = r#"
import json, os, socket, threading
ch = socket.socket(fileno=int(os.environ["BALANCER_IPC_FD"]))
slot = int(os.environ["BALANCER_WORKER_ID"])
seq = 0
def send(obj):
    global seq
    if obj.get("cmd") == "NODE_CLUSTER":
        obj["seq"] = seq
        seq += 1
    ch.sendall((json.dumps(obj) + "\n").encode())
def messages():
    buf = b""
    while True:
        data, fds, _, _ = socket.recv_fds(ch, 65536, 4)
        for fd in fds:
            os.close(fd)
        if not data:
            os._exit(0)
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg == {"type": "shutdown"} or msg.get("act") == "disconnect":
                os._exit(0)
            yield msg
if slot == 0:
    server = {"address": None, "port": 9, "addressType": 4, "index": 0}
    send({"cmd": "NODE_CLUSTER", "act": "online"})
    send(dict(cmd="NODE_CLUSTER", act="queryServer", **server))
    for msg in messages():
        if msg.get("cmd") == "NODE_CLUSTER" and msg.get("ack") == 1:
            send(dict(cmd="NODE_CLUSTER", act="listening", **server))
        inner = msg.get("msg") if msg.get("cmd") == "NODE_HANDLE" else None
        if isinstance(inner, dict) and inner.get("act") == "newconn":
            ch.sendall(b'{"cmd":"NODE_HANDLE_ACK"}\n')
            send({"cmd": "NODE_CLUSTER", "ack": inner["seq"], "accepted": False})
else:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    def echo(c):
        while True:
            data = c.recv(4096)
            if not data:
                break
            c.sendall(data)
        c.close()
    def serve():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    send({"type": "ready", "port": srv.getsockname()[1]})
    for _ in messages():
        pass
"#;

/// How long a log line the master has already written may take to reach the test.
const LOG_LAG: Duration = Duration::from_secs(5);

fn start(extra: &[&str]) -> Balancer {
    let python = python3().to_str().expect("UTF-8 python path");
    let mut args = vec!["-v", "--cpus", "2", "--node-cluster", "on"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", python, "-c", MIXED_WORKERS]);
    let b = Balancer::start(&args);
    wait_all_ready(&b, 2);
    b
}

/// Connects clients until one is refused by slot 0 and re-dispatched to slot 1 (each
/// proven live by an echo); the clients that went straight to slot 1 are closed. Returns
/// the re-dispatched client and the addresses of the direct ones.
fn redispatched_client(b: &Balancer) -> (TcpStream, Vec<String>) {
    let addr = b.addr();
    let mut direct = Vec::new();
    for _ in 0..8 {
        let mut client = TcpStream::connect(addr).expect("connect to the master");
        client
            .set_read_timeout(Some(HTTP_TIMEOUT))
            .expect("read timeout");
        client.write_all(b"hello\n").expect("write to the master");
        let mut echo = [0u8; 6];
        client
            .read_exact(&mut echo)
            .unwrap_or_else(|e| panic!("no echo through the master: {e}\n{}", b.dump()));
        assert_eq!(&echo, b"hello\n");
        let peer = client.local_addr().expect("local address").to_string();
        // Handed off (to slot 0, which refuses everything) and yet echoed: re-dispatched to
        // slot 1. The hand-off line was written before the echo could come back.
        if b.wait_for_line(LOG_LAG, |l| {
            is_event(l, "connection handed off") && field(l, "peer") == Some(&peer)
        })
        .is_some()
        {
            return (client, direct);
        }
        direct.push(peer);
    }
    panic!("no client was re-dispatched in 8 tries\n{}", b.dump());
}

/// Reads until the master closes the connection; returns when it did.
fn wait_closed(client: &mut TcpStream, b: &Balancer) -> Instant {
    let mut buf = [0u8; 64];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return Instant::now(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Instant::now(),
            Err(e) => panic!("connection not closed: {e}\n{}", b.dump()),
        }
    }
}

fn peer_of(client: &TcpStream) -> SocketAddr {
    client.local_addr().expect("local address")
}

#[test]
fn redispatched_connection_is_closed_by_idle_timeout() {
    let b = start(&["--idle-timeout", "1s"]);
    let (mut client, _) = redispatched_client(&b);
    let peer = peer_of(&client).to_string();
    let idle_since = Instant::now();
    let closed = wait_closed(&mut client, &b);
    assert!(
        closed.duration_since(idle_since) < Duration::from_secs(10),
        "closed {:?} after going idle",
        closed.duration_since(idle_since)
    );
    b.expect_line(
        0,
        "the idle close of the re-dispatched client",
        LOG_LAG,
        |l| {
            is_event(l, "connection closed")
                && field(l, "peer") == Some(&peer)
                && l.contains("idle for 1s")
        },
    );
}

#[test]
fn redispatched_connection_is_drained_and_aborted_at_stop() {
    let mut b = start(&["--idle-timeout", "60s", "--grace", "2s"]);
    let (mut client, direct) = redispatched_client(&b);
    // The clients that went straight to slot 1 were closed, and slot 1 closes them too: once
    // the master has seen each of them done, the only open connection is the re-dispatched
    // one.
    for peer in &direct {
        b.expect_line(0, "a direct client done", READY_TIMEOUT, |l| {
            is_event(l, "connection done") && field(l, "peer") == Some(peer)
        });
    }
    b.signal(libc::SIGTERM);
    let (_, draining) = b.expect_line(0, "`stopping: draining connections`", EXIT, |l| {
        is_event(l, "stopping: draining connections")
    });
    assert_eq!(
        field(&draining, "open_connections"),
        Some("1"),
        "the re-dispatched client is on the tracker: {draining}\n{}",
        b.dump()
    );
    // It stays open through the grace period (a bare task would not be waited for), and is
    // aborted at its end.
    wait_closed(&mut client, &b);
    b.expect_line(0, "`grace period over`", LOG_LAG, |l| {
        is_event(l, "grace period over; closing open connections")
    });
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}

/// How long a graceful stop may take here: `--grace` (2 s), then the workers' stop.
const EXIT: Duration = Duration::from_secs(20);
