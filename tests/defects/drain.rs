//! Item 5: idle keep-alive clients do not hold a stop or a reload for the whole `--grace`.
//! Workers are told to drain (`shutdown`) when the drain starts, so the built-in worker
//! closes its idle keep-alive connections at once (a graceful hyper shutdown) and finishes
//! busy ones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::helper::*;

/// Idle keep-alive clients held open through the stop or reload.
const CLIENTS: usize = 50;
/// Far longer than the drain may take: the old code waited all of it.
const GRACE: &str = "10s";
/// How long the whole stop, or a reload of one slot, may take with only idle clients: well
/// under a second is the target; this bound leaves room for a loaded 2-core machine and
/// still fails against the old code's 10 s.
const PER_SLOT: Duration = Duration::from_secs(2);
/// How long workers may take from spawn to rotation on a busy machine.
const READY: Duration = Duration::from_secs(30);

/// One keep-alive request, answered; the connection is left open and idle.
fn idle_keep_alive_client(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).expect("read the answer");
        assert!(n > 0, "closed before answering: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .expect("content-length");
            if got.len() >= end + 4 + length {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                return s;
            }
        }
    }
}

/// Leaves `s` idle the way an HTTP client's keep-alive pool does: waiting, and closing its
/// end once the server closes the idle connection. The thread says whether that happened.
fn wait_like_a_client(mut s: TcpStream) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    })
}

#[test]
fn stop_with_idle_keep_alive_clients_does_not_wait_for_grace() {
    let mut b = Balancer::start(&["--cpus", "2", "--grace", GRACE]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| wait_like_a_client(idle_keep_alive_client(addr)))
        .collect();

    let started = Instant::now();
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(Duration::from_secs(30));
    let took = started.elapsed();
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert!(
        took < PER_SLOT,
        "the stop took {took:?} with only idle clients\n{}",
        b.dump()
    );
    for (i, c) in clients.into_iter().enumerate() {
        assert!(
            c.join().expect("client thread"),
            "client {i} was never closed"
        );
    }
}

#[test]
fn reload_with_idle_keep_alive_clients_does_not_wait_for_grace() {
    let mut b = Balancer::start(&["--cpus", "2", "--grace", GRACE]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let old = ready_pids(&b);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| wait_like_a_client(idle_keep_alive_client(addr)))
        .collect();

    let started = Instant::now();
    b.signal(libc::SIGHUP);
    let (_, done) = b.expect_line(0, "`rolling reload done`", READY, |l| {
        is_event(l, "rolling reload done")
    });
    let took = started.elapsed();
    assert!(
        took < PER_SLOT * 2,
        "the reload of 2 slots took {took:?} with only idle clients: {done}\n{}",
        b.dump()
    );
    for pid in old {
        assert!(!pid_alive(pid), "old worker {pid} still runs");
    }
    for (i, c) in clients.into_iter().enumerate() {
        assert!(
            c.join().expect("client thread"),
            "client {i} was never closed"
        );
    }
    // New clients are served by the new workers.
    let body = get_ok(addr, "/");
    assert!(body.starts_with("child worker run"), "{body:?}");
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}
