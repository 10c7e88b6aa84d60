//! Fault suite (issue 3): the real binary under load while workers, clients and the IPC
//! channel misbehave. The promise under test: while at least one worker is healthy, no new
//! client connection fails.
//!
//! Each scenario runs `balancer` on a loopback port, drives it with the [`load`] client,
//! breaks something (kills, stops, reloads, crashing or one-shot workers, a low fd limit,
//! idle clients, abusive IPC, a stop with requests in flight), counts every client-side
//! failure by kind, and prints one `faults: scenario=...` summary line; those lines make the
//! table in `tests/faults/RESULTS.md` (`tests/faults/results.sh` builds it).
//!
//! Time is read from the test's own clock (`Instant`) and, where the product's timing is the
//! point (backoff), from the log's timestamps. Nothing waits with a bare sleep: conditions
//! are polled under deadlines; sleeps only pace load and kill loops.

mod load;
mod procfs;
mod python;
mod rlimit;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;
use load::{Attempt, Kinds, Load, Outcome, Spec};
use procfs::*;

/// How long workers may take from spawn to rotation on a busy 2-core machine running other
/// tests at once (the built-in worker is a debug build; a python worker starts in ~50 ms).
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing left to drain may take.
const EXIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Reading the master: its log, its admin endpoint.

/// Waits until `n` workers are in rotation at once (by the log).
fn wait_in_rotation(b: &Balancer, n: usize, timeout: Duration) {
    let ok = wait_until(timeout, || {
        rotation(&b.lines())
            .keys()
            .filter(|&&p| pid_alive(p))
            .count()
            >= n
    });
    assert!(
        ok,
        "{n} workers never in rotation within {timeout:?}; log:\n{}",
        b.dump()
    );
}

/// The workers in rotation according to the log, `pid -> slot`: `worker ready` puts one in,
/// `worker out of rotation` takes it out.
fn rotation(lines: &[String]) -> BTreeMap<u32, u32> {
    let mut set = BTreeMap::new();
    for l in lines {
        if is_event(l, "worker ready") {
            if let (Some(pid), Some(slot)) = (field_u32(l, "pid"), field_u32(l, "slot")) {
                set.insert(pid, slot);
            }
        } else if is_event(l, "worker out of rotation") {
            if let Some(pid) = field_u32(l, "pid") {
                set.remove(&pid);
            }
        }
    }
    set
}

/// The log events with `message`.
fn events<'a>(lines: &'a [String], message: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    lines.iter().filter(move |l| is_event(l, message))
}

/// The address of `--admin 127.0.0.1:0`, from its log line.
fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
}

/// The admin endpoint's Prometheus counters and gauges, `name -> value` (labels kept in
/// the name: `balancer_workers{state="ready"}`).
fn metrics(admin: SocketAddr) -> BTreeMap<String, u64> {
    let (status, body) = get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One counter of [`metrics`], 0 when absent.
fn metric(m: &BTreeMap<String, u64>, name: &str) -> u64 {
    m.get(name).copied().unwrap_or(0)
}

/// The time of a log line, seconds since the Unix epoch (`2026-11-27T10:57:35.642447Z`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split(' ').next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s = t.next()?.parse::<f64>().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// The `status=` of a `worker exited` or `worker stopped` line (`exit code 0`,
/// `signal 9 (SIGKILL)`).
fn exit_status(line: &str) -> &str {
    let Some((_, rest)) = line.split_once(" status=") else {
        return "?";
    };
    rest.split(" last_stderr=").next().unwrap_or(rest)
}

fn assert_no_panic(b: &Balancer) {
    assert!(
        !b.lines().iter().any(|l| looks_like_panic(l)),
        "panic text in the log:\n{}",
        b.dump()
    );
}

/// Prints the one summary line of a scenario (collected into `RESULTS.md`).
fn summary(scenario: &str, fields: &[(&str, String)]) {
    let mut line = format!("faults: scenario={scenario}");
    for (k, v) in fields {
        line.push_str(&format!(" {k}={v}"));
    }
    eprintln!("{line}");
}

/// A small xorshift generator: which worker to kill next. Seeded from the clock, and the
/// seed is printed, so a failing run can be told apart from a lucky one.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Waits (1 ms polls, at most `timeout`) until `pid` is dead or a zombie; returns when.
fn wait_dead(pid: u32, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !pid_alive(pid),
        "{pid} still alive {timeout:?} after SIGKILL"
    );
    Instant::now()
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 of a random worker every 0.5 s under continuous load.

/// One `kill -9` of a worker.
#[derive(Debug, Clone, Copy)]
struct Kill {
    pid: u32,
    /// Just before `kill()`.
    sent: Instant,
    /// When `/proc` first showed it dead (its sockets closed by then).
    gone: Instant,
}

/// Four built-in workers, six clients opening new connections back to back, and a random
/// worker in rotation SIGKILLed every 0.5 s for 10 s (only while two or more are in rotation,
/// so that one healthy worker always remains: the promise's premise).
///
/// Classification of a failed request, from the client's side (it cannot see which worker
/// it reached):
/// - **in-flight**: a reset, an empty reply or a short reply of a connection whose whole
///   request had been written and that was open while a worker died (it started before the
///   victim was seen dead in `/proc` and ended after the kill was sent). Such a connection
///   may have been forwarded to the victim, its request already in the victim's socket or
///   accept queue: the proxy cannot offer it to another worker, since the request bytes
///   are gone. (Also one that reached a live worker in the same instant is counted here:
///   the client cannot tell them apart, so the window is generous on purpose.) Allowed,
///   counted separately.
/// - **failed new**: everything else: any refused connect (the master's listener must never
///   refuse), any timeout, any failure before the request was written, any failure of a
///   connection that overlapped no kill (between kills a dead worker's port refuses, and
///   the proxy offers the client to the next worker). Must be 0.
///
/// The master's own counters agree from its side: `connect_failed` (every worker offered
/// refused) and `no_backend` must stay 0; in-flight failures show up as its `reset` (or as
/// a clean EOF, when the victim had read the request before it died).
#[test]
fn kill9_of_random_workers_fails_no_new_connection() {
    const WORKERS: usize = 4;
    const THREADS: usize = 6;
    const KILL_EVERY: Duration = Duration::from_millis(500);
    const FOR: Duration = Duration::from_secs(10);

    let b = Balancer::start(&["--cpus", "4", "--admin", "127.0.0.1:0"]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_in_rotation(&b, WORKERS, READY);
    let master = b.pid();

    let load = Load::start(
        addr,
        Spec {
            threads: THREADS,
            pace: Duration::from_millis(3),
            ..Spec::default()
        },
    );
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let mut kills: Vec<Kill> = Vec::new();
    let mut skipped = 0;
    let end = Instant::now() + FOR;
    while Instant::now() < end {
        thread::sleep(KILL_EVERY);
        let live: Vec<u32> = rotation(&b.lines())
            .into_keys()
            .filter(|&p| pid_alive(p))
            .collect();
        if live.len() < 2 {
            skipped += 1;
            continue;
        }
        let pid = live[rng.below(live.len())];
        let sent = Instant::now();
        send_signal(pid, libc::SIGKILL);
        let gone = wait_dead(pid, Duration::from_secs(2));
        kills.push(Kill { pid, sent, gone });
    }
    let report = load.finish();

    let in_flight = |a: &Attempt| {
        a.sent
            && matches!(a.outcome, Outcome::Reset | Outcome::Empty | Outcome::Short)
            && kills.iter().any(|k| a.overlaps(k.sent, k.gone))
    };
    let inflight = Kinds::of(report.failures().filter(|a| in_flight(a)));
    let failed_new = Kinds::of(report.failures().filter(|a| !in_flight(a)));

    // Every slot refilled: one respawn per kill, all four back in rotation, nothing unreaped.
    let spawned_wanted = WORKERS + kills.len();
    let ok = wait_until(READY, || {
        let lines = b.lines();
        let live = rotation(&lines)
            .into_iter()
            .filter(|&(p, _)| pid_alive(p))
            .map(|(_, slot)| slot)
            .collect::<BTreeSet<_>>();
        live.len() == WORKERS && events(&lines, "worker spawned").count() == spawned_wanted
    });
    assert!(
        ok,
        "slots not refilled after {} kills; log:\n{}",
        kills.len(),
        b.dump()
    );
    assert!(
        wait_until(Duration::from_secs(5), || zombies(master).is_empty()),
        "unreaped workers: {:?}",
        zombies(master)
    );
    assert!(
        kills
            .iter()
            .all(|k| proc_stat(k.pid).is_none_or(|s| s.ppid != master)),
        "a killed worker is still the master's child"
    );
    let m = metrics(admin);

    summary(
        "kill9",
        &[
            ("workers", WORKERS.to_string()),
            ("threads", THREADS.to_string()),
            ("kills", kills.len().to_string()),
            ("skipped_kills", skipped.to_string()),
            ("connections", report.len().to_string()),
            ("failed_new", failed_new.total().to_string()),
            ("failed_new_kinds", failed_new.to_string()),
            ("inflight_failed", inflight.total().to_string()),
            ("inflight_kinds", inflight.to_string()),
            (
                "master_connect_failed",
                metric(&m, "balancer_connections_connect_failed_total").to_string(),
            ),
            (
                "master_no_backend",
                metric(&m, "balancer_connections_no_backend_total").to_string(),
            ),
            (
                "master_reset",
                metric(&m, "balancer_connections_reset_total").to_string(),
            ),
            ("seed", seed.to_string()),
        ],
    );
    assert!(kills.len() >= 15, "only {} kills in {FOR:?}", kills.len());
    assert!(report.len() > 1000, "only {} connections", report.len());
    assert_eq!(
        failed_new.total(),
        0,
        "new connections failed ({failed_new}); kills {kills:?}\nlog:\n{}",
        b.dump()
    );
    assert_eq!(
        metric(&m, "balancer_connections_connect_failed_total")
            + metric(&m, "balancer_connections_no_backend_total"),
        0,
        "the master closed clients without a worker: {m:?}"
    );
    assert_no_panic(&b);
}

/// The promise with several workers broken at once: five workers, three of which (slots 0,
/// 1 and 2, next to each other in the rotation) stop listening but stay alive, as a worker
/// whose server broke does (or three killed in the same instant look, until their exits are
/// noticed). Two healthy workers remain, so no new connection may fail: a refused connect
/// costs microseconds on loopback, and the proxy can offer the client to every worker.
///
/// Product bug: the proxy offers a client to at most 3 workers (`proxy/src/forward.rs`,
/// `ForwardConfig::default`: `max_tries: 3`, and `src/main.rs` keeps the default), so a
/// client whose turn starts at slot 0 is tried on 0, 1, 2 and closed: one new connection in
/// three fails until health checks take the three out of rotation (`--health-fall` × 1 s
/// with the defaults). Fix: try every backend of the set once (`pick_excluding` already
/// bounds a pass), or bound the retries by time rather than by count.
#[test]
#[ignore = "product bug: the proxy tries at most 3 workers per client (proxy/src/forward.rs max_tries: 3); with 3 refusing workers in a row and 2 healthy ones, 1 new connection in 3 fails"]
fn three_refusing_workers_fail_no_new_connection_while_two_are_healthy() {
    const WORKERS: usize = 5;
    let script = python::abuser(python::STOPS_LISTENING);
    let b = Balancer::start(&["--cpus", "5", "--", python::python(), "-c", &script]);
    let addr = b.addr();
    wait_in_rotation(&b, WORKERS, READY);
    let lines = b.lines();
    let addrs: BTreeMap<u32, SocketAddr> = events(&lines, "worker ready")
        .filter_map(|l| Some((field_u32(l, "slot")?, field(l, "addr")?.parse().ok()?)))
        .collect();
    for slot in 0..3 {
        let own = addrs[&slot];
        assert_eq!(get_ok(own, "/abuse").split(' ').next(), Some("abuse"));
        assert!(
            wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(own)
                .is_err()),
            "slot {slot} still accepts on {own}"
        );
    }
    let report = sequential(addr, 21, Duration::from_secs(2));
    let failed = report.failed_kinds();
    summary(
        "three_refusing",
        &[
            ("workers", WORKERS.to_string()),
            ("refusing", "3".to_string()),
            ("connections", report.len().to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
        ],
    );
    assert_eq!(
        failed.total(),
        0,
        "new connections failed with two healthy workers ({failed})\n{}",
        b.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. SIGSTOP of one worker.

/// A worker that stops answering (SIGSTOP: its sockets stay open, connects to it still
/// complete in its accept queue) leaves rotation within `fall × interval` plus slack, and is
/// replaced after as many more failed checks (SIGTERM and SIGCONT, then SIGKILL).
///
/// Only connections open while it was stopped and still in rotation may fail (or time out):
/// those the proxy handed to it. Everything that started after it left rotation, or ended
/// before it was stopped, must succeed.
#[test]
fn sigstopped_worker_leaves_rotation_within_fall_times_interval() {
    const WORKERS: usize = 3;
    const THREADS: usize = 4;
    const INTERVAL: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_millis(200);
    const FALL: u32 = 3;
    /// Scheduling and log-reading delay on a busy 2-core machine.
    const SLACK: Duration = Duration::from_millis(1500);
    /// How long the load goes on after the replacement is in rotation.
    const AFTER: Duration = Duration::from_secs(1);

    let b = Balancer::start(&[
        "--cpus",
        "3",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "200ms",
        "--health-fall",
        "3",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_in_rotation(&b, WORKERS, READY);

    let load = Load::start(
        addr,
        Spec {
            threads: THREADS,
            pace: Duration::from_millis(5),
            timeout: Duration::from_secs(3),
            ..Spec::default()
        },
    );
    // Let the load reach every worker before one of them stops.
    let warm = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || {
        metric(&metrics(admin), "balancer_connections_completed_total") >= 100
    }));
    let warm = warm.elapsed();
    let (victim, slot) = rotation(&b.lines())
        .into_iter()
        .find(|&(p, _)| pid_alive(p))
        .expect("a worker in rotation");
    let from = b.lines().len();
    let of_victim = |l: &str| field_u32(l, "pid") == Some(victim);

    let stopped = Instant::now();
    send_signal(victim, libc::SIGSTOP);
    b.expect_line(from, "`worker down` for the stopped worker", READY, |l| {
        is_event(l, "worker down: health checks failing") && of_victim(l)
    });
    b.expect_line(from, "its `worker out of rotation`", READY, |l| {
        is_event(l, "worker out of rotation") && of_victim(l)
    });
    let out = Instant::now();
    let (_, unresponsive) = b.expect_line(from, "`worker unresponsive`", READY, |l| {
        is_event(l, "worker unresponsive; replacing it") && of_victim(l)
    });
    let (exit_at, exited) = b.expect_line(from, "the stopped worker's exit", READY, |l| {
        is_event(l, "worker exited") && of_victim(l)
    });
    let (_, spawned) = b.expect_line(exit_at, "a replacement in its slot", READY, |l| {
        is_event(l, "worker spawned") && field_u32(l, "slot") == Some(slot)
    });
    let replacement = field_u32(&spawned, "pid").expect("pid");
    b.expect_line(exit_at, "the replacement's `worker ready`", READY, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid") == Some(replacement)
    });
    let replaced = Instant::now();
    // Pacing: the load goes on for a while with the replacement in rotation.
    thread::sleep(AFTER);
    let report = load.finish();
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(victim)),
        "the stopped worker {victim} is still alive"
    );

    let handed_to_victim = |a: &Attempt| a.overlaps(stopped, out);
    let allowed = Kinds::of(report.failures().filter(|a| handed_to_victim(a)));
    let failed_new = Kinds::of(report.failures().filter(|a| !handed_to_victim(a)));
    let out_after = out - stopped;
    let bound = INTERVAL * FALL + TIMEOUT + SLACK;
    summary(
        "sigstop",
        &[
            ("workers", WORKERS.to_string()),
            ("threads", THREADS.to_string()),
            ("connections", report.len().to_string()),
            ("failed_new", failed_new.total().to_string()),
            ("failed_new_kinds", failed_new.to_string()),
            ("inflight_failed", allowed.total().to_string()),
            ("inflight_kinds", allowed.to_string()),
            (
                "out_of_rotation_after_ms",
                out_after.as_millis().to_string(),
            ),
            (
                "replaced_after_ms",
                (replaced - stopped).as_millis().to_string(),
            ),
            ("exit", format!("{:?}", exit_status(&exited))),
            ("warmup_ms", warm.as_millis().to_string()),
        ],
    );
    assert!(
        out_after <= bound,
        "out of rotation {out_after:?} after SIGSTOP, more than {bound:?}\n{unresponsive}"
    );
    assert_eq!(
        failed_new.total(),
        0,
        "connections not handed to the stopped worker failed ({failed_new})\nlog:\n{}",
        b.dump()
    );
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// 3. Rolling reloads under load.

/// What [`reloads_under_load`] saw.
struct ReloadRun {
    report: load::Report,
    sampled: Sampled,
    /// The workers before the first reload, and after the last one settled.
    before: BTreeSet<u32>,
    after: BTreeSet<u32>,
    /// Wall time of all reloads, and of the slowest one.
    reloading: Duration,
    slowest: Duration,
}

/// Three built-in workers under continuous load (four clients); five rolling reloads, each
/// SIGHUP sent as soon as the previous reload logged `rolling reload done`; the load goes
/// on until only three children remain. A sampler on its own thread counts the master's
/// live children every millisecond meanwhile.
fn reloads_under_load(b: &Balancer) -> ReloadRun {
    let addr = b.addr();
    wait_in_rotation(b, RELOAD_WORKERS, READY);
    let master = b.pid();
    let live_children = || -> BTreeSet<u32> {
        children(master)
            .into_iter()
            .filter(|&(_, s)| s != 'Z')
            .map(|(p, _)| p)
            .collect()
    };
    let before = live_children();
    assert_eq!(
        before.len(),
        RELOAD_WORKERS,
        "children at the start: {before:?}"
    );

    let stop_sampling = AtomicBool::new(false);
    thread::scope(|s| {
        let sampler =
            s.spawn(|| sample_children(master, || b.worker_pids(), &stop_sampling, EXIT * 4));
        let _stop = StopOnDrop(&stop_sampling);
        let load = Load::start(
            addr,
            Spec {
                threads: RELOAD_THREADS,
                pace: Duration::from_millis(3),
                ..Spec::default()
            },
        );
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for n in 1..=RELOADS {
            let from = b.lines().len();
            let t = Instant::now();
            send_signal(master, libc::SIGHUP);
            b.expect_line(from, &format!("`rolling reload done` #{n}"), READY, |l| {
                is_event(l, "rolling reload done")
            });
            slowest = slowest.max(t.elapsed());
        }
        let reloading = started.elapsed();
        // The last retired workers drain and stop; the load goes on until they are gone.
        let settled = wait_until(EXIT, || live_children().len() == RELOAD_WORKERS);
        let report = load.finish();
        stop_sampling.store(true, Ordering::Relaxed);
        let sampled = sampler.join().expect("the sampler thread panicked");
        assert!(
            settled,
            "children after the reloads: {:?}\nlog:\n{}",
            children(master),
            b.dump()
        );
        ReloadRun {
            report,
            sampled,
            before,
            after: live_children(),
            reloading,
            slowest,
        }
    })
}

const RELOAD_WORKERS: usize = 3;
const RELOAD_THREADS: usize = 4;
const RELOADS: usize = 5;

/// Five rolling reloads back to back under load: no request fails, one new worker per slot
/// per reload, every worker new at the end. (How many run at once is the next test's.)
#[test]
fn five_rolling_reloads_under_load_fail_no_request() {
    let b = Balancer::start(&["--cpus", "3"]);
    let run = reloads_under_load(&b);
    let failed = run.report.failed_kinds();
    summary(
        "reload",
        &[
            ("workers", RELOAD_WORKERS.to_string()),
            ("threads", RELOAD_THREADS.to_string()),
            ("reloads", RELOADS.to_string()),
            ("connections", run.report.len().to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
            ("max_children", run.sampled.max_alive.to_string()),
            ("samples", run.sampled.samples.to_string()),
            ("reloading_ms", run.reloading.as_millis().to_string()),
            ("slowest_reload_ms", run.slowest.as_millis().to_string()),
        ],
    );
    assert_eq!(
        failed.total(),
        0,
        "{failed} of {} requests failed\nlog:\n{}",
        run.report.len(),
        b.dump()
    );
    assert!(
        run.after.is_disjoint(&run.before),
        "old {:?}, now {:?}",
        run.before,
        run.after
    );
    assert_eq!(
        events(&b.lines(), "worker spawned").count(),
        RELOAD_WORKERS * (RELOADS + 1),
        "one new worker per slot per reload\n{}",
        b.dump()
    );
    assert_no_panic(&b);
}

/// The same five reloads: never more than 2×N workers alive at once (the bound), and
/// never more than N+1 (what `docs/LIFECYCLE.md` promises: "At most N+1 workers run at
/// once").
///
/// Product bug: a reload moves on to the next slot as soon as the old worker was *retired*,
/// not once it has exited (`src/supervisor.rs`, `run_slot`: `reply.send(Ok(()))` right after
/// `old.retire()`), so the retired workers of several slots, and of the previous reload,
/// drain and stop while new ones start: 5 to 7 children for N = 3 are seen on every run.
#[test]
#[ignore = "product bug: a rolling reload moves to the next slot before the retired worker has exited (src/supervisor.rs run_slot replies Ok right after old.retire()); 5-7 workers alive at once for N=3, LIFECYCLE.md promises N+1"]
fn rolling_reloads_never_run_more_than_n_plus_one_workers() {
    let b = Balancer::start(&["--cpus", "3"]);
    let run = reloads_under_load(&b);
    let seen = &run.sampled;
    summary(
        "reload_bound",
        &[
            ("workers", RELOAD_WORKERS.to_string()),
            ("reloads", RELOADS.to_string()),
            ("max_children", seen.max_alive.to_string()),
            ("samples", seen.samples.to_string()),
        ],
    );
    let explain = |bound: &str| {
        format!(
            "{} children at once ({:?}), more than {bound}; log:\n{}",
            seen.max_alive,
            seen.max_pids,
            b.dump()
        )
    };
    assert!(seen.max_alive <= 2 * RELOAD_WORKERS, "{}", explain("2×N"));
    assert!(seen.max_alive <= RELOAD_WORKERS + 1, "{}", explain("N+1"));
}

// ---------------------------------------------------------------------------------------------
// 4. A worker command that exits at once.

/// A worker that exits at once (`sh -c 'exit 3'`), in two slots, for about 7 s (until each
/// slot has failed 7 times: 0.1 + 0.2 + … + 3.2 s of backoff): the respawns back off (the
/// gaps between a slot's spawns, read from the log timestamps, grow about twofold each
/// time), the master uses little CPU, and its descriptors and children do not pile up.
#[test]
fn crashing_worker_backs_off_without_spinning_or_leaking() {
    const SLOTS: usize = 2;
    const FAILURES: u32 = 7;
    /// The master's share of one core over the window; a spinning respawn loop takes 100 %.
    const CPU_BOUND: f64 = 0.10;

    let mut b = Balancer::start(&["--cpus", "2", "--", "sh", "-c", "exit 3"]);
    b.addr();
    let master = b.pid();
    let cpu = CpuWatch::start(master);
    let started = Instant::now();
    let backoff_line = |l: &str, n: u32| {
        is_event(
            l,
            "worker failed before becoming ready; respawning after backoff",
        ) && field_u32(l, "failures") == Some(n)
    };
    for slot in 0..SLOTS as u32 {
        b.expect_line(0, "the first backoff", READY, |l| {
            backoff_line(l, 1) && field_u32(l, "slot") == Some(slot)
        });
    }
    // No worker runs most of the time: the fewest descriptors over a moment is the count
    // with none alive.
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    let stop_sampling = AtomicBool::new(false);
    let sampled = thread::scope(|s| {
        let sampler =
            s.spawn(|| sample_children(master, || b.worker_pids(), &stop_sampling, READY));
        let _stop = StopOnDrop(&stop_sampling);
        for slot in 0..SLOTS as u32 {
            b.expect_line(0, &format!("backoff failures={FAILURES}"), READY, |l| {
                backoff_line(l, FAILURES) && field_u32(l, "slot") == Some(slot)
            });
        }
        stop_sampling.store(true, Ordering::Relaxed);
        sampler.join().expect("the sampler thread panicked")
    });
    let window = started.elapsed();
    let (cpu_used, cpu_share) = cpu.read();
    // Every slot now waits 6.4 s or more: nothing runs.
    let fds_after = steady_fd_count(master, Duration::from_millis(300));
    assert!(
        wait_until(Duration::from_secs(5), || zombies(master).is_empty()),
        "unreaped workers: {:?}",
        zombies(master)
    );
    let children_after = children(master).len();

    // Gaps between the spawns of each slot, from the log's own timestamps.
    let lines = b.lines();
    let mut gaps_by_slot = Vec::new();
    for slot in 0..SLOTS as u32 {
        let times: Vec<f64> = events(&lines, "worker spawned")
            .filter(|l| field_u32(l, "slot") == Some(slot))
            .filter_map(|l| log_time(l))
            .take(FAILURES as usize)
            .collect();
        let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps_by_slot.push(gaps);
    }
    let shown: Vec<String> = gaps_by_slot
        .iter()
        .map(|g| {
            g.iter()
                .map(|s| format!("{:.0}", s * 1000.0))
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    summary(
        "crash_loop",
        &[
            ("slots", SLOTS.to_string()),
            (
                "spawns",
                events(&lines, "worker spawned").count().to_string(),
            ),
            ("window_ms", window.as_millis().to_string()),
            ("spawn_gaps_ms", shown.join(";")),
            ("master_cpu_ms", cpu_used.as_millis().to_string()),
            ("master_cpu_pct", format!("{:.1}", cpu_share * 100.0)),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("max_children", sampled.max_alive.to_string()),
            ("children_after", children_after.to_string()),
        ],
    );
    for gaps in &gaps_by_slot {
        assert_eq!(gaps.len(), FAILURES as usize - 1, "{gaps:?}");
        assert!(gaps[0] >= 0.1, "first respawn after {:.3} s", gaps[0]);
        // Each delay is 2× the last with up to 25 % jitter: at least 1.6× apart, less the
        // few milliseconds a spawn and an exit take.
        assert!(
            gaps.windows(2).all(|w| w[1] >= w[0] * 1.4),
            "gaps must grow about twofold: {gaps:?}"
        );
    }
    assert!(
        cpu_share < CPU_BOUND,
        "the master used {cpu_used:?} of CPU in {window:?}"
    );
    assert!(
        fds_after <= fds_before + 1,
        "descriptors {fds_before} -> {fds_after}: {}",
        fd_list(master)
    );
    assert!(sampled.max_alive <= SLOTS, "{sampled:?}");
    assert!(children_after <= SLOTS, "{:?}", children(master));
    assert!(b.is_running(), "the master died:\n{}", b.dump());
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// 5. Many worker deaths in a row.

/// Four slots of a python worker that serves exactly one request and exits ([`python::ONE_SHOT`]);
/// one client sends requests back to back for up to 10 s or 500 requests: each answered
/// request is one worker death and one respawn. Afterwards the master holds no more
/// descriptors than it did with its first four workers, and has no unreaped child.
///
/// Client failures are reported, not asserted: with one-request workers the four slots are
/// often all dead or starting at once (a python start takes ~80 ms), and then there is no
/// healthy worker and the promise does not apply. The master's own counters say which:
/// `no_backend` (none in rotation) or `connect_failed` (every worker offered refused).
/// Mid-stream failures (`reset`) must not happen: a one-shot worker stops listening before
/// it answers, so no connection waits in the queue of a worker that is exiting.
#[test]
fn hundreds_of_worker_deaths_leak_no_fd_and_no_zombie() {
    const WORKERS: usize = 4;
    const MAX_DEATHS: usize = 500;
    const FOR: Duration = Duration::from_secs(10);

    let b = Balancer::start(&[
        "--cpus",
        "4",
        "--admin",
        "127.0.0.1:0",
        "--",
        python::python(),
        "-S",
        "-c",
        python::ONE_SHOT,
    ]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_in_rotation(&b, WORKERS, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    // One client, requests back to back; after a failure (no worker in rotation) it pauses
    // a moment so that the 500 are spent on deaths, not on failures.
    let deadline = Instant::now() + FOR;
    let mut report = load::Report::default();
    let mut served = 0;
    while served < MAX_DEATHS && Instant::now() < deadline {
        let attempt = load::request(addr, load::REQUEST, Duration::from_secs(5));
        report.attempts.push(attempt);
        if attempt.outcome == Outcome::Ok {
            served += 1;
        } else {
            thread::sleep(Duration::from_millis(5));
        }
    }

    wait_in_rotation(&b, WORKERS, READY);
    let ok = wait_until(Duration::from_secs(5), || zombies(master).is_empty());
    assert!(ok, "zombies: {:?}", zombies(master));
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(5),
        "after the deaths",
    );
    let lines = b.lines();
    let deaths = events(&lines, "worker exited").count();
    let m = metrics(admin);
    let failed = report.failed_kinds();
    summary(
        "one_shot_deaths",
        &[
            ("workers", WORKERS.to_string()),
            ("threads", "1".to_string()),
            ("connections", report.len().to_string()),
            ("served", served.to_string()),
            ("worker_deaths", deaths.to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
            (
                "master_no_backend",
                metric(&m, "balancer_connections_no_backend_total").to_string(),
            ),
            (
                "master_connect_failed",
                metric(&m, "balancer_connections_connect_failed_total").to_string(),
            ),
            (
                "master_reset",
                metric(&m, "balancer_connections_reset_total").to_string(),
            ),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("zombies", zombies(master).len().to_string()),
        ],
    );
    assert!(deaths >= 100, "only {deaths} deaths:\n{}", b.dump());
    assert!(deaths >= served, "{deaths} deaths, {served} answers");
    assert_eq!(
        metric(&m, "balancer_connections_reset_total"),
        0,
        "mid-stream failures: {m:?}"
    );
    assert!(b.lines().iter().all(|l| !looks_like_panic(l)));
}

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

/// Sends `n` requests one after the other; returns them.
fn sequential(addr: SocketAddr, n: usize, timeout: Duration) -> load::Report {
    load::Report {
        attempts: (0..n)
            .map(|_| load::request(addr, load::REQUEST, timeout))
            .collect(),
    }
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
#[ignore = "product bug: the master's own EMFILE on the upstream connect is treated as the worker refusing (proxy/src/forward.rs record_connect(false), client closed): ~90 of 200 clients reset with both workers healthy, and healthy workers sometimes taken out of rotation"]
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
/// Product bugs: (1) with a limit below 256 + 2 the derived cap is 1 (`src/main.rs`,
/// `max_conns`: `(limit - FD_RESERVE) / 2` clamped to at least 1, `FD_RESERVE` = 256),
/// without a warning; (2) with a cap smaller than the number of proxy threads, a connection
/// can wait forever: every proxy thread has its own `SO_REUSEPORT` listener but they share
/// one semaphore, and a thread takes a permit *before* `accept()` (`proxy/src/server.rs`,
/// `serve`), so the thread holding the only permit sits idle on an empty listener while
/// clients queue on the other one (sequential requests with `--max-conns 1` hang about
/// half the time).
#[test]
#[ignore = "product bug: under RLIMIT_NOFILE 64 the derived --max-conns is 1 (src/main.rs max_conns, FD_RESERVE 256), and a permit taken before accept() on one of several SO_REUSEPORT listeners starves the others (proxy/src/server.rs serve); clients hang"]
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
#[ignore = "product bug: with --max-conns below the number of proxy threads a permit held by an idle accept loop starves the other SO_REUSEPORT listeners (proxy/src/server.rs serve takes the permit before accept)"]
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

// ---------------------------------------------------------------------------------------------
// 8. IPC abuse, each case from a real misbehaving worker process.

/// A master (`-v`: ignored messages are logged at debug level) with one python worker
/// running the misbehaving `case` of [`python`], with `args` after the script.
fn start_abuser(case: &str, args: &[&str]) -> Balancer {
    let script = python::abuser(case);
    let mut all = vec!["-v", "--cpus", "1", "--", python::python(), "-c", &script];
    all.extend_from_slice(args);
    Balancer::start(&all)
}

/// The pid of the abuse worker answering a `GET path` through the master.
fn abuse_pid(addr: SocketAddr, path: &str) -> u32 {
    let body = get_ok(addr, path);
    body.trim_end()
        .strip_prefix("abuse worker pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an abuse worker body: {body:?}"))
}

/// Asks the worker to misbehave now (`GET /abuse`); returns its pid.
fn trigger_abuse(addr: SocketAddr) -> u32 {
    abuse_pid(addr, "/abuse")
}

/// Waits until the worker says its `abuse()` has returned (it has written everything).
fn wait_abused(addr: SocketAddr, timeout: Duration) {
    assert!(
        wait_until(timeout, || get_ok(addr, "/abused") == "yes\n"),
        "the worker did not finish misbehaving within {timeout:?}"
    );
}

/// Waits for the debug line of the `abuse-done` marker the worker sends last.
fn expect_abuse_done(b: &Balancer, pid: u32, timeout: Duration) -> usize {
    b.expect_line(0, "the `abuse-done` marker", timeout, |l| {
        is_event(l, "unknown ipc message ignored")
            && field_u32(l, "pid") == Some(pid)
            && l.contains("abuse-done")
    })
    .0
}

/// The strike warnings (`ipc: ...; ignored`) for worker `pid`.
fn strikes_of(lines: &[String], pid: u32) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| is_event(l, "ipc:") && field_u32(l, "pid") == Some(pid))
        .collect()
}

/// The debug lines for messages of worker `pid` that were ignored without a strike.
fn ignored_of(lines: &[String], pid: u32) -> usize {
    lines
        .iter()
        .filter(|l| {
            (is_event(l, "unknown ipc message ignored") || is_event(l, "duplicate ready ignored"))
                && field_u32(l, "pid") == Some(pid)
        })
        .count()
}

/// Malformed lines (not JSON, not UTF-8, wrong fields, over 64 KiB, one of 1 MiB) each cost
/// one strike and one warning; valid lines the master has no use for (unknown types,
/// non-objects, a line of exactly 64 KiB) are ignored at debug level. The worker stays in
/// rotation (8 strikes < 20) and the master's descriptors do not grow.
#[test]
fn ipc_malformed_unknown_and_overlong_lines_are_logged_and_ignored() {
    let b = start_abuser(python::MALFORMED, &[]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let pid = trigger_abuse(addr);
    expect_abuse_done(&b, pid, READY);
    let lines = b.lines();
    let strikes = strikes_of(&lines, pid);
    let ignored = ignored_of(&lines, pid);
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(5),
        "after the lines",
    );
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_malformed",
        &[
            ("bad_lines", "8".to_string()),
            ("strike_warnings", strikes.len().to_string()),
            ("ignored_lines_logged", ignored.to_string()),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("worker_kept", (answers == pid).to_string()),
        ],
    );
    let count = |what: &str| strikes.iter().filter(|l| l.contains(what)).count();
    assert_eq!(strikes.len(), 8, "{strikes:#?}");
    assert_eq!(
        strikes.last().and_then(|l| field_u32(l, "strikes")),
        Some(8),
        "{strikes:#?}"
    );
    assert_eq!(count("longer than"), 2, "{strikes:#?}");
    assert_eq!(count("not valid UTF-8"), 1, "{strikes:#?}");
    assert!(
        strikes
            .iter()
            .all(|l| event(l).is_some_and(|(level, _)| level == "WARN")),
        "{strikes:#?}"
    );
    // [1,2], {"type":5}, {}, "hello", bogus, exactly-64k, abuse-done.
    assert_eq!(ignored, 7, "{}", b.dump());
    assert_eq!(answers, pid, "the worker was replaced:\n{}", b.dump());
    assert_no_panic(&b);
}

/// 100 000 lines in one write: the master reads through them (one strike per second over
/// 1000 messages, with a warning), keeps serving clients meanwhile, and does not replace
/// the worker for it.
#[test]
fn ipc_flood_of_100k_lines_is_survived() {
    let b = start_abuser(python::FLOOD, &[]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let load = Load::start(
        addr,
        Spec {
            threads: 2,
            pace: Duration::from_millis(5),
            ..Spec::default()
        },
    );
    let cpu = CpuWatch::start(master);
    let started = Instant::now();
    let pid = trigger_abuse(addr);
    expect_abuse_done(&b, pid, READY);
    let took = started.elapsed();
    let (cpu_used, _) = cpu.read();
    let report = load.finish();
    let failed = report.failed_kinds();
    let lines = b.lines();
    let flood_warnings: Vec<&String> =
        events(&lines, "ipc: more than 1000 messages in a second").collect();
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(5),
        "after the flood",
    );
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_flood",
        &[
            ("lines", "100000".to_string()),
            ("read_in_ms", took.as_millis().to_string()),
            ("master_cpu_ms", cpu_used.as_millis().to_string()),
            ("flood_warnings", flood_warnings.len().to_string()),
            ("connections", report.len().to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("worker_kept", (answers == pid).to_string()),
        ],
    );
    assert!(
        !flood_warnings.is_empty(),
        "no flood warning:\n{}",
        b.dump()
    );
    assert_eq!(
        failed.total(),
        0,
        "clients failed during the flood: {failed}"
    );
    assert_eq!(answers, pid, "the worker was replaced:\n{}", b.dump());
    assert_no_panic(&b);
}

/// `ready` for a port that is listening but held by another process (the test) is not
/// admitted, and the master never even connects to it; `ready` for the master's own port
/// and for port 0 are strikes; the real port is admitted; `ready` again once admitted (same
/// port, or the foreign one) is ignored, and traffic keeps going to the real port.
#[test]
fn ipc_ready_for_a_port_the_worker_does_not_own_is_refused() {
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a foreign port");
    foreign.set_nonblocking(true).expect("non-blocking");
    let foreign_port = foreign.local_addr().expect("local addr").port();
    let dir = TempDir::new("ready-abuse");
    let go = dir.path().join("go");
    let go_arg = go.to_str().expect("UTF-8 temp path").to_owned();
    let b = start_abuser(python::READY_ABUSE, &[&foreign_port.to_string(), &go_arg]);
    let addr = b.addr();
    let (_, spawned) = b.expect_line(0, "`worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let pid = field_u32(&spawned, "pid").expect("pid");
    let of_worker = |l: &str| field_u32(l, "pid") == Some(pid);

    let (_, refused) = b.expect_line(0, "the foreign port refused", READY, |l| {
        is_event(l, "ipc:")
            && of_worker(l)
            && l.contains("announced port not admitted")
            && l.contains(&format!(
                "port {foreign_port} is not a listening socket of this worker"
            ))
    });
    let tmp = dir.path().join("go.tmp");
    std::fs::write(&tmp, addr.port().to_string()).expect("writing the go file");
    std::fs::rename(&tmp, &go).expect("renaming the go file");
    b.expect_line(0, "the master's own port refused", READY, |l| {
        is_event(l, "ipc:") && of_worker(l) && l.contains("the master's own listening port")
    });
    b.expect_line(0, "port 0 refused", READY, |l| {
        is_event(l, "ipc:") && of_worker(l) && l.contains("port 0")
    });
    let (_, ready) = b.expect_line(0, "`worker ready`", READY, |l| {
        is_event(l, "worker ready") && of_worker(l)
    });
    let admitted_port = field(&ready, "addr")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port());

    assert_eq!(trigger_abuse(addr), pid);
    expect_abuse_done(&b, pid, READY);
    let lines = b.lines();
    let duplicates = lines
        .iter()
        .filter(|l| is_event(l, "duplicate ready ignored") && of_worker(l))
        .count();
    let answers: Vec<u32> = (0..5).map(|_| abuse_pid(addr, "/")).collect();
    let foreign_touched = foreign.accept().is_ok();
    let strikes = strikes_of(&lines, pid).len();
    summary(
        "ipc_ready",
        &[
            ("foreign_port_refused", "warned".to_string()),
            ("strikes", strikes.to_string()),
            ("duplicates_ignored", duplicates.to_string()),
            ("foreign_port_connected", foreign_touched.to_string()),
        ],
    );
    assert!(
        event(&refused).is_some_and(|(level, _)| level == "WARN"),
        "{refused}"
    );
    assert_ne!(admitted_port, Some(foreign_port), "{ready}");
    assert_eq!(strikes, 3, "{}", b.dump());
    assert_eq!(duplicates, 2, "{}", b.dump());
    assert!(answers.iter().all(|&p| p == pid), "{answers:?}");
    assert!(
        !foreign_touched,
        "the master connected to a port the worker does not own"
    );
    assert_eq!(events(&lines, "worker spawned").count(), 1, "{}", b.dump());
    assert_no_panic(&b);
}

/// A worker forks a child that inherits the IPC channel, then exits; the child writes a
/// `ready` and a malformed line on the channel after the worker is gone. The master must
/// not act on them (it closed its end when the worker was reaped: the child's write fails,
/// or at worst lands nowhere), its descriptors are back to the count before while the child
/// still holds the channel, and the slot's replacement serves.
#[test]
fn ipc_message_after_the_worker_died_is_not_acted_on() {
    /// How long the orphan holds the channel after writing.
    const HOLD: &str = "3";
    let dir = TempDir::new("after-death");
    let outcome_file = dir.path().join("outcome");
    let outcome_arg = outcome_file.to_str().expect("UTF-8 temp path").to_owned();
    let b = start_abuser(python::AFTER_DEATH, &[&outcome_arg, HOLD]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let pid = trigger_abuse(addr);
    let (exit_at, exited) = b.expect_line(0, "the worker's exit", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(pid)
    });
    let (_, respawned) = b.expect_line(exit_at, "the replacement", READY, |l| {
        is_event(l, "worker ready")
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    let mut outcome = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            outcome = std::fs::read_to_string(&outcome_file).unwrap_or_default();
            !outcome.is_empty()
        }),
        "the orphan never wrote"
    );
    // The orphan still holds its end of the old channel (for HOLD seconds).
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(2),
        "with the orphan alive",
    );
    let lines = b.lines();
    let acted_on: Vec<&String> = lines[exit_at + 1..]
        .iter()
        .filter(|l| event(l).is_some() && field_u32(l, "pid") == Some(pid))
        .collect();
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_after_death",
        &[
            ("orphan_write", format!("{outcome:?}")),
            ("lines_about_dead_worker", acted_on.len().to_string()),
            ("fds", format!("{fds_before}->{fds_after}")),
        ],
    );
    assert!(exited.contains("status=exit code 0"), "{exited}");
    assert!(
        acted_on.is_empty(),
        "the master acted on a dead worker's channel: {acted_on:#?}"
    );
    assert_eq!(answers, replacement);
    assert_no_panic(&b);
}

/// 200 `pong` lines each carrying 4 descriptors, descriptors in the middle of a line, and a
/// `ready` carrying a listening socket: the master keeps none of them (its descriptor count
/// does not grow), and the worker keeps serving.
#[test]
fn ipc_uninvited_descriptors_do_not_leak_into_the_master() {
    let b = start_abuser(python::UNINVITED_FDS, &[]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));
    let pid = trigger_abuse(addr);
    wait_abused(addr, READY);
    let fds_after = fd_count(master);
    let settled = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(2),
        "after the descriptors",
    );
    let logged = b
        .lines()
        .iter()
        .filter(|l| event(l).is_some() && (l.contains("descriptor") || l.contains(" fds")))
        .count();
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_uninvited_fds",
        &[
            ("messages_with_fds", "202".to_string()),
            ("fds_sent", "806".to_string()),
            ("fds", format!("{fds_before}->{fds_after}->{settled}")),
            ("log_lines_about_fds", logged.to_string()),
        ],
    );
    assert_eq!(answers, pid);
    assert_no_panic(&b);
}

/// After the descriptors, the worker's later lines (a duplicate `ready`, the `abuse-done`
/// marker) must still be read, within a few seconds; and the protocol says descriptors a
/// message does not expect "are closed and logged" (`docs/PROTOCOL.md`, "Descriptors on the
/// channel").
///
/// Product bug: the master reads each worker's channel with a plain `read()` through tokio
/// (`src/instance.rs`: `FramedRead` over the `UnixStream` read half). Linux ends a read at
/// the end of a segment that carried descriptors, so the read comes back short; tokio takes
/// a short read to mean the socket is drained and clears its readiness, and since the data
/// is already queued no new edge comes: the rest of the channel (here 4 KiB: 200 lines, the
/// duplicate `ready`, the marker) sits unread until the worker writes again, and then only
/// one more segment is read. A worker can wedge its own channel this way (pongs, `ready`
/// and all later messages stall). And since the kernel drops the descriptors unseen
/// (`MSG_CTRUNC`), nothing is logged. Fix: read the channel through
/// `worker::fdpass::FdReader` (recvmsg with a control buffer: close and log the
/// descriptors, and keep reading until `EWOULDBLOCK`), or at least keep reading after a
/// short read until the socket says `WouldBlock`.
#[test]
#[ignore = "product bug: after a worker sends descriptors on its channel the master stops reading it (src/instance.rs: tokio clears readiness on the short read that ends at the SCM_RIGHTS segment; ~4 KiB stays queued unread), and the descriptors are dropped unlogged"]
fn ipc_uninvited_descriptors_are_logged_and_later_lines_still_read() {
    let b = start_abuser(python::UNINVITED_FDS, &[]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let pid = trigger_abuse(addr);
    wait_abused(addr, READY);
    let marker = b.wait_for_line(Duration::from_secs(5), |l| {
        is_event(l, "unknown ipc message ignored")
            && field_u32(l, "pid") == Some(pid)
            && l.contains("abuse-done")
    });
    let logged: Vec<String> = b
        .lines()
        .into_iter()
        .filter(|l| {
            event(l).is_some()
                && field_u32(l, "pid") == Some(pid)
                && (l.contains("descriptor") || l.contains(" fds"))
        })
        .collect();
    summary(
        "ipc_uninvited_fds_read",
        &[
            ("later_lines_read", marker.is_some().to_string()),
            ("log_lines_about_fds", logged.len().to_string()),
        ],
    );
    assert!(
        marker.is_some(),
        "the lines after the descriptors were never read:\n{}",
        b.dump()
    );
    assert!(
        !logged.is_empty(),
        "no log line about the descriptors:\n{}",
        b.dump()
    );
}

/// A worker that sends 25 malformed lines is replaced at the 20th strike: out of rotation,
/// stopped, a new worker in its slot; the master's descriptors are back to the count before.
#[test]
fn ipc_repeat_offender_is_replaced_after_20_strikes() {
    let b = start_abuser(python::REPEAT_OFFENDER, &[]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let pid = trigger_abuse(addr);
    let (at, replacing) = b.expect_line(0, "the replacement for protocol violations", READY, |l| {
        is_event(l, "worker keeps breaking the ipc protocol; replacing it")
            && field_u32(l, "pid") == Some(pid)
    });
    let (_, stopped) = b.expect_line(at, "the offender's end", READY, |l| {
        (is_event(l, "worker exited") || is_event(l, "worker stopped"))
            && field_u32(l, "pid") == Some(pid)
    });
    let (_, ready) = b.expect_line(at, "a new worker ready", READY, |l| {
        is_event(l, "worker ready")
    });
    let replacement = field_u32(&ready, "pid").expect("pid");
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(5),
        "after the replacement",
    );
    let lines = b.lines();
    let strikes = strikes_of(&lines, pid).len();
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_repeat_offender",
        &[
            ("bad_lines", "25".to_string()),
            ("strike_warnings", strikes.to_string()),
            (
                "replaced_at_strikes",
                field(&replacing, "strikes").unwrap_or("?").to_string(),
            ),
            ("end", format!("{:?}", exit_status(&stopped))),
            ("fds", format!("{fds_before}->{fds_after}")),
        ],
    );
    assert_eq!(field_u32(&replacing, "strikes"), Some(20), "{replacing}");
    assert_eq!(strikes, 20, "{}", b.dump());
    assert_ne!(replacement, pid);
    assert_eq!(answers, replacement);
    assert!(wait_until(Duration::from_secs(5), || !pid_alive(pid)));
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// 9. SIGTERM with requests in flight.

/// A `GET /sleep?s=N` for the [`python::SLEEPY`] worker.
fn sleep_request(secs: u32) -> Vec<u8> {
    format!("GET /sleep?s={secs} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

/// SIGTERM while a 3-second request is in flight (`--grace 10s`): the request completes with
/// its answer, new connects are refused while it runs (the listener is closed first), and
/// the master exits 0 right after the request is done.
#[test]
fn sigterm_lets_a_3_second_request_finish() {
    const SECS: u32 = 3;
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--grace",
        "10s",
        "--",
        python::python(),
        "-c",
        python::SLEEPY,
        "polite",
    ]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let slow =
        thread::spawn(move || load::request(addr, &sleep_request(SECS), Duration::from_secs(30)));
    b.expect_line(0, "the worker's `sleeping 3`", READY, |l| {
        l.contains("stdout] sleeping 3")
    });
    let signalled = Instant::now();
    b.signal(libc::SIGTERM);
    b.expect_line(0, "`stopping` with one open connection", EXIT, |l| {
        is_event(l, "stopping: draining connections") && field(l, "open_connections") == Some("1")
    });
    // The listener closes right after that line (a connect in between may still be served,
    // or reset if it was queued when the listener closed): poll until connects are refused.
    let mut probes = 0;
    let refusing = wait_until(Duration::from_secs(2), || {
        probes += 1;
        matches!(
            std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    let refused_at = Instant::now();
    let attempt = slow.join().expect("the slow client panicked");
    let exit = b.expect_exit(EXIT);
    let took = signalled.elapsed();
    summary(
        "sigterm_inflight",
        &[
            ("request_s", SECS.to_string()),
            ("grace_s", "10".to_string()),
            ("inflight_outcome", attempt.outcome.name().to_string()),
            ("connects_until_refused", probes.to_string()),
            ("exit_after_ms", took.as_millis().to_string()),
            (
                "exit_code",
                exit.code().map_or("none".to_owned(), |c| c.to_string()),
            ),
        ],
    );
    assert_eq!(
        attempt.outcome,
        Outcome::Ok,
        "the in-flight request: {attempt:?}\n{}",
        b.dump()
    );
    assert!(refusing, "new connects still accepted while draining");
    assert!(
        attempt.end > refused_at,
        "the listener was closed only after the in-flight request ended"
    );
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert!(
        attempt.end <= signalled + Duration::from_secs(u64::from(SECS)) + Duration::from_secs(2),
        "the request took too long"
    );
    // It waited for the request, and not much longer.
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}");
    assert!(
        took <= Duration::from_secs(u64::from(SECS) + 4),
        "exited after {took:?}"
    );
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
    assert_no_panic(&b);
}

/// SIGTERM with `--grace 1s` while a 30-second request is in flight, and a worker that
/// ignores `shutdown` and SIGTERM: the client's connection is closed at the end of the grace
/// period, the worker gets SIGKILL after the stop timeout, and the master exits within
/// `grace` + 2 s (`shutdown` patience) + 5 s (SIGTERM to SIGKILL) + slack — the bound
/// `docs/LIFECYCLE.md` gives ("at most --grace + 7 s + about 1 s").
#[test]
fn sigterm_with_a_request_longer_than_grace_exits_within_grace_plus_stop_timeout() {
    const GRACE: Duration = Duration::from_secs(1);
    /// `shutdown` patience (2 s) + SIGTERM to SIGKILL (5 s).
    const STOP_TIMEOUT: Duration = Duration::from_secs(7);
    /// "about 1 s" in the docs, plus scheduling on a busy machine.
    const SLACK: Duration = Duration::from_secs(2);

    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--grace",
        "1s",
        "--",
        python::python(),
        "-c",
        python::SLEEPY,
        "stubborn",
    ]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let worker = rotation(&b.lines()).into_keys().next().expect("a worker");
    let slow =
        thread::spawn(move || load::request(addr, &sleep_request(30), Duration::from_secs(40)));
    b.expect_line(0, "the worker's `sleeping 30`", READY, |l| {
        l.contains("stdout] sleeping 30")
    });
    let signalled = Instant::now();
    b.signal(libc::SIGTERM);
    let attempt = slow.join().expect("the slow client panicked");
    let cut_after = attempt.end.saturating_duration_since(signalled);
    let exit = b.expect_exit(GRACE + STOP_TIMEOUT + SLACK + Duration::from_secs(5));
    let took = signalled.elapsed();
    let lines = b.lines();
    let (_, stopped) = b.expect_line(0, "the worker's end", Duration::ZERO, |l| {
        is_event(l, "worker stopped") && field_u32(l, "pid") == Some(worker)
    });
    summary(
        "sigterm_over_grace",
        &[
            ("request_s", "30".to_string()),
            ("grace_s", GRACE.as_secs().to_string()),
            ("inflight_outcome", attempt.outcome.name().to_string()),
            ("client_cut_after_ms", cut_after.as_millis().to_string()),
            ("exit_after_ms", took.as_millis().to_string()),
            (
                "bound_ms",
                (GRACE + STOP_TIMEOUT + SLACK).as_millis().to_string(),
            ),
            ("worker_end", format!("{:?}", exit_status(&stopped))),
            (
                "exit_code",
                exit.code().map_or("none".to_owned(), |c| c.to_string()),
            ),
        ],
    );
    assert_ne!(
        attempt.outcome,
        Outcome::Ok,
        "a 30 s request cannot have finished"
    );
    assert!(
        cut_after >= GRACE && cut_after <= GRACE + SLACK,
        "the client was cut off {cut_after:?} after SIGTERM"
    );
    assert!(
        events(&lines, "grace period over; closing open connections").count() == 1,
        "{}",
        b.dump()
    );
    assert!(
        events(&lines, "worker ignored SIGTERM; sending SIGKILL").count() == 1,
        "{}",
        b.dump()
    );
    assert!(stopped.contains("signal 9 (SIGKILL)"), "{stopped}");
    assert!(
        took <= GRACE + STOP_TIMEOUT + SLACK,
        "the master exited {took:?} after SIGTERM, more than {:?}",
        GRACE + STOP_TIMEOUT + SLACK
    );
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert!(!pid_alive(worker), "the worker outlived the master");
    assert_no_panic(&b);
}
