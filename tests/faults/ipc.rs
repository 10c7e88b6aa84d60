//! Scenario 8: the IPC abuse list, each case from a real misbehaving worker process (python
//! scripts in [`super::python`] writing to the fd in `BALANCER_IPC_FD`): each abuse is
//! rejected or ignored with a log line, the master never panics, its descriptor count does
//! not grow, and a worker that misbehaves repeatedly is replaced.

use super::*;

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

/// A worker forks a child that keeps only the IPC channel, then exits; the child writes a
/// `ready` and a malformed line on the channel after the worker is gone. It writes when the
/// master's SIGTERM reaches it: the master sends that to what a dead worker left behind only
/// after reaping the worker, so the lines arrive on a dead worker's channel, deterministically,
/// and the write succeeds (the master's end is still open during its cleanup). The master must
/// not act on them (no line about the dead worker but the ones its death causes), it stops the
/// child, its descriptors are back to the count before once the replacement runs (the old
/// channel is closed although its other end was held open), and the replacement serves.
#[test]
fn ipc_message_after_the_worker_died_is_not_acted_on() {
    /// The most the orphan holds the channel after writing (the master kills it before).
    const HOLD: &str = "10";
    /// What the master's death of a worker logs about it, and nothing else may be.
    const ABOUT_ITS_DEATH: [&str; 4] = [
        "worker out of rotation",
        "worker daemonized",
        "stopped processes the worker left behind",
        "worker exited",
    ];
    let dir = TempDir::new("after-death");
    let outcome_file = dir.path().join("outcome");
    let outcome_arg = outcome_file.to_str().expect("UTF-8 temp path").to_owned();
    let b = start_abuser(python::AFTER_DEATH, &[&outcome_arg, HOLD]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(200));

    let from = b.lines().len();
    let pid = trigger_abuse(addr);
    let mut outcome = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            outcome = std::fs::read_to_string(&outcome_file).unwrap_or_default();
            !outcome.is_empty()
        }),
        "the orphan never wrote; log:\n{}",
        b.dump()
    );
    let orphan: u32 = outcome
        .strip_prefix("sent ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the orphan did not write after the death: {outcome:?}"));
    let (exit_at, exited) = b.expect_line(from, "the worker's exit", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(pid)
    });
    let (_, respawned) = b.expect_line(exit_at, "the replacement", READY, |l| {
        is_event(l, "worker ready")
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    let orphan_gone = !std::path::Path::new(&format!("/proc/{orphan}")).exists();
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(2),
        "with the replacement running",
    );
    let lines = b.lines();
    let about_dead: Vec<&String> = lines[from..]
        .iter()
        .filter(|l| event(l).is_some() && field_u32(l, "pid") == Some(pid))
        .collect();
    let acted_on: Vec<&&String> = about_dead
        .iter()
        .filter(|l| !ABOUT_ITS_DEATH.iter().any(|e| is_event(l, e)))
        .collect();
    let stopped = about_dead
        .iter()
        .any(|l| is_event(l, "stopped processes the worker left behind"));
    let answers = abuse_pid(addr, "/");
    summary(
        "ipc_after_death",
        &[
            ("orphan_write", format!("{outcome:?}")),
            ("lines_about_dead_worker", about_dead.len().to_string()),
            ("acted_on", acted_on.len().to_string()),
            ("orphan_stopped", stopped.to_string()),
            ("fds", format!("{fds_before}->{fds_after}")),
        ],
    );
    assert!(exited.contains("status=exit code 0"), "{exited}");
    assert!(
        acted_on.is_empty(),
        "the master acted on a dead worker's channel: {acted_on:#?}"
    );
    assert!(
        stopped && orphan_gone,
        "the orphan {orphan} was not stopped"
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
/// (Was a bug: the master read channels with plain `read()` and stalled after descriptors; it
/// now reads with `recvmsg` through `worker::fdpass::FdReader`.)
#[test]
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
