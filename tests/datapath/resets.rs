//! Issue 9 item 4: an abort (RST) on one side reaches the other side as an abort.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::*;

/// Answers `HTTP/1.0 200` with a close-delimited body, then aborts with `SO_LINGER` 0: the
/// end of the body is a reset, not a FIN, so a client must not take it for complete.
const ABORTING: &str = r#"
while True:
    c, _ = srv.accept()
    if request(c) is None:
        c.close()
        continue
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npartial body")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"#;

/// Reads one request, then waits for the client's next move and says what it was: `reset`
/// (ECONNRESET) or `eof` (a clean close).
const WATCHING: &str = r#"
while True:
    c, _ = srv.accept()
    if request(c) is None:
        c.close()
        continue
    say("backend got a request")
    c.settimeout(20)
    try:
        got = c.recv(4096)
        say("backend saw: " + ("eof" if got == b"" else "data"))
    except ConnectionResetError:
        say("backend saw: reset")
    except OSError as e:
        say("backend saw: error %s" % e)
    c.close()
"#;

/// Sends a request to `addr` and reads to the end: the bytes that came, and how it ended.
fn fetch(addr: SocketAddr) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e.kind())),
        }
    }
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset() {
    let (b, backend) = start_python(&[], ABORTING);
    // Direct, the client sees the reset: the test's backend really aborts.
    let (_, direct) = fetch(backend);
    assert_eq!(
        direct,
        Err(ErrorKind::ConnectionReset),
        "direct to {backend}"
    );
    for i in 0..5 {
        let (got, end) = fetch(b.addr());
        assert_eq!(
            end,
            Err(ErrorKind::ConnectionReset),
            "round {i}: through balancer, got {:?} then a clean end; log:\n{}",
            String::from_utf8_lossy(&got),
            b.dump()
        );
    }
}

#[test]
fn client_reset_reaches_the_backend_as_a_reset() {
    let (b, _) = start_python(&[], WATCHING);
    let s = TcpStream::connect(b.addr()).expect("connect");
    (&s).write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    b.expect_line(0, "`backend got a request`", Duration::from_secs(15), |l| {
        l.contains("backend got a request")
    });
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let (_, line) = b.expect_line(0, "`backend saw`", Duration::from_secs(15), |l| {
        l.contains("backend saw:")
    });
    assert!(
        line.contains("backend saw: reset"),
        "the backend saw {line:?}, not a reset; log:\n{}",
        b.dump()
    );
}
