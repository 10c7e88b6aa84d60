//! Issue 11: the PROXY protocol. `--send-proxy v1|v2` tells a backend (which parses the
//! header it receives) the real client address; `--accept-proxy` takes it from a trusted
//! load balancer in front (here: another balancer with `--send-proxy`), and closes and
//! counts connections from there whose header is missing, stalled, truncated, oversized or
//! invalid, without stalling anyone else. Clients bind 127.0.0.x source addresses so that
//! the address the backend reports can only have come from the header.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::*;

/// Reads the PROXY header (v1 or v2) a connection starts with, then the request, and
/// answers with what the header said: `v1 IP:PORT`, `v2 IP:PORT` or `none`. Connections
/// that close without a request (probes, checks) are skipped.
const PARSING: &str = r#"
V2 = b"\r\n\r\n\x00\r\nQUIT\n"
def recv_more(c, data):
    chunk = c.recv(4096)
    if not chunk:
        raise EOFError
    return data + chunk
def proxy_header(c, data):
    while len(data) < 16 and (V2.startswith(data) or b"PROXY ".startswith(data[:6])):
        data = recv_more(c, data)
    if data.startswith(V2):
        length = struct.unpack("!H", data[14:16])[0]
        while len(data) < 16 + length:
            data = recv_more(c, data)
        fam = data[13] >> 4
        if fam == 1:
            src, port = socket.inet_ntop(socket.AF_INET, data[16:20]), struct.unpack("!H", data[24:26])[0]
        else:
            src, port = socket.inet_ntop(socket.AF_INET6, data[16:32]), struct.unpack("!H", data[48:50])[0]
        return "v2 %s:%d" % (src, port), data[16 + length:]
    if data.startswith(b"PROXY "):
        while b"\r\n" not in data:
            data = recv_more(c, data)
        line, rest = data.split(b"\r\n", 1)
        parts = line.decode().split(" ")
        return "v1 %s:%s" % (parts[2], parts[4]), rest
    return "none", data
while True:
    c, _ = srv.accept()
    c.settimeout(5)
    try:
        seen, data = proxy_header(c, recv_more(c, b""))
        while b"\r\n\r\n" not in data:
            data = recv_more(c, data)
        body = (seen + "\n").encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except (EOFError, OSError):
        pass
    c.close()
"#;

/// A connection to `addr` from `source` (a 127.0.0.x address, any port).
fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Writes `first` (a header, or nothing) and a request; returns the response body, or
/// `None` if the connection was closed without a response.
fn exchange(mut s: TcpStream, first: &[u8]) -> Option<String> {
    let mut out = first.to_vec();
    out.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let _ = s.write_all(&out);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_owned())
}

#[test]
fn send_proxy_v1_and_v2_carry_the_client_address_to_the_backend() {
    for version in ["v1", "v2"] {
        let (b, _) = start_python(&["--send-proxy", version], PARSING);
        let s = connect_from("127.0.0.5", b.addr());
        let port = s.local_addr().unwrap().port();
        let seen = exchange(s, b"").unwrap_or_else(|| panic!("no answer; log:\n{}", b.dump()));
        assert_eq!(
            seen,
            format!("{version} 127.0.0.5:{port}"),
            "log:\n{}",
            b.dump()
        );
    }
}

#[test]
fn a_front_balancer_with_send_proxy_feeds_one_with_accept_proxy() {
    // front (--send-proxy v2) -> back (--accept-proxy 127.0.0.1, --send-proxy v1) -> python.
    // The back is the front's worker, on the port the front gives it.
    let python = python3().to_str().unwrap().to_owned();
    let script = format!("{WORKER_HEAD}{PARSING}");
    let front = Balancer::start_exact(&[
        "--listen",
        "127.0.0.1:0",
        "--cpus",
        "1",
        "--ready",
        "port",
        "--send-proxy",
        "v2",
        "--",
        BIN,
        "--listen",
        "127.0.0.1:{port}",
        "--cpus",
        "1",
        "--accept-proxy",
        "127.0.0.1/32",
        "--send-proxy",
        "v1",
        "--",
        &python,
        "-S",
        "-c",
        &script,
    ]);
    front.expect_line(0, "the back balancer's `worker ready`", READY, |l| {
        l.contains("worker ready") && l.contains("stderr]")
    });
    wait_all_ready(&front, 1);
    for _ in 0..3 {
        let s = connect_from("127.0.0.7", front.addr());
        let port = s.local_addr().unwrap().port();
        let seen = exchange(s, b"").unwrap_or_else(|| panic!("no answer; log:\n{}", front.dump()));
        assert_eq!(
            seen,
            format!("v1 127.0.0.7:{port}"),
            "log:\n{}",
            front.dump()
        );
    }
}

fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .expect("admin addr")
}

fn rejected(admin: SocketAddr) -> u64 {
    let (_, body) = get_with_timeout(admin, "/status", Duration::from_secs(5)).expect("/status");
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    v["connections"]["proxy_header_rejected"]
        .as_u64()
        .expect("proxy_header_rejected")
}

#[test]
fn bad_headers_from_a_trusted_source_are_closed_and_counted_without_stalling_others() {
    let (b, _) = start_python(
        &[
            "--accept-proxy",
            "127.0.0.1/32,10.0.0.0/8",
            "--send-proxy",
            "v2",
            "--admin",
            "127.0.0.1:0",
        ],
        PARSING,
    );
    let addr = b.addr();
    let admin = admin_addr(&b);
    // A valid header: its source is the client.
    let seen = exchange(
        connect_from("127.0.0.1", addr),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 80\r\n",
    );
    assert_eq!(
        seen.as_deref(),
        Some("v2 203.0.113.7:4242"),
        "log:\n{}",
        b.dump()
    );
    let mut v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 9, 192, 0, 2, 1, 0x1f, 0x90, 0, 80]);
    let seen = exchange(connect_from("127.0.0.1", addr), &v2);
    assert_eq!(seen.as_deref(), Some("v2 198.51.100.9:8080"));

    // Bad ones, each closed without reaching the backend.
    let truncated = b"PROXY TCP4 203.0.113.7 19".to_vec();
    let mut oversized = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xea\x60".to_vec();
    oversized.extend_from_slice(&[0; 64]);
    let mut lying = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04".to_vec();
    lying.extend_from_slice(&[1, 2, 3, 4]);
    let garbage = b"GET / HTTP/1.1\r\nHost: no-header\r\n\r\n".to_vec();
    let bad = [
        ("truncated", truncated),
        ("oversized", oversized),
        ("lying", lying),
        ("missing", garbage),
    ];
    for (what, bytes) in &bad {
        let mut s = connect_from("127.0.0.1", addr);
        s.write_all(bytes).unwrap();
        // Meanwhile a client from an untrusted source is served at once, header or not.
        let started = Instant::now();
        let direct = connect_from("127.0.0.6", addr);
        let port = direct.local_addr().unwrap().port();
        assert_eq!(
            exchange(direct, b"").as_deref(),
            Some(format!("v2 127.0.0.6:{port}").as_str())
        );
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{what}: a direct client waited {:?}",
            started.elapsed()
        );
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "{what}: got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || rejected(admin)
            == bad.len() as u64),
        "proxy_header_rejected is {}, not {}",
        rejected(admin),
        bad.len()
    );
    assert!(!b.lines().iter().any(|l| looks_like_panic(l)));
}

#[test]
fn bad_proxy_flags_get_one_error_line() {
    let cases: [&[&str]; 6] = [
        &["--send-proxy", "v3"],
        &["--send-proxy", "v2", "--protocol", "http"],
        &["--accept-proxy", "10.0.0.0/33"],
        &["--accept-proxy", "127.0.0.1/32,nonsense"],
        &["--send-proxy", "v1", "--mode", "shared"],
        &["--accept-proxy", "127.0.0.1", "--mode", "handoff"],
    ];
    for args in cases {
        let mut b = Balancer::start(args);
        let status = b.expect_exit(STARTUP);
        let lines = b.lines();
        assert!(!status.success(), "{args:?} started");
        assert!(
            lines.len() == 1 && lines[0].starts_with("balancer: error: "),
            "{args:?}: not one error line:\n{}",
            b.dump()
        );
    }
}
