//! A client that connects before the first worker is ready waits in the listener's backlog
//! and is served once one is, instead of being closed for want of a backend; a remote
//! `--upstream` in rotation serves as well, and with no backend at all the wait ends after
//! one `--ready-timeout` (the no-backend answer).

use std::time::{Duration, Instant};

use crate::helper::*;

/// How long the worker waits before it listens (and so before it can be admitted).
const SLOW_START: &str = r#"
import os, time, http.server
time.sleep(1.5)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"late\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Generous on a busy machine: the worker takes 1.5 s, then a probe admits it.
const SERVED: Duration = Duration::from_secs(30);

#[test]
fn a_client_before_the_first_ready_worker_is_held_and_served() {
    let python = python3().to_str().expect("UTF-8 python path");
    let mut b = Balancer::start(&[
        "--cpus", "1", "--ready", "port", "--", python, "-c", SLOW_START,
    ]);
    // `addr()` returns on the master's listening line: the worker is still asleep.
    let addr = b.addr();
    let started = Instant::now();
    let answer = get_with_timeout(addr, "/", SERVED);
    assert!(
        matches!(&answer, Ok((200, body)) if body == "late\n"),
        "the early client got {answer:?} after {:?}\n{}",
        started.elapsed(),
        b.dump()
    );
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(Duration::from_secs(15));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert_no_panic(&b);
}

#[test]
fn with_only_upstreams_the_master_accepts_at_once() {
    // An upstream nothing listens on: never in rotation, so an accepted client is closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let upstream = dead.local_addr().expect("port").to_string();
    drop(dead);
    let mut b = Balancer::start(&["--cpus", "0", "--upstream", &upstream]);
    let addr = b.addr();
    // Held in a backlog, the read would time out; accepted, the master closes it (before or
    // after the request is written).
    let answer = get_with_timeout(addr, "/", Duration::from_secs(5));
    let closed = matches!(&answer, Err(e) if matches!(e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe));
    assert!(
        closed,
        "with --cpus 0 the client got {answer:?}\n{}",
        b.dump()
    );
    b.signal(libc::SIGTERM);
    b.expect_exit(Duration::from_secs(15));
    assert_no_panic(&b);
}

/// A worker that never says it is ready (nor listens).
const NEVER_READY: &str = "import time; time.sleep(600)";

#[test]
fn a_worker_that_never_becomes_ready_holds_clients_only_until_the_ready_timeout() {
    let python = python3().to_str().expect("UTF-8 python path");
    for protocol in ["http", "tcp"] {
        let mut b = Balancer::start(&[
            "--cpus",
            "1",
            "--ready-timeout",
            "1s",
            "--protocol",
            protocol,
            "--",
            python,
            "-c",
            NEVER_READY,
        ]);
        let addr = b.addr();
        let started = Instant::now();
        let answer = get_with_timeout(addr, "/", SERVED);
        let took = started.elapsed();
        // Held in the backlog until the timeout, then the no-backend answer.
        match protocol {
            "http" => assert!(
                matches!(&answer, Ok((503, _))),
                "http: {answer:?} after {took:?}\n{}",
                b.dump()
            ),
            _ => assert!(
                matches!(&answer, Err(e) if matches!(e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe)),
                "tcp: {answer:?} after {took:?}\n{}",
                b.dump()
            ),
        }
        let warned = |l: &str| {
            is_event(
                l,
                "no backend in rotation within --ready-timeout: accepting anyway",
            )
        };
        b.expect_line(0, "the accepting-anyway warning", SERVED, warned);
        assert!(
            took >= Duration::from_millis(900),
            "{protocol}: answered after {took:?}, before --ready-timeout"
        );
        // One line, however many clients come after.
        let _ = get_with_timeout(addr, "/", SERVED);
        let lines = b.lines();
        assert_eq!(
            lines.iter().filter(|l| warned(l)).count(),
            1,
            "{}",
            b.dump()
        );
        b.signal(libc::SIGTERM);
        b.expect_exit(Duration::from_secs(15));
        assert_no_panic(&b);
    }
}

#[test]
fn with_workers_and_an_upstream_the_first_backend_in_rotation_opens_the_doors() {
    // A remote backend answering HTTP, on a thread of the test.
    let remote = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a remote");
    let remote_addr = remote.local_addr().expect("its address").to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in remote.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nremote\n",
            );
        }
    });
    let python = python3().to_str().expect("UTF-8 python path");
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready-timeout",
        "60s",
        "--protocol",
        "http",
        "--upstream",
        &remote_addr,
        "--",
        python,
        "-c",
        NEVER_READY,
    ]);
    let addr = b.addr();
    // Served by the upstream long before the local worker's --ready-timeout.
    let answer = get_with_timeout(addr, "/", SERVED);
    assert!(
        matches!(&answer, Ok((200, body)) if body == "remote\n"),
        "{answer:?}\n{}",
        b.dump()
    );
    b.expect_line(0, "`an upstream is in rotation: accepting`", SERVED, |l| {
        is_event(l, "an upstream is in rotation: accepting")
    });
    b.signal(libc::SIGTERM);
    b.expect_exit(Duration::from_secs(15));
    assert_no_panic(&b);
}
