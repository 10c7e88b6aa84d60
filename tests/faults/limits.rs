//! Scenarios 6 and 7: the master's own limits. Under a low open-file limit it neither
//! crashes nor spins and serves again once descriptors are free; idle and slow clients are
//! closed by `--idle-timeout` while healthy clients are unaffected.

use super::*;

// ---------------------------------------------------------------------------------------------
// 6. A low open-file limit.

/// The open-file limit (soft and hard) of the master in these scenarios: room for its own
/// ~20 descriptors and a couple of dozen connections, far fewer than the clients.
const NOFILE: u64 = 64;
/// Concurrent clients against that limit.
const FD_CLIENTS: usize = 200;

/// `n` clients that each send one request at the same moment (a barrier releases them), with
/// a generous timeout; returns every attempt.
fn burst(addr: SocketAddr, n: usize, timeout: Duration) -> load::Report {
    let start = std::sync::Barrier::new(n);
    let attempts = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    load::request(addr, load::REQUEST, timeout)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a burst client panicked"))
            .collect()
    });
    load::Report { attempts }
}

/// `n` clients that connect and send nothing, held open for `hold`; returns how many
/// connects succeeded. Completed connects wait in the listen backlog (4096) whether or not
/// the master accepts them.
fn hold_idle(addr: SocketAddr, n: usize, hold: Duration) -> usize {
    let conns: Vec<_> = (0..n)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    // Pacing: the clients stay idle this long while the master runs out of descriptors.
    thread::sleep(hold);
    conns.len()
}

/// The master under `RLIMIT_NOFILE` 64 (soft and hard), two workers, `--max-conns 1000` (more
/// than fits: the master warns that accept will back off when fds run out). First 200 clients
/// connect and stay idle for 2 s: the master runs out of descriptors and must back off, not
/// spin (CPU share over those 2 s < 10 %). Then 200 clients send a request at the same
/// moment. Neither may crash it; once its descriptors are free again (back to the count
/// before), later connections are served (20 in a row succeed within 10 s).
///
/// How long the recovery takes is reported, not asserted here: see the next test.
#[test]
fn low_fd_limit_neither_crashes_nor_spins() {
    const HOLD: Duration = Duration::from_secs(2);
    const CPU_BOUND: f64 = 0.10;

    let mut m = rlimit::LimitedMaster::start(NOFILE, &["--cpus", "2", "--max-conns", "1000"]);
    let addr = m.addr();
    m.expect_line("`all workers ready`", READY, |l| {
        is_event(l, "all workers ready")
    });
    let master = m.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let cpu = CpuWatch::start(master);
    let held = hold_idle(addr, FD_CLIENTS, HOLD);
    let (hold_cpu, hold_share) = cpu.read();

    let burst = burst(addr, FD_CLIENTS, Duration::from_secs(10));
    let burst_failed = burst.failed_kinds();
    expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(10),
        "after the burst",
    );
    let freed = Instant::now();

    // Later connections: until 20 in a row succeed.
    let mut later = load::Report::default();
    let mut streak = 0;
    let recovered = wait_until(Duration::from_secs(10), || {
        let a = load::request(addr, load::REQUEST, Duration::from_secs(2));
        later.attempts.push(a);
        streak = if a.outcome == Outcome::Ok {
            streak + 1
        } else {
            0
        };
        streak >= 20
    });
    let recovery = freed.elapsed();
    let later_failed = later.failed_kinds();
    let lines = m.lines();
    summary(
        "low_fd_limit",
        &[
            ("nofile", NOFILE.to_string()),
            ("workers", "2".to_string()),
            ("max_conns", "1000".to_string()),
            ("idle_clients_held", held.to_string()),
            ("hold_cpu_ms", hold_cpu.as_millis().to_string()),
            ("hold_cpu_pct", format!("{:.1}", hold_share * 100.0)),
            ("burst_clients", burst.len().to_string()),
            ("burst_failed", burst_failed.total().to_string()),
            ("burst_failed_kinds", burst_failed.to_string()),
            ("later_connections", later.len().to_string()),
            ("later_failed", later_failed.total().to_string()),
            ("later_failed_kinds", later_failed.to_string()),
            ("recovery_ms", recovery.as_millis().to_string()),
            (
                "accept_backoffs",
                events(&lines, "accept failed, backing off")
                    .count()
                    .to_string(),
            ),
            (
                "workers_marked_down",
                events(&lines, "worker down: connects keep failing")
                    .count()
                    .to_string(),
            ),
        ],
    );
    assert!(m.is_running(), "the master died:\n{}", m.dump());
    assert!(
        !lines.iter().any(|l| looks_like_panic(l)),
        "panic:\n{}",
        m.dump()
    );
    assert_eq!(held, FD_CLIENTS, "idle connects failed");
    assert!(
        hold_share < CPU_BOUND,
        "the master used {hold_cpu:?} of CPU in {HOLD:?} out of descriptors"
    );
    assert!(
        recovered,
        "later connections still fail {recovery:?} after the descriptors were freed: {later_failed}\n{}",
        m.dump()
    );
}

/// Same limit, and 200 idle clients held for 2 s: while the master is out of descriptors,
/// clients it cannot serve yet must wait (in the backlog, as `--max-conns` says, or
/// accepted), not be reset; the two workers, healthy throughout, must not be blamed; and the
/// connections after the descriptors are free must be served at once.
///
/// Product bug: a connect to a worker that fails with the master's *own* `EMFILE` (the
/// accept took the last descriptor) is treated like the worker refusing
/// (`proxy/src/forward.rs`, `forward`: any connect error is `record_connect(false)` and
/// the next worker is tried, then the client is closed): ~90 of the 200 clients are reset
/// ("client closed without a backend ... 2 backend(s) failed to accept the connection")
/// while both workers are fine, and about half the runs also take a healthy worker out of
/// rotation at the next health tick ("worker down: connects keep failing"; both of them in
/// a manual run, leaving none: "no worker in rotation"). Fix: on `EMFILE`/`ENFILE` (and
/// `ENOBUFS`/`ENOMEM`) from the upstream `socket()`/`connect()`, keep the client, do not
/// count it against the worker, and retry after the accept backoff; or accept only while
/// two descriptors are free.
#[test]
#[ignore = "product bug (partly fixed): workers are no longer blamed for the master's own EMFILE, but a client accepted when no descriptor is left for its worker connection is closed rather than left waiting in the backlog"]
fn low_fd_limit_clients_wait_and_workers_are_not_blamed() {
    let m = rlimit::LimitedMaster::start(NOFILE, &["--cpus", "2", "--max-conns", "1000"]);
    let addr = m.addr();
    m.expect_line("`all workers ready`", READY, |l| {
        is_event(l, "all workers ready")
    });
    let master = m.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let held = hold_idle(addr, FD_CLIENTS, Duration::from_secs(2));
    expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(10),
        "after the idle clients",
    );
    // Later connections, one every 50 ms for 1.5 s.
    let mut later = load::Report::default();
    for _ in 0..30 {
        later
            .attempts
            .push(load::request(addr, load::REQUEST, Duration::from_secs(2)));
        thread::sleep(Duration::from_millis(50));
    }
    let marked_down = events(&m.lines(), "worker down: connects keep failing").count();
    let failed = later.failed_kinds();
    summary(
        "low_fd_limit_hold",
        &[
            ("idle_clients_held", held.to_string()),
            (
                "clients_closed_without_backend",
                events(&m.lines(), "client closed without a backend")
                    .count()
                    .to_string(),
            ),
            ("workers_marked_down", marked_down.to_string()),
            ("later_connections", later.len().to_string()),
            ("later_failed", failed.total().to_string()),
            ("later_failed_kinds", failed.to_string()),
        ],
    );
    let reset = events(&m.lines(), "client closed without a backend").count();
    assert_eq!(
        reset,
        0,
        "clients reset for the master's own EMFILE with both workers healthy:\n{}",
        m.dump()
    );
    assert_eq!(
        marked_down,
        0,
        "healthy workers taken out of rotation for the master's own EMFILE:\n{}",
        m.dump()
    );
    assert_eq!(
        failed.total(),
        0,
        "later connections failed with both workers healthy ({failed}):\n{}",
        m.dump()
    );
}

/// The same limit with the default `--max-conns`: the master derives it from the limit, and
/// all 200 clients, then 10 later ones, must be served.
///
/// (Were bugs: the derived cap ignored small limits, and a permit was taken before a
/// connection was waiting on that thread's listener.)
#[test]
fn low_fd_limit_with_the_default_cap_serves_every_client() {
    let m = rlimit::LimitedMaster::start(NOFILE, &["--cpus", "2"]);
    let addr = m.addr();
    m.expect_line("`all workers ready`", READY, |l| {
        is_event(l, "all workers ready")
    });
    let burst = burst(addr, FD_CLIENTS, Duration::from_secs(10));
    let later = sequential(addr, 10, Duration::from_secs(2));
    let (burst_failed, later_failed) = (burst.failed_kinds(), later.failed_kinds());
    summary(
        "low_fd_limit_default_cap",
        &[
            ("burst_clients", burst.len().to_string()),
            ("burst_failed_kinds", burst_failed.to_string()),
            ("later_failed_kinds", later_failed.to_string()),
        ],
    );
    assert_eq!(
        burst_failed.total() + later_failed.total(),
        0,
        "{}",
        m.dump()
    );
}

/// The starvation of bug (2) above without any fd limit: `--max-conns 1`, two proxy threads
/// (on a machine with two or more CPUs), ten requests one after the other; each must be
/// served within 2 s.
#[test]
fn max_conns_smaller_than_proxy_threads_serves_sequential_clients() {
    let b = Balancer::start(&["--cpus", "1", "--max-conns", "1"]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let report = sequential(addr, 10, Duration::from_secs(2));
    let failed = report.failed_kinds();
    summary(
        "max_conns_1",
        &[
            ("connections", report.len().to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
        ],
    );
    assert_eq!(failed.total(), 0, "{failed}\n{}", b.dump());
}

// ---------------------------------------------------------------------------------------------
// 7. Idle and slow clients.

/// How one idle or slow client ended.
#[derive(Debug, Clone, Copy)]
struct Closed {
    /// From connect to the master's close (EOF or reset), or `None` if still open at the end.
    after: Option<Duration>,
    /// Request bytes sent by then.
    sent: usize,
    /// Whether a response came.
    answered: bool,
}

/// A client that connects and then sends `request` one byte every `gap` (nothing at all if
/// `gap` is `None`), watching for the master to close the connection, for at most `limit`.
/// The read timeout between two bytes is the pacing.
fn trickle(addr: SocketAddr, request: &[u8], gap: Option<Duration>, limit: Duration) -> Closed {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut sent = 0;
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => panic!("connect: {e}"),
    };
    let wait = gap.unwrap_or(limit);
    stream
        .set_read_timeout(Some(wait))
        .expect("setting a read timeout");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        if gap.is_some() && sent < request.len() {
            if stream.write_all(&request[sent..=sent]).is_err() {
                return Closed {
                    after: Some(started.elapsed()),
                    sent,
                    answered: false,
                };
            }
            sent += 1;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Closed {
                    after: Some(started.elapsed()),
                    sent,
                    answered: !response.is_empty(),
                }
            }
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return Closed {
                    after: Some(started.elapsed()),
                    sent,
                    answered: !response.is_empty(),
                }
            }
        }
    }
    Closed {
        after: None,
        sent,
        answered: !response.is_empty(),
    }
}

/// `--idle-timeout 500ms`, two workers, two clients of healthy load throughout, and at the
/// same time:
/// - 10 idle clients (connect, say nothing): each closed between 0.5 s and 0.75 s (the
///   timeout is checked every half timeout and needs two quiet looks) plus slack;
/// - 10 slow clients sending one byte a second: each closed after its first byte, before
///   the second (a gap of 1 s is more than 1.5 × 500 ms, so the close is certain; with
///   `--idle-timeout 1s` a client sending a byte every second might never be idle for two
///   looks in a row: the timeout is for silence, not for slowness);
/// - 1 client sending a short request one byte every 150 ms (never silent for 500 ms): it
///   is not closed, and gets its answer.
///
/// The healthy clients see no failure; the master counts the 20 idle closes.
#[test]
fn idle_and_slow_clients_are_closed_by_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(500);
    const IDLE_CLIENTS: usize = 10;
    const SLOW_CLIENTS: usize = 10;
    /// Scheduling slack on a busy 2-core machine.
    const SLACK: Duration = Duration::from_secs(1);
    const LIMIT: Duration = Duration::from_secs(5);

    let b = Balancer::start(&[
        "--cpus",
        "2",
        "--idle-timeout",
        "500ms",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_in_rotation(&b, 2, READY);

    let load = Load::start(
        addr,
        Spec {
            threads: 2,
            pace: Duration::from_millis(10),
            ..Spec::default()
        },
    );
    let (idle, slow, trickling) = thread::scope(|s| {
        let idle: Vec<_> = (0..IDLE_CLIENTS)
            .map(|_| s.spawn(|| trickle(addr, load::REQUEST, None, LIMIT)))
            .collect();
        let slow: Vec<_> = (0..SLOW_CLIENTS)
            .map(|_| s.spawn(|| trickle(addr, load::REQUEST, Some(Duration::from_secs(1)), LIMIT)))
            .collect();
        let trickling = s.spawn(|| {
            trickle(
                addr,
                b"GET / HTTP/1.0\r\n\r\n",
                Some(Duration::from_millis(150)),
                LIMIT,
            )
        });
        let join = |hs: Vec<thread::ScopedJoinHandle<'_, Closed>>| -> Vec<Closed> {
            hs.into_iter()
                .map(|h| h.join().expect("a client panicked"))
                .collect()
        };
        (
            join(idle),
            join(slow),
            trickling.join().expect("the trickling client panicked"),
        )
    });
    let report = load.finish();
    let failed = report.failed_kinds();
    let m = metrics(admin);
    let closed_after = |cs: &[Closed]| -> String {
        let ms: Vec<u128> = cs
            .iter()
            .filter_map(|c| c.after.map(|d| d.as_millis()))
            .collect();
        match (ms.iter().min(), ms.iter().max()) {
            (Some(lo), Some(hi)) => format!("{lo}-{hi}"),
            _ => "never".to_owned(),
        }
    };
    summary(
        "idle_slow",
        &[
            ("idle_timeout_ms", IDLE.as_millis().to_string()),
            ("idle_clients", IDLE_CLIENTS.to_string()),
            ("idle_closed_after_ms", closed_after(&idle)),
            ("slow_clients", SLOW_CLIENTS.to_string()),
            ("slow_closed_after_ms", closed_after(&slow)),
            (
                "slow_bytes_sent_max",
                slow.iter().map(|c| c.sent).max().unwrap_or(0).to_string(),
            ),
            ("trickle_answered", trickling.answered.to_string()),
            ("connections", report.len().to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
            (
                "master_idle_closed",
                metric(&m, "balancer_connections_idle_closed_total").to_string(),
            ),
        ],
    );
    for c in &idle {
        let after = c.after.expect("an idle client was never closed");
        assert!(
            after >= IDLE && after <= IDLE * 3 / 2 + SLACK,
            "idle client closed after {after:?}"
        );
        assert!(!c.answered);
    }
    for c in &slow {
        let after = c.after.expect("a slow client was never closed");
        assert!(
            after >= IDLE && after <= IDLE * 3 / 2 + SLACK,
            "slow client closed after {after:?}"
        );
        assert!(c.sent <= 2 && !c.answered, "{c:?}");
    }
    assert!(
        trickling.answered,
        "a client never silent for the timeout was cut off: {trickling:?}"
    );
    assert_eq!(failed.total(), 0, "healthy clients failed: {failed}");
    assert!(
        metric(&m, "balancer_connections_idle_closed_total")
            >= (IDLE_CLIENTS + SLOW_CLIENTS) as u64,
        "{m:?}"
    );
    assert_no_panic(&b);
}
