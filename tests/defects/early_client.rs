//! A client that connects before the first worker is ready waits in the listener's backlog
//! and is served once one is, instead of being closed for want of a backend.

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
