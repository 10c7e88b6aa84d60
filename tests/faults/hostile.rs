//! Hostile clients and signals (issue 16), kept as regression tests: pipelining floods through
//! the proxy and the hand-off, a storm of SIGHUPs, thousands of idle keep-alive connections
//! and a burst on top, the master stopped (`SIGSTOP`) for 3 s, and thousands of clients that
//! connect and close at once. The byte-stream cases (an upgraded stream, 200 MB each way, a
//! reset mid-download) are in [`super::streams`].
//!
//! Each case runs the built-in worker, asserts the promise (no new request fails, every
//! answer is whole) and that the master is left as it was: alive, no panic, no leaked
//! descriptors or children.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use super::*;

/// Raises this test process's soft `RLIMIT_NOFILE` to its hard limit (the masters it starts
/// inherit it) and returns the new soft limit.
pub(super) fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// One parsed HTTP/1.1 response of a pipelined stream.
#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// Reads responses (each with a `content-length`) from `r` until EOF.
fn read_responses(r: impl Read) -> Result<Vec<Response>, String> {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut out = Vec::new();
    loop {
        let mut status_line = String::new();
        match r.read_line(&mut status_line) {
            Ok(0) => return Ok(out),
            Ok(_) => {}
            Err(e) => return Err(format!("after {} responses: {e}", out.len())),
        }
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("response {}: status line {status_line:?}", out.len()))?;
        let mut length = None;
        loop {
            let mut header = String::new();
            r.read_line(&mut header)
                .map_err(|e| format!("response {} headers: {e}", out.len()))?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| format!("response {}: no content-length", out.len()))?;
        let mut body = vec![0; length];
        r.read_exact(&mut body)
            .map_err(|e| format!("response {} body: {e}", out.len()))?;
        out.push(Response { status, body });
    }
}

/// Writes `n` pipelined `GET /` requests in one `write_all` (the last one asks to close)
/// while reading the answers; returns them.
fn pipeline(addr: SocketAddr, n: usize) -> Result<Vec<Response>, String> {
    let mut requests = Vec::new();
    for i in 0..n {
        let close = if i + 1 == n {
            "Connection: close\r\n"
        } else {
            ""
        };
        write!(requests, "GET /?{i} HTTP/1.1\r\nHost: x\r\n{close}\r\n").expect("Vec write");
    }
    let mut conn = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    conn.set_write_timeout(Some(Duration::from_secs(30))).ok();
    let mut writer = conn.try_clone().map_err(|e| format!("clone: {e}"))?;
    // Answers come back while the requests are still going out: read them concurrently, or
    // both sides' buffers fill and the exchange stalls.
    let sending = thread::spawn(move || writer.write_all(&requests));
    let answers = read_responses(&mut conn);
    sending
        .join()
        .expect("writer thread")
        .map_err(|e| format!("writing the requests: {e}"))?;
    answers
}

fn pipelining_through(mode: &str) {
    let b = Balancer::start(&["--cpus", "2", "--mode", mode]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(300));
    for n in [100, 20_000] {
        let started = Instant::now();
        let answers = pipeline(addr, n)
            .unwrap_or_else(|e| panic!("{mode}: {n} pipelined requests: {e}\nlog:\n{}", b.dump()));
        assert_eq!(answers.len(), n, "{mode}: one answer per request");
        assert!(
            answers.iter().all(|a| a.status == 200),
            "{mode}: every answer is 200"
        );
        // One connection, one worker: every answer names the same pid.
        let first = body_pid(&String::from_utf8_lossy(&answers[0].body));
        assert!(
            answers
                .iter()
                .all(|a| body_pid(&String::from_utf8_lossy(&a.body)) == first),
            "{mode}: answers from more than one worker on one connection"
        );
        summary(
            &format!("pipelining_{mode}_{n}"),
            &[
                ("requests", n.to_string()),
                ("answers", answers.len().to_string()),
                ("ms", started.elapsed().as_millis().to_string()),
            ],
        );
    }
    expect_fds_at_most(master, fds_before + 2, Duration::from_secs(10), mode);
    assert_no_panic(&b);
}

/// 100 and then 20,000 `GET`s written in one go on one connection through the proxy: every
/// one answered, in order, by one worker, and the master's descriptors back where they were.
#[test]
fn pipelining_floods_through_the_proxy() {
    pipelining_through("proxy");
}

/// The same through the hand-off (the worker holds the client's socket itself).
#[test]
fn pipelining_floods_through_the_handoff() {
    pipelining_through("handoff");
}

/// 100 SIGHUPs in one second under load: each is a reload requested or coalesced into the
/// pending one; every reload started finishes; no request fails; afterwards exactly the two
/// workers of the last reload remain, none of the first ones, no zombie, no leaked fd.
#[test]
fn a_hundred_sighups_in_one_second_under_load() {
    let b = Balancer::start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();
    let first: Vec<u32> = ready_pids(&b);
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    let load = Load::start(
        addr,
        Spec {
            threads: 3,
            limit: Duration::from_secs(120),
            ..Spec::default()
        },
    );
    for _ in 0..100 {
        send_signal(master, libc::SIGHUP);
        // Pacing: 100 signals spread over one second.
        thread::sleep(Duration::from_millis(10));
    }
    let settled = wait_until(Duration::from_secs(90), || {
        let lines = b.lines();
        let started = events(&lines, "rolling reload started").count();
        let ended = events(&lines, "rolling reload done").count()
            + events(
                &lines,
                "rolling reload aborted; the remaining old workers keep serving",
            )
            .count();
        started > 0 && started == ended && children(master).len() == 2
    });
    let report = load.finish();
    assert!(settled, "the reloads never settled; log:\n{}", b.dump());
    let lines = b.lines();
    let handled = events(&lines, "SIGHUP: rolling reload requested").count()
        + events(&lines, "SIGHUP: a reload is already pending; coalesced").count();
    let reloads = events(&lines, "rolling reload done").count();
    assert!((1..=100).contains(&handled), "{handled} SIGHUPs logged");
    assert!(report.len() > 100, "only {} requests", report.len());
    assert_eq!(
        report.failed_kinds().total(),
        0,
        "failed requests {} of {}; log:\n{}",
        report.failed_kinds(),
        report.len(),
        b.dump()
    );
    let now = ready_pids(&b);
    assert!(
        first.iter().all(|p| !pid_alive(*p)),
        "first workers {first:?} still alive"
    );
    assert!(zombies(master).is_empty(), "zombies {:?}", zombies(master));
    expect_fds_at_most(master, fds_before + 2, Duration::from_secs(10), "after");
    summary(
        "sighup_storm",
        &[
            ("signals", "100".into()),
            ("handled", handled.to_string()),
            ("reloads", reloads.to_string()),
            ("requests", report.len().to_string()),
            ("failed", report.failed_kinds().to_string()),
            ("workers_now", now.len().to_string()),
        ],
    );
    assert_no_panic(&b);
}

/// Opens a keep-alive connection and makes one request on it; the connection stays open.
fn keep_alive(addr: SocketAddr) -> Result<BufReader<TcpStream>, String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut conn = BufReader::new(conn);
    one_response(&mut conn)?;
    Ok(conn)
}

/// Reads one response (headers and a `content-length` body) and returns its status.
fn one_response(r: &mut BufReader<TcpStream>) -> Result<u16, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("status: {e}"))?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("status line {line:?}"))?;
    let mut length = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| format!("header: {e}"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

/// 3,000 idle keep-alive connections (each made one request and stays open), then a burst of
/// 1,000 new clients at once: every one of the burst is answered, and afterwards each of the
/// 3,000 still answers a second request on its connection.
#[test]
fn three_thousand_idle_keep_alives_then_a_burst_of_a_thousand() {
    const IDLE: usize = 3_000;
    const BURST: usize = 1_000;
    const OPENERS: usize = 20;
    let nofile = raise_nofile();
    assert!(
        nofile >= 10_000,
        "RLIMIT_NOFILE hard limit {nofile} too low"
    );
    let b = Balancer::start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();

    let idle: Vec<BufReader<TcpStream>> = thread::scope(|s| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|_| {
                s.spawn(|| {
                    (0..IDLE / OPENERS)
                        .map(|_| keep_alive(addr))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        openers
            .into_iter()
            .flat_map(|h| h.join().expect("opener thread"))
            .enumerate()
            .map(|(i, c)| c.unwrap_or_else(|e| panic!("idle connection {i}: {e}\n{}", b.dump())))
            .collect()
    });
    assert_eq!(idle.len(), IDLE);
    let master_fds = fd_count(master);
    assert!(
        master_fds >= 2 * IDLE,
        "the master holds {master_fds} fds for {IDLE} proxied connections"
    );

    let go = std::sync::Barrier::new(BURST / 10);
    let burst: Vec<load::Attempt> = thread::scope(|s| {
        let hs: Vec<_> = (0..BURST / 10)
            .map(|_| {
                s.spawn(|| {
                    go.wait();
                    (0..10)
                        .map(|_| load::request(addr, load::REQUEST, Duration::from_secs(20)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("burst thread"))
            .collect()
    });
    let failed = load::Kinds::of(burst.iter().filter(|a| a.outcome != Outcome::Ok));
    assert_eq!(
        failed.total(),
        0,
        "burst failures {failed} of {BURST}; log:\n{}",
        b.dump()
    );

    let mut again_failed = Vec::new();
    for (i, mut conn) in idle.into_iter().enumerate() {
        let r = conn
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| e.to_string())
            .and_then(|()| one_response(&mut conn));
        if r != Ok(200) {
            again_failed.push((i, r));
        }
    }
    assert!(
        again_failed.is_empty(),
        "{} idle connections failed their second request: {:?}",
        again_failed.len(),
        &again_failed[..again_failed.len().min(5)]
    );
    summary(
        "idle_keepalive_burst",
        &[
            ("idle", IDLE.to_string()),
            ("burst", BURST.to_string()),
            ("burst_failed", failed.to_string()),
            ("master_fds_idle", master_fds.to_string()),
        ],
    );
    assert_no_panic(&b);
}

/// The master stopped with SIGSTOP for 3 s under load, then continued: clients that connected
/// meanwhile wait in the listen backlog and are all served afterwards; no request fails, the
/// workers are the same ones, and the master goes on serving.
#[test]
fn sigstop_of_the_master_for_three_seconds_under_load() {
    const STOPPED: Duration = Duration::from_secs(3);
    let b = Balancer::start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();
    let workers = ready_pids(&b);

    let load = Load::start(
        addr,
        Spec {
            threads: 4,
            timeout: Duration::from_secs(15),
            limit: Duration::from_secs(60),
            ..Spec::default()
        },
    );
    thread::sleep(Duration::from_millis(500)); // Pacing: some load before the stop.
    let stopped_at = Instant::now();
    send_signal(master, libc::SIGSTOP);
    thread::sleep(STOPPED);
    send_signal(master, libc::SIGCONT);
    let continued_at = Instant::now();
    thread::sleep(Duration::from_secs(2)); // Pacing: load after the continue.
    let report = load.finish();

    assert_eq!(
        report.failed_kinds().total(),
        0,
        "failed {} of {}; log:\n{}",
        report.failed_kinds(),
        report.len(),
        b.dump()
    );
    // Proof the stop was felt: requests open while it was stopped waited for the master.
    let waited = report
        .attempts
        .iter()
        .filter(|a| a.overlaps(stopped_at, continued_at))
        .map(|a| a.end.duration_since(a.start))
        .max()
        .unwrap_or_default();
    assert!(
        waited >= Duration::from_secs(2),
        "no request waited out the stop (longest {waited:?})"
    );
    let after = report
        .attempts
        .iter()
        .filter(|a| a.start > continued_at)
        .count();
    assert!(after > 0, "no request after SIGCONT");
    assert!(
        workers.iter().all(|&p| pid_alive(p)),
        "workers {workers:?} were replaced while the master was stopped\n{}",
        b.dump()
    );
    summary(
        "sigstop_master",
        &[
            ("requests", report.len().to_string()),
            ("failed", report.failed_kinds().to_string()),
            ("longest_wait_ms", waited.as_millis().to_string()),
        ],
    );
    assert_no_panic(&b);
}

/// 4,000 clients that connect and close at once (half with a FIN, half with a reset), from
/// 8 threads, while a normal load runs: no request of the load fails, the master's
/// descriptors come back to where they were and both workers are still the same.
#[test]
fn four_thousand_connect_and_close_clients() {
    const CLIENTS: usize = 4_000;
    const THREADS: usize = 8;
    let b = Balancer::start(&["--cpus", "2", "--admin", "127.0.0.1:0"]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_all_ready(&b, 2);
    let master = b.pid();
    let workers = ready_pids(&b);
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    let load = Load::start(
        addr,
        Spec {
            threads: 2,
            limit: Duration::from_secs(60),
            ..Spec::default()
        },
    );
    let started = Instant::now();
    let connected: usize = thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut ok = 0;
                    for i in 0..CLIENTS / THREADS {
                        let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                        else {
                            continue;
                        };
                        ok += 1;
                        if (t + i) % 2 == 0 {
                            let s2 = socket2::SockRef::from(&c);
                            s2.set_linger(Some(Duration::ZERO)).ok();
                        }
                        drop(c);
                    }
                    ok
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("client thread"))
            .sum()
    });
    let flood = started.elapsed();
    // The flood sits in the listen backlog faster than the master (a debug build on a busy
    // machine) accepts it, and every accepted connection is offered to a worker; the load's
    // requests queue behind it. Wait until the master has accepted every one of them and
    // has only the load's connections open, then keep the load going a little: from then on
    // requests are served as before.
    let mut last = BTreeMap::new();
    let drained = wait_until(Duration::from_secs(60), || {
        last = metrics(admin);
        metric(&last, "balancer_connections_accepted_total") >= CLIENTS as u64
            && metric(&last, "balancer_connections_open") <= 2
    });
    assert!(drained, "the flood was never worked through: {last:?}");
    let drained = started.elapsed();
    let before_tail = Instant::now();
    thread::sleep(Duration::from_secs(1)); // Pacing: load after the drain.
    let report = load.finish();
    assert_eq!(connected, CLIENTS, "connects refused or timed out");
    let tail = report
        .attempts
        .iter()
        .filter(|a| a.start >= before_tail)
        .count();
    assert!(
        tail >= 10,
        "only {tail} load requests in the second after the drain"
    );
    assert_eq!(
        report.failed_kinds().total(),
        0,
        "load failures {} of {}; log:\n{}",
        report.failed_kinds(),
        report.len(),
        b.dump()
    );
    expect_fds_at_most(master, fds_before + 2, Duration::from_secs(20), "after");
    assert!(workers.iter().all(|&p| pid_alive(p)), "workers replaced");
    summary(
        "connect_and_close",
        &[
            ("clients", CLIENTS.to_string()),
            ("flood_ms", flood.as_millis().to_string()),
            ("drained_ms", drained.as_millis().to_string()),
            ("load_requests", report.len().to_string()),
            ("load_failed", report.failed_kinds().to_string()),
        ],
    );
    assert_no_panic(&b);
}
