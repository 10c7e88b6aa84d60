//! Item 8: a client that sends its request and then shuts its write side (`shutdown(SHUT_WR)`,
//! what `nc -N` and many scripts do) must still get the answer from the built-in worker, in
//! every mode.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::helper::*;

/// Requests per mode. On the old code, hand-off failed every time, shared and proxy modes
/// about one in three to five, reuseport about one in twelve.
const ROUNDS: usize = 100;

/// Sends `GET /` then half-closes; returns what came back before the worker closed.
fn half_closed_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    stream.shutdown(Shutdown::Write)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn answers_half_closed_requests(mode: &str) {
    let b = Balancer::start(&["--cpus", "2", "--mode", mode]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let mut failures = Vec::new();
    for i in 0..ROUNDS {
        match half_closed_get(addr) {
            Ok(text) if text.starts_with("HTTP/1.1 200") && text.contains("child worker run") => {}
            other => failures.push((i, other.map_err(|e| e.to_string()))),
        }
    }
    assert!(
        failures.is_empty(),
        "--mode {mode}: {} of {ROUNDS} half-closed requests unanswered: {failures:?}\nlog:\n{}",
        failures.len(),
        b.dump()
    );
}

#[test]
fn half_closed_request_is_answered_in_proxy_mode() {
    answers_half_closed_requests("proxy");
}

#[test]
fn half_closed_request_is_answered_in_handoff_mode() {
    answers_half_closed_requests("handoff");
}

#[test]
fn half_closed_request_is_answered_in_shared_mode() {
    answers_half_closed_requests("shared");
}

#[test]
fn half_closed_request_is_answered_in_reuseport_mode() {
    answers_half_closed_requests("reuseport");
}
