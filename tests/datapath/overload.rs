//! Issue 9 item 10: overload must not empty the rotation. A flood of connect-and-close
//! clients against python workers with a tiny listen backlog used to take every worker out
//! of rotation (connect timeouts counted as deaths) and fail the normal clients with "no
//! backend in rotation".

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// A single-threaded HTTP worker with a listen backlog of 8: a burst fills its accept queue
/// at once, and the kernel drops the SYNs beyond it (the proxy's connects time out).
const SMALL_BACKLOG: &str = r#"
srv.listen(8)
while True:
    c, _ = srv.accept()
    if request(c) is not None:
        try:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        except OSError:
            pass
    c.close()
"#;

const FLOOD_THREADS: usize = 4;
const FLOOD_PER_THREAD: usize = 1500;
const NORMAL_THREADS: usize = 4;
/// Bound on the whole flood, whatever the machine's speed.
const FLOOD_LIMIT: Duration = Duration::from_secs(20);

fn normal_request(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").is_err() {
        return false;
    }
    let mut got = Vec::new();
    s.read_to_end(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 200")
}

#[test]
fn a_connect_and_close_flood_does_not_empty_the_rotation() {
    let (b, _) = start_python_n(2, &["--health-check", "tcp"], SMALL_BACKLOG);
    let addr = b.addr();
    let flood_done = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let normal: Vec<_> = (0..NORMAL_THREADS)
        .map(|_| {
            let (done, ok, failed) = (flood_done.clone(), ok.clone(), failed.clone());
            thread::spawn(move || {
                let mut after = None;
                // Until a second after the flood (bounded by the flood's own bound).
                while after.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(1)) {
                    let counter = if normal_request(addr) { &ok } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if after.is_none() && done.load(Ordering::Relaxed) {
                        after = Some(Instant::now());
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let flood: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..FLOOD_PER_THREAD {
                    if started.elapsed() > FLOOD_LIMIT {
                        break;
                    }
                    drop(TcpStream::connect_timeout(&addr, Duration::from_secs(2)));
                }
            })
        })
        .collect();
    for t in flood {
        t.join().unwrap();
    }
    let flood_time = started.elapsed();
    flood_done.store(true, Ordering::Relaxed);
    for t in normal {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let lines = b.lines();
    let empty = lines
        .iter()
        .filter(|l| {
            l.contains("no backend in rotation")
                || is_event(
                    l,
                    "no worker in rotation: new connections fail until one is ready",
                )
        })
        .count();
    eprintln!(
        "datapath: flood={} in {flood_time:?}, normal ok={ok} failed={failed}, empty-rotation lines={empty}",
        FLOOD_THREADS * FLOOD_PER_THREAD
    );
    assert_eq!(
        empty,
        0,
        "the rotation emptied under the flood (normal ok={ok} failed={failed}); log:\n{}",
        b.dump()
    );
    assert!(
        ok > 0 && failed * 10 <= ok + failed,
        "normal requests: {ok} ok, {failed} failed (more than 10 %)"
    );
}

/// Passes its first three health checks (to be admitted), then answers 503 to every check
/// and 200 to everything else: every worker fails its checks while it serves its clients.
const SICK_CHECKS: &str = r#"
checks = 0
while True:
    c, _ = srv.accept()
    req = request(c)
    if req is not None:
        sick = False
        if req.startswith(b"GET /check "):
            checks += 1
            sick = checks > 3
        status = b"503 Unavailable" if sick else b"200 OK"
        try:
            c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        except OSError:
            pass
    c.close()
"#;

#[test]
fn every_worker_down_is_panic_mode_and_clients_are_still_served() {
    let (b, _) = start_python_n(
        2,
        &[
            "--health-check",
            "http",
            "--health-http",
            "/check",
            "--health-interval",
            "200ms",
            "--health-fall",
            "2",
        ],
        SICK_CHECKS,
    );
    b.expect_line(0, "the panic-mode line", READY, |l| {
        is_event(
            l,
            "every backend is down: sending to all of them until one is up (panic mode)",
        )
    });
    // Clients are served by the down workers, and the workers, answering them, are kept
    // rather than replaced as hung, for several check rounds.
    let until = Instant::now() + Duration::from_secs(2);
    let mut served = 0;
    while Instant::now() < until {
        assert!(
            normal_request(b.addr()),
            "a request failed in panic mode; log:\n{}",
            b.dump()
        );
        served += 1;
    }
    let lines = b.lines();
    let panics = lines.iter().filter(|l| l.contains("(panic mode)")).count();
    assert_eq!(
        panics,
        1,
        "panic mode logged once per change; log:\n{}",
        b.dump()
    );
    assert!(
        !lines
            .iter()
            .any(|l| is_event(l, "worker unresponsive; replacing it")),
        "a worker answering its clients was replaced; log:\n{}",
        b.dump()
    );
    assert!(served > 0);
}
