//! A retired backend's `--grace` in http mode: when an upstream address leaves DNS, what is
//! still in flight to it gets `--grace`, then the master lets go of it, request by request
//! (it knows where requests begin and end, where the tcp path only has connections). A
//! request still waiting for its answer is replayed on a backend in rotation when its
//! method allows (a GET), or answered 502 (a POST); a response still streaming is cut, the
//! client's connection closed so that it cannot take a short body for a whole one.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use crate::helper::*;

use super::servers::{Backend, Dns, Hold};
use super::{expect_up, ip, FOLLOW, UP};

/// A client's patience here: far beyond `--grace 2s` and the follow time, far short of
/// `--request-timeout` (60 s), which is what a held request waited for before.
const PATIENCE: Duration = Duration::from_secs(30);

/// balancer in http mode over `hold.test:port`, answered by `dns`.
fn start(dns: &Dns, port: u16) -> Balancer {
    Balancer::start(&[
        "--protocol",
        "http",
        "--cpus",
        "0",
        "--upstream",
        &format!("hold.test:{port}"),
        "--resolver",
        &dns.addr.to_string(),
        "--resolve-interval",
        "1s",
        "--health-check",
        "tcp",
        "--health-interval",
        "200ms",
        "--grace",
        "2s",
    ])
}

/// Moves `hold.test` from the held backend to `next` and waits for the retired line (with
/// `open` requests in flight), `next` up and the grace line; returns the grace line's index.
fn retire(bal: &Balancer, dns: &Dns, held: &Hold, next: &Backend, open: usize) -> usize {
    dns.set("hold.test", &[next.addr.ip()]);
    let want = held.addr.to_string();
    let (retired, line) = bal.expect_line(0, "`upstream backend retired`", FOLLOW, |l| {
        is_event(l, "upstream backend retired") && field(l, "addr") == Some(want.as_str())
    });
    let open = open.to_string();
    assert_eq!(
        field(&line, "open_connections"),
        Some(open.as_str()),
        "{line}"
    );
    expect_up(bal, 0, next.addr, FOLLOW);
    bal.expect_line(retired, "the grace line", FOLLOW, |l| {
        is_event(
            l,
            "grace period over; closing the retired backend's connections",
        )
    })
    .0
}

/// One raw request over a new connection (`Connection: close`); status and body.
fn send(addr: SocketAddr, head: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, text.clone()))?;
    Ok((status, body.to_owned()))
}

#[test]
fn http_mode_replays_a_get_held_by_a_retired_backend_and_fails_a_post_at_its_grace() {
    let dns = Dns::start();
    dns.set("hold.test", &[ip(11)]);
    let held = Hold::start(SocketAddr::new(ip(11), 0), false).expect("binding 127.0.0.11");
    let port = held.addr.port();
    let next = Backend::start(SocketAddr::new(ip(12), port), "127.0.0.12")
        .expect("the same port on 127.0.0.12");
    let bal = start(&dns, port);
    let addr = bal.addr();
    expect_up(&bal, 0, held.addr, UP);

    let get = thread::spawn(move || {
        send(
            addr,
            "GET / HTTP/1.1\r\nHost: hold.test\r\nConnection: close\r\n\r\n",
        )
    });
    let post = thread::spawn(move || {
        send(
            addr,
            "POST / HTTP/1.1\r\nHost: hold.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
    });
    assert!(
        wait_until(FOLLOW, || held.held() == 2),
        "the held backend got {} of the 2 requests\n{}",
        held.held(),
        bal.dump()
    );
    retire(&bal, &dns, &held, &next, 2);

    let got = get.join().expect("GET thread");
    assert_eq!(
        got.as_ref().ok(),
        Some(&(200, "127.0.0.12".to_owned())),
        "the GET is replayed on the backend in rotation: {got:?}\n{}",
        bal.dump()
    );
    let (status, body) = post
        .join()
        .expect("POST thread")
        .unwrap_or_else(|e| panic!("the POST gets an answer, not {e}\n{}", bal.dump()));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("retired"), "{body}");
    assert_eq!(held.held(), 2, "the POST is never sent again");
    assert_no_panic(&bal);
    drop((held, next));
}

#[test]
fn http_mode_cuts_a_retired_backends_streaming_response_at_its_grace() {
    let dns = Dns::start();
    dns.set("hold.test", &[ip(13)]);
    let held = Hold::start(SocketAddr::new(ip(13), 0), true).expect("binding 127.0.0.13");
    let port = held.addr.port();
    let next = Backend::start(SocketAddr::new(ip(14), port), "127.0.0.14")
        .expect("the same port on 127.0.0.14");
    let bal = start(&dns, port);
    let addr = bal.addr();
    expect_up(&bal, 0, held.addr, UP);

    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: hold.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"0123456789") {
        let n = client.read(&mut buf).expect("the head and the first bytes");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("content-length: 1000"), "{text}");

    retire(&bal, &dns, &held, &next, 1);
    // EOF or a reset within the client's patience, not its read timeout: balancer cut it.
    let mut rest = Vec::new();
    if let Err(e) = client.read_to_end(&mut rest) {
        assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the retired backend's response was not cut: {e}\n{}",
            bal.dump()
        );
    }
    assert!(rest.is_empty(), "{rest:?}");
    // The backend in rotation serves on.
    assert_eq!(get_ok(addr, "/"), "127.0.0.14");
    assert_no_panic(&bal);
    drop((held, next));
}
