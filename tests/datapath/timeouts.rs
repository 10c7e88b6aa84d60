//! Issue 9 item 9: `--idle-timeout` closes when it says, and `--response-timeout` closes a
//! connection whose backend reads and never answers, counting it against the backend.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;

/// Reads requests and never answers; connections stay open until the client leaves.
const SILENT: &str = r#"
import threading
held = []
while True:
    c, _ = srv.accept()
    held.append(c)
    def hold(c):
        if request(c) is not None:
            say("backend got a request")
    threading.Thread(target=hold, args=(c,), daemon=True).start()
"#;

/// Waits for the server to close `s`; returns how long that took from `since`.
fn closed_after(s: &mut TcpStream, since: Instant, limit: Duration) -> Duration {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) => panic!("no close within {limit:?}: {e}"),
        }
    }
}

/// Reads one whole `Content-Length` response from `s`.
fn read_response(s: &mut TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("response head");
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let len: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    while got.len() < head_end + len {
        let n = s.read(&mut buf).expect("response body");
        assert!(n > 0, "closed inside the body");
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn idle_timeout_closes_within_a_tenth_of_its_length() {
    let timeout = Duration::from_secs(4);
    let b = Balancer::start(&["--cpus", "1", "--idle-timeout", "4s"]);
    wait_all_ready(&b, 1);
    // A keep-alive exchange, then silence: the timeout counts from the last byte.
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    read_response(&mut s);
    let idle = closed_after(&mut s, Instant::now(), Duration::from_secs(20));
    let slack = (timeout / 10).max(Duration::from_millis(250));
    assert!(
        idle + Duration::from_millis(50) >= timeout && idle <= timeout + slack,
        "--idle-timeout 4s closed after {idle:?}"
    );
}

#[test]
fn response_timeout_closes_and_takes_a_silent_backend_out() {
    let (b, _) = start_python(
        &[
            "--response-timeout",
            "1s",
            "--health-check",
            "tcp",
            "--health-fall",
            "3",
        ],
        SILENT,
    );
    let timeout = Duration::from_secs(1);
    for i in 0..3 {
        let mut s = TcpStream::connect(b.addr()).unwrap();
        let sent = Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let waited = closed_after(&mut s, sent, Duration::from_secs(20));
        assert!(
            waited + Duration::from_millis(50) >= timeout
                && waited <= timeout + Duration::from_millis(250),
            "round {i}: --response-timeout 1s closed after {waited:?}"
        );
    }
    // Three unanswered connections in a row: a passive failure each, as many as --health-fall.
    b.expect_line(
        0,
        "`responses keep timing out`",
        Duration::from_secs(10),
        |l| is_event(l, "worker down: responses keep timing out"),
    );
}

#[test]
fn response_timeout_spares_a_backend_that_speaks_first() {
    // The built-in worker answers; a client that only listens (sends nothing) is not
    // waiting for a response, so only the idle timeout applies to it.
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--response-timeout",
        "500ms",
        "--idle-timeout",
        "2s",
    ]);
    wait_all_ready(&b, 1);
    let mut s = TcpStream::connect(b.addr()).unwrap();
    let idle = closed_after(&mut s, Instant::now(), Duration::from_secs(20));
    assert!(
        idle >= Duration::from_millis(1950),
        "closed after {idle:?}: the response timeout fired with nothing owed"
    );
}
