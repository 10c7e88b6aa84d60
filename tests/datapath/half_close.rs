//! Issue 15: a worker's EOF ends the connection once its bytes are delivered (one close on
//! each side, as nginx's `proxy_half_close off`), unless `--half-close` asks for it to be
//! passed on, for protocols whose server shuts its write side first and goes on reading.
//! (A client's half-close is always passed on: `defects::half_close`.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::*;

/// Reads one request head, answers, shuts its write side (not a close) and then reports
/// what the client sent after that.
const SERVER_FIRST_EOF: &str = r#"
while True:
    c, _ = srv.accept()
    if request(c) is None:
        c.close()
        continue
    c.sendall(b"answer")
    c.shutdown(socket.SHUT_WR)
    c.settimeout(20)
    rest = b""
    try:
        while True:
            got = c.recv(4096)
            if not got:
                break
            rest += got
    except OSError:
        pass
    say("backend read after its EOF: [%s]" % rest.decode())
    c.close()
"#;

/// Sends a request, reads to EOF (the worker's answer), then sends `after` and shuts its
/// own side; returns what it read.
fn talk(b: &Balancer, after: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(b.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to the worker's EOF");
    // Without --half-close the proxy has closed: this write may fail, which is the point.
    let _ = s.write_all(after);
    let _ = s.shutdown(std::net::Shutdown::Write);
    got
}

/// The worker's report of what it read after its EOF.
fn report(b: &Balancer) -> String {
    let (_, line) = b.expect_line(0, "`backend read after its EOF`", READY, |l| {
        l.contains("backend read after its EOF:")
    });
    line
}

#[test]
fn a_worker_eof_ends_the_connection_by_default() {
    let (b, _) = start_python(&[], SERVER_FIRST_EOF);
    assert_eq!(talk(&b, b"late"), b"answer");
    let line = report(&b);
    assert!(
        line.contains("after its EOF: []"),
        "the worker still got client bytes after its EOF: {line:?}; log:\n{}",
        b.dump()
    );
}

#[test]
fn half_close_flag_passes_a_worker_eof_on_and_keeps_the_client_direction() {
    let (b, _) = start_python(&["--half-close"], SERVER_FIRST_EOF);
    assert_eq!(talk(&b, b"late"), b"answer");
    let line = report(&b);
    assert!(
        line.contains("after its EOF: [late]"),
        "the client's bytes after the worker's EOF were lost: {line:?}; log:\n{}",
        b.dump()
    );
}

#[test]
fn a_worker_eof_ends_the_connection_by_default_epoll() {
    let (b, _) = start_python(&["--engine", "epoll"], SERVER_FIRST_EOF);
    assert_eq!(talk(&b, b"late"), b"answer");
    let line = report(&b);
    assert!(
        line.contains("after its EOF: []"),
        "the worker still got client bytes after its EOF: {line:?}; log:\n{}",
        b.dump()
    );
}

#[test]
fn half_close_flag_passes_a_worker_eof_on_and_keeps_the_client_direction_epoll() {
    let (b, _) = start_python(&["--engine", "epoll", "--half-close"], SERVER_FIRST_EOF);
    assert_eq!(talk(&b, b"late"), b"answer");
    let line = report(&b);
    assert!(
        line.contains("after its EOF: [late]"),
        "the client's bytes after the worker's EOF were lost: {line:?}; log:\n{}",
        b.dump()
    );
}
