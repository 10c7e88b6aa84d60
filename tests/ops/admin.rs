//! The admin endpoint's limits (issue 9, item 7): slow and idle clients are cut after about
//! 10 s, connections are capped so that the data path keeps its fds, and only `GET` and
//! `HEAD` are served on the read-only paths.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::faults::rlimit::LimitedMaster;

/// The admin endpoint's header and idle timeouts (`src/admin/mod.rs`).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of [`ADMIN_TIMEOUT`] for a busy 2-core machine and the 1 s poll pace.
const SLACK: Duration = Duration::from_secs(4);
/// The admin endpoint's connection cap (`admin::MAX_CONNS`).
const ADMIN_MAX_CONNS: usize = 32;

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

#[test]
fn admin_cuts_slowloris_and_idle_connections_after_its_timeouts() {
    let b = Balancer::start(&["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&b);
    // Clients dripping one byte a second of headers that never end, and as many that send
    // nothing, filling the cap between them: all must be closed by the master within the
    // timeout (not refused at once: that is the cap's answer, tested below).
    let half = ADMIN_MAX_CONNS / 2;
    let opened = Instant::now();
    let mut slow: Vec<Option<TcpStream>> = (0..half).map(|_| Some(connect(admin))).collect();
    let mut idle: Vec<Option<TcpStream>> = (0..half).map(|_| Some(connect(admin))).collect();
    let drip =
        b"GET /status HTTP/1.1\r\nHost: admin\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut slow_closed = vec![None; slow.len()];
    let mut idle_closed = vec![None; idle.len()];
    let deadline = opened + ADMIN_TIMEOUT + SLACK;
    let mut sent = 0;
    while Instant::now() < deadline
        && (slow.iter().any(Option::is_some) || idle.iter().any(Option::is_some))
    {
        for (conn, closed) in slow.iter_mut().zip(&mut slow_closed) {
            let Some(stream) = conn else { continue };
            let byte = &drip[sent % drip.len()..][..1];
            if std::io::Write::write_all(stream, byte).is_err() || peer_closed(stream) {
                *closed = Some(opened.elapsed());
                *conn = None;
            }
        }
        for (conn, closed) in idle.iter_mut().zip(&mut idle_closed) {
            if conn.as_mut().is_some_and(peer_closed) {
                *closed = Some(opened.elapsed());
                *conn = None;
            }
        }
        sent += 1;
        // The slowloris pace: one byte a second per connection.
        thread::sleep(Duration::from_secs(1));
    }
    let open_slow = slow.iter().filter(|c| c.is_some()).count();
    let open_idle = idle.iter().filter(|c| c.is_some()).count();
    assert_eq!(
        (open_slow, open_idle),
        (0, 0),
        "slowloris and idle admin connections still open {:?} after opening ({sent} bytes dripped)",
        opened.elapsed()
    );
    // Not cut before the documented timeout either (the clock started before connecting).
    let earliest = slow_closed
        .iter()
        .chain(&idle_closed)
        .flatten()
        .min()
        .copied()
        .expect("every connection closed");
    assert!(
        earliest >= ADMIN_TIMEOUT - Duration::from_secs(1),
        "an admin connection was cut after {earliest:?}, before the {ADMIN_TIMEOUT:?} timeout"
    );
    // And the endpoint still answers.
    let (status, _, _) = exchange(
        admin,
        "GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .expect("GET /status after the slow clients");
    assert_eq!(status, 200);
}

#[test]
fn admin_connections_are_capped_so_the_data_path_keeps_its_fds() {
    // 300 idle admin connections against a master limited to 256 fds: before the cap, the
    // admin endpoint took every fd and the data path failed 10 requests out of 10.
    let m = LimitedMaster::start(256, &["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let addr = m.addr();
    let line = m.expect_line("`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    let admin: SocketAddr = field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"));
    m.expect_line("`worker ready`", READY_TIMEOUT, |l| {
        is_event(l, "worker ready")
    });

    let mut idle: Vec<TcpStream> = (0..300).map(|_| connect(admin)).collect();
    // The master serves at most the cap and closes the rest at once.
    let mut open = idle.len();
    let capped = wait_until(Duration::from_secs(10), || {
        idle.retain_mut(|s| !peer_closed(s));
        open = idle.len();
        open <= ADMIN_MAX_CONNS
    });
    assert!(
        capped,
        "{open} of 300 idle admin connections still open; the cap is {ADMIN_MAX_CONNS}\n{}",
        m.dump()
    );
    assert!(
        open > 0,
        "the master closed every idle admin connection at once"
    );

    let failures: Vec<String> = (0..10)
        .filter_map(|i| match get(addr, "/") {
            Ok((200, _)) => None,
            Ok((status, body)) => Some(format!("request {i}: {status} {body:?}")),
            Err(e) => Some(format!("request {i}: {e}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "data path with {open} idle admin connections open:\n{failures:#?}\n{}",
        m.dump()
    );

    // The held ones time out, and the endpoint serves again.
    let served = wait_until(ADMIN_TIMEOUT + SLACK, || {
        matches!(get(admin, "/healthz"), Ok((200, _)))
    });
    assert!(served, "admin never answered again\n{}", m.dump());
    assert!(
        wait_until(SLACK, || {
            idle.retain_mut(|s| !peer_closed(s));
            idle.is_empty()
        }),
        "{} idle admin connections outlived the timeout",
        idle.len()
    );
}

#[test]
fn admin_serves_only_get_and_head() {
    let b = Balancer::start(&["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&b);
    for method in ["POST", "DELETE", "PUT", "PATCH"] {
        for path in ["/status", "/healthz", "/metrics"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let (status, head, body) = exchange(admin, &request).expect(&request);
            assert_eq!(status, 405, "{method} {path}: {head}\n{body}");
            assert!(
                head.to_ascii_lowercase().contains("allow: get, head"),
                "{method} {path}: no Allow header: {head}"
            );
        }
    }
    let (status, head, _) = exchange(
        admin,
        "GET /reload HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .expect("GET /reload");
    assert_eq!(status, 405, "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    // A body is never read: the answer closes the connection.
    let (status, head, _) = exchange(
        admin,
        "GET /status HTTP/1.1\r\nHost: admin\r\nContent-Length: 5\r\n\r\nhello",
    )
    .expect("GET with a body");
    assert_eq!(status, 413, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );

    let (status, head, body) = exchange(
        admin,
        "HEAD /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .expect("HEAD /status");
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty(), "HEAD with a body: {body:?}");
    let (status, _, body) = exchange(
        admin,
        "GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .expect("GET /status");
    assert_eq!(status, 200);
    assert!(body.contains("\"workers\""), "{body}");
}
