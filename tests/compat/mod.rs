//! Compatibility (issue 4): Node workers, programs that know nothing of IPC, socket-sharing modes, balance policies.
//!
//! Every test runs the real binary with real worker programs: the built-in worker, Node.js
//! programs written for `child_process.fork` (fixtures in `fixtures/`), `python3 -m
//! http.server`, and a python server that takes its socket the systemd way. Node tests fail
//! (never skip) when `node` is missing: CI installs it.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;

/// How long workers may take from spawn to rotation: a debug build or a Node start-up, a few
/// tests at once on a 2-core machine, and on a starved host one failed admission costing a
/// `--ready-timeout` (10 s).
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing left to drain may take (a worker that ignores
/// `shutdown` costs 2 s of patience, then SIGTERM).
const EXIT: Duration = Duration::from_secs(15);
/// How long the workers may outlive a master killed with SIGKILL.
const ORPHAN_LIFETIME: Duration = Duration::from_secs(2);
/// How long a replacement may take to be the one answering once it is in rotation.
const ANSWER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Shared steps.

/// The path of a fixture in `tests/compat/fixtures/`.
fn fixture(name: &str) -> String {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "compat",
        "fixtures",
        name,
    ]
    .iter()
    .collect();
    assert!(path.is_file(), "fixture {path:?} is missing");
    path.to_str().expect("UTF-8 fixture path").to_owned()
}

/// The `node` executable. Panics when there is none: CI installs `nodejs`, so a missing Node
/// is a broken environment, not a reason to pass.
pub(crate) fn node() -> &'static str {
    static NODE: OnceLock<Option<String>> = OnceLock::new();
    NODE.get_or_init(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("node"))
            .find(|p| p.is_file())
            .and_then(|p| p.to_str().map(str::to_owned))
    })
    .as_deref()
    .expect("Node.js is needed for this test and `node` was not found in PATH (CI installs the `nodejs` package)")
}

fn python() -> &'static str {
    python3().to_str().expect("UTF-8 python path")
}

/// The port of the `worker ready` line of `pid`.
fn ready_port(b: &Balancer, pid: u32) -> u16 {
    let line = b
        .lines()
        .into_iter()
        .find(|l| is_event(l, "worker ready") && field_u32(l, "pid") == Some(pid))
        .unwrap_or_else(|| panic!("no `worker ready` for {pid}:\n{}", b.dump()));
    field(&line, "addr")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
        .port()
}

/// The pid at the end of a worker's body (`... pid 123`, `... pid=123`), or in the built-in
/// worker's `... at pid: 123, host: h`.
fn pid_in(body: &str) -> u32 {
    if body.starts_with("child worker run, at pid: ") {
        return body_pid(body);
    }
    body.trim_end()
        .rsplit([' ', '='])
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid at the end of {body:?}"))
}

/// SIGTERM to the master: it must exit 0 and leave no worker behind. Returns the log.
fn stop_gracefully(b: &mut Balancer) -> Vec<String> {
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
        b.dump()
    );
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
    assert_no_panic(b);
    b.lines()
}

/// The `status=` of the `worker stopped` line of `pid`.
fn stopped_status(lines: &[String], pid: u32) -> Option<String> {
    let line = lines
        .iter()
        .find(|l| is_event(l, "worker stopped") && field_u32(l, "pid") == Some(pid))?;
    let (_, rest) = line.split_once(" status=")?;
    // `exit code 0` or `signal 15 (SIGTERM)`: up to the end of the line.
    Some(rest.trim_end().to_owned())
}

/// SIGKILLs `victim` and waits until the master has seen it die and replaced it in its
/// slot, and the replacement is ready. Returns the replacement's pid.
fn kill_and_wait_for_replacement(b: &Balancer, victim: u32) -> u32 {
    let (_, spawned) = b.expect_line(0, "the victim's `worker spawned`", READY, |l| {
        is_event(l, "worker spawned") && field_u32(l, "pid") == Some(victim)
    });
    let slot = field(&spawned, "slot").expect("slot").to_owned();
    send_signal(victim, libc::SIGKILL);
    let (exit_at, exited) = b.expect_line(0, "`worker exited` for the victim", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(victim)
    });
    assert!(exited.contains("status=signal 9 (SIGKILL)"), "{exited}");
    let (_, respawned) = b.expect_line(exit_at, "a new `worker spawned` in the slot", READY, |l| {
        is_event(l, "worker spawned") && field(l, "slot") == Some(slot.as_str())
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    assert_ne!(replacement, victim);
    b.expect_line(exit_at, "`worker ready` for the replacement", READY, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid") == Some(replacement)
    });
    replacement
}

/// `n` requests after a worker's exit was logged: each must succeed, none may reach `victim`.
fn requests_avoid(b: &Balancer, addr: SocketAddr, victim: u32, n: usize) {
    for i in 0..n {
        let pid = match get(addr, "/") {
            Ok((200, body)) => pid_in(&body),
            other => panic!("request {i} after the exit: {other:?}\nlog:\n{}", b.dump()),
        };
        assert_ne!(pid, victim, "request {i} reached the killed worker");
    }
}

/// Polls `GET /` until `pid` answers.
fn wait_for_answer_from(b: &Balancer, addr: SocketAddr, pid: u32) {
    let mut seen = Vec::new();
    let answered = wait_until(ANSWER, || {
        let got = pid_in(&get_ok(addr, "/"));
        seen.push(got);
        got == pid
    });
    assert!(
        answered,
        "{pid} never answered; answers: {seen:?}\nlog:\n{}",
        b.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// Node workers, unchanged: written for `child_process.fork`, run under balancer.

/// Starts `--cpus N [EXTRA...] -- node node_http.js FIXTURE_ARGS...` (the ready form, then
/// `shutdown-only` or nothing).
fn start_node(workers: usize, extra: &[&str], fixture_args: &[&str]) -> Balancer {
    let cpus = workers.to_string();
    let script = fixture("node_http.js");
    let mut args = vec!["--cpus", cpus.as_str()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", node(), script.as_str()]);
    args.extend_from_slice(fixture_args);
    Balancer::start(&args)
}

/// `n` requests, round-robin over the workers: the set of Node pids that answered.
fn node_answers(addr: SocketAddr, n: usize) -> HashSet<u32> {
    (0..n)
        .map(|_| {
            let body = get_ok(addr, "/");
            assert!(body.starts_with("node worker pid "), "{body:?}");
            pid_in(&body)
        })
        .collect()
}

/// A plain Node server on `listen(0)` that says `process.send(`${port} ready`)` serves
/// through balancer, which is Node's cluster primary for it (the default `auto`).
#[test]
fn node_worker_sending_port_ready_serves_through_balancer() {
    let mut b = start_node(2, &[], &["port-ready"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    // The cluster path was taken: `listen(0)` was a `queryServer` that balancer answered.
    for pid in &ready {
        assert!(
            b.lines()
                .iter()
                .any(|l| is_event(l, "node cluster worker online")
                    && field_u32(l, "pid") == Some(*pid)),
            "worker {pid} never came online as a cluster worker:\n{}",
            b.dump()
        );
    }
    assert_eq!(node_answers(addr, 4), ready, "{}", b.dump());
    stop_gracefully(&mut b);
}

#[test]
fn node_worker_sending_ready_port_string_serves() {
    let mut b = start_node(1, &[], &["ready-port"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(node_answers(addr, 2), ready, "{}", b.dump());
    stop_gracefully(&mut b);
}

#[test]
fn node_worker_sending_ready_object_serves() {
    let mut b = start_node(1, &[], &["object"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(node_answers(addr, 2), ready, "{}", b.dump());
    stop_gracefully(&mut b);
}

#[test]
fn killed_node_worker_is_replaced() {
    let b = start_node(2, &[], &["port-ready"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let victim = pid_in(&get_ok(addr, "/"));
    let replacement = kill_and_wait_for_replacement(&b, victim);
    requests_avoid(&b, addr, victim, 10);
    wait_for_answer_from(&b, addr, replacement);
    assert!(!pid_alive(victim));
    assert_no_panic(&b);
}

/// SIGTERM to the master ends the Node workers with exit code 0, not with a signal. As their
/// cluster primary, balancer asks them with Node's cluster `disconnect`; the fixture exits on
/// the closed channel.
#[test]
fn node_workers_exit_0_when_the_master_stops() {
    let mut b = start_node(2, &[], &["port-ready"]);
    b.addr();
    wait_all_ready(&b, 2);
    let ready = ready_pids(&b);
    let lines = stop_gracefully(&mut b);
    for pid in ready {
        assert_eq!(
            stopped_status(&lines, pid).as_deref(),
            Some("exit code 0"),
            "worker {pid}:\n{}",
            b.dump()
        );
    }
}

/// A Node worker written to exit on balancer's `{"type":"shutdown"}` (as docs/PROTOCOL.md
/// asks), and kept alive by a timer otherwise, exits 0 when the master stops, in the default
/// `--node-cluster auto`. Today, as its cluster primary, balancer sends it only Node's cluster
/// `disconnect`: the timer keeps it running, and it is killed by SIGTERM 2 s later.
#[test]
fn node_worker_exiting_on_shutdown_only_exits_0_when_the_master_stops() {
    let mut b = start_node(2, &[], &["port-ready", "shutdown-only"]);
    b.addr();
    wait_all_ready(&b, 2);
    let ready = ready_pids(&b);
    let lines = stop_gracefully(&mut b);
    for pid in ready {
        assert_eq!(
            stopped_status(&lines, pid).as_deref(),
            Some("exit code 0"),
            "worker {pid}:\n{}",
            b.dump()
        );
    }
}

/// Without the cluster protocol, the stop reaches the same worker as balancer's own
/// `{"type":"shutdown"}` message, on which it exits 0 (its only way to exit 0).
#[test]
fn node_workers_exit_0_on_the_shutdown_message() {
    let mut b = start_node(
        2,
        &["--node-cluster", "off"],
        &["port-ready", "shutdown-only"],
    );
    b.addr();
    wait_all_ready(&b, 2);
    let ready = ready_pids(&b);
    assert!(
        !b.lines()
            .iter()
            .any(|l| is_event(l, "node cluster worker online")),
        "--node-cluster off, yet a cluster worker:\n{}",
        b.dump()
    );
    let lines = stop_gracefully(&mut b);
    for pid in ready {
        let said = lines
            .iter()
            .position(|l| l.contains(&format!(" pid {pid} stdout] shutdown received")));
        let stopped = lines
            .iter()
            .position(|l| is_event(l, "worker stopped") && field_u32(l, "pid") == Some(pid));
        assert!(
            matches!((said, stopped), (Some(s), Some(t)) if s < t),
            "worker {pid} did not get `shutdown` before it stopped:\n{}",
            b.dump()
        );
        assert_eq!(
            stopped_status(&lines, pid).as_deref(),
            Some("exit code 0"),
            "worker {pid}:\n{}",
            b.dump()
        );
    }
}

/// The Node workers go when the master does. The fixture exits on `disconnect` (its channel
/// closing); note that balancer's `PR_SET_PDEATHSIG=SIGKILL` also kills its direct children
/// when it dies, so this test alone does not tell the two apart.
#[test]
fn node_workers_go_when_the_master_is_killed() {
    let mut b = start_node(2, &[], &["port-ready"]);
    b.addr();
    wait_all_ready(&b, 2);
    let workers = b.worker_pids();
    assert!(workers.iter().filter(|&&p| pid_alive(p)).count() >= 2);
    b.signal(libc::SIGKILL);
    assert!(
        wait_until(ORPHAN_LIFETIME, || !workers.iter().any(|&p| pid_alive(p))),
        "Node workers {:?} still alive {ORPHAN_LIFETIME:?} after the master was killed",
        workers
            .iter()
            .filter(|&&p| pid_alive(p))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Programs that know nothing of IPC: `--ready port`.

/// `python3 -m http.server` with the port in its arguments (`{port}`): two workers, each on
/// a port balancer picked, both reached.
#[test]
fn ready_port_serves_python_http_server() {
    let dir = TempDir::new("http-server");
    std::fs::write(dir.path().join("hello.txt"), "hello\n").expect("writing the served file");
    let served = dir.path().to_str().expect("UTF-8 temp path");
    let mut b = Balancer::start(&[
        "--cpus",
        "2",
        "--ready",
        "port",
        "--",
        python(),
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "--directory",
        served,
        "{port}",
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready = ready_pids(&b);
    assert_eq!(ready.len(), 2, "two distinct pids wanted:\n{}", b.dump());
    for _ in 0..4 {
        assert_eq!(get_ok(addr, "/hello.txt"), "hello\n");
    }
    // http.server logs each request on stderr, which balancer relays tagged with the pid:
    // round-robin sent requests to both.
    for pid in &ready {
        b.expect_line(
            0,
            &format!("a request logged by worker {pid}"),
            READY,
            |l| {
                l.contains(&format!(" pid {pid} stderr] "))
                    && l.contains("\"GET /hello.txt HTTP/1.1\" 200")
            },
        );
    }
    stop_gracefully(&mut b);
}

/// The port is also in `PORT`, for programs that read it from their environment.
#[test]
fn ready_port_passes_the_port_in_the_environment() {
    let script = fixture("port_env.py");
    let mut b = Balancer::start(&["--cpus", "2", "--ready", "port", "--", python(), &script]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    let mut answered = HashSet::new();
    for _ in 0..4 {
        let body = get_ok(addr, "/");
        let (port, pid) = body
            .trim_end()
            .strip_prefix("PORT=")
            .and_then(|rest| rest.split_once(" pid="))
            .and_then(|(port, pid)| Some((port.parse::<u16>().ok()?, pid.parse::<u32>().ok()?)))
            .unwrap_or_else(|| panic!("unexpected body {body:?}"));
        assert_eq!(port, ready_port(&b, pid), "worker {pid}:\n{}", b.dump());
        answered.insert(pid);
    }
    assert_eq!(answered, ready);
    stop_gracefully(&mut b);
}

/// A worker that never spoke IPC cannot answer `shutdown`, so it should get SIGTERM at
/// once; the 2 s of patience are for workers that speak IPC (docs/LIFECYCLE.md).
#[test]
fn worker_that_never_spoke_ipc_gets_sigterm_at_once() {
    /// Far below the 2 s of patience, far above what a SIGTERM to python takes.
    const PROMPT: Duration = Duration::from_millis(1500);
    let script = fixture("port_env.py");
    let mut b = Balancer::start(&["--cpus", "1", "--ready", "port", "--", python(), &script]);
    b.addr();
    wait_all_ready(&b, 1);
    let worker = ready_pids(&b)[0];
    let lines = stop_gracefully(&mut b);
    let at = |what: &str, pred: &dyn Fn(&str) -> bool| {
        lines
            .iter()
            .find(|l| pred(l))
            .and_then(|l| log_time(l))
            .unwrap_or_else(|| panic!("no {what} line:\n{}", b.dump()))
    };
    let stopping = at("`stopping`", &|l| {
        is_event(l, "stopping: draining connections")
    });
    let stopped = at("`worker stopped`", &|l| {
        is_event(l, "worker stopped") && field_u32(l, "pid") == Some(worker)
    });
    // Times of day: a stop that straddles midnight wraps around.
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let took = stopped
        .checked_sub(stopping)
        .unwrap_or_else(|| stopped + DAY - stopping);
    assert!(
        took < PROMPT,
        "the worker was stopped {took:?} after the master began to stop:\n{}",
        b.dump()
    );
}

/// The time of day of a log line (`2026-11-27T10:57:51.417755Z ...`), as a duration since
/// midnight: enough to subtract two lines of one short test.
fn log_time(line: &str) -> Option<Duration> {
    let (stamp, _) = line.split_once(' ')?;
    let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(Duration::from_secs(h * 3600 + m * 60) + Duration::from_secs_f64(s))
}

// ---------------------------------------------------------------------------------------------
// Socket-sharing and hand-off modes, with supervision.

/// The built-in worker in `mode`: it serves, a killed worker is replaced while traffic keeps
/// flowing, and SIGTERM stops everything with exit code 0.
fn builtin_worker_in_mode(mode: &str) {
    let mut b = Balancer::start(&["--cpus", "2", "--mode", mode]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());

    let answers: Vec<u32> = (0..6).map(|_| body_pid(&get_ok(addr, "/"))).collect();
    assert!(
        answers.iter().all(|p| ready.contains(p)),
        "answers {answers:?} from workers {ready:?}"
    );
    let (status, body) = get(addr, "/sum?n=4").expect("GET /sum");
    assert_eq!((status, body.as_str()), (200, "14\n"));

    let victim = answers[0];
    let replacement = kill_and_wait_for_replacement(&b, victim);
    // The exit is logged after the worker left rotation (and, sharing the socket, after the
    // kernel closed its copy): from now on nothing may fail.
    requests_avoid(&b, addr, victim, 10);
    wait_for_answer_from(&b, addr, replacement);
    assert!(!pid_alive(victim));

    let serving = ready_pids(&b);
    let lines = stop_gracefully(&mut b);
    for pid in serving {
        assert_eq!(
            stopped_status(&lines, pid).as_deref(),
            Some("exit code 0"),
            "worker {pid}:\n{}",
            b.dump()
        );
    }
}

#[test]
fn builtin_worker_in_shared_mode() {
    builtin_worker_in_mode("shared");
}

#[test]
fn builtin_worker_in_reuseport_mode() {
    builtin_worker_in_mode("reuseport");
}

#[test]
fn builtin_worker_in_handoff_mode() {
    builtin_worker_in_mode("handoff");
}

/// A Node worker written for `worker.send('server', server)` serves on the listening socket
/// balancer hands it (`auto` keeps the cluster protocol off in shared mode).
#[test]
fn node_worker_takes_the_server_handle_in_shared_mode() {
    let script = fixture("node_shared.js");
    let mut b = Balancer::start(&["--cpus", "2", "--mode", "shared", "--", node(), &script]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    for _ in 0..6 {
        let body = get_ok(addr, "/");
        assert!(body.starts_with("node shared worker pid "), "{body:?}");
        let pid = pid_in(&body);
        assert!(ready.contains(&pid), "{pid} is not one of {ready:?}");
    }
    let lines = stop_gracefully(&mut b);
    for pid in ready {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(" pid {pid} stdout] shutdown received"))),
            "worker {pid} did not get `shutdown`:\n{}",
            b.dump()
        );
        assert_eq!(
            stopped_status(&lines, pid).as_deref(),
            Some("exit code 0"),
            "worker {pid}:\n{}",
            b.dump()
        );
    }
}

/// A program that takes its socket the systemd way (fd 3, `LISTEN_FDS=1`, `LISTEN_PID` its
/// own pid; the fixture exits otherwise) serves in shared mode with `--ready spawn`.
#[test]
fn systemd_style_program_serves_in_shared_mode() {
    let script = fixture("systemd_socket.py");
    let mut b = Balancer::start(&[
        "--cpus",
        "2",
        "--mode",
        "shared",
        "--ready",
        "spawn",
        "--",
        python(),
        &script,
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    for pid in &ready {
        b.expect_line(0, &format!("worker {pid} serving on fd 3"), READY, |l| {
            l.contains(&format!(
                " pid {pid} stdout] serving on fd 3, port {}",
                addr.port()
            ))
        });
    }
    for _ in 0..6 {
        let body = get_ok(addr, "/");
        assert!(body.starts_with("systemd worker pid "), "{body:?}");
        let pid = pid_in(&body);
        assert!(ready.contains(&pid), "{pid} is not one of {ready:?}");
    }
    assert!(
        !b.lines().iter().any(|l| is_event(l, "worker exited")),
        "a worker exited:\n{}",
        b.dump()
    );

    // The replacement gets the socket the same way (the fixture checks LISTEN_PID again).
    let victim = pid_in(&get_ok(addr, "/"));
    let replacement = kill_and_wait_for_replacement(&b, victim);
    requests_avoid(&b, addr, victim, 10);
    wait_for_answer_from(&b, addr, replacement);
    stop_gracefully(&mut b);
}

/// A program that binds the client port itself with SO_REUSEPORT serves in reuseport mode
/// with `--ready port` (ready once it listens there), and is replaced when killed.
#[test]
fn reuseport_program_binding_the_port_itself_serves() {
    let script = fixture("reuseport_port.py");
    let mut b = Balancer::start(&[
        "--cpus",
        "2",
        "--mode",
        "reuseport",
        "--ready",
        "port",
        "--",
        python(),
        &script,
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    for _ in 0..6 {
        let body = get_ok(addr, "/");
        assert!(body.starts_with("reuseport worker pid "), "{body:?}");
        let pid = pid_in(&body);
        assert!(ready.contains(&pid), "{pid} is not one of {ready:?}");
    }
    let victim = pid_in(&get_ok(addr, "/"));
    let replacement = kill_and_wait_for_replacement(&b, victim);
    requests_avoid(&b, addr, victim, 10);
    wait_for_answer_from(&b, addr, replacement);
    stop_gracefully(&mut b);
}

// ---------------------------------------------------------------------------------------------
// The blocking demo: one worker busy in `/sum`, the other free.

/// `n` of the calibration `/sum`: long enough to time (about 0.2 s in a debug build), short
/// enough not to matter.
const CALIBRATION_N: u64 = 20_000_000;
/// How long the blocking `/sum` should keep its worker busy, at the machine's load when
/// calibrated. Ten quick requests fit well inside it even on a loaded machine (load only
/// makes `/sum` slower), and the round-robin test waits for all of it once.
const BLOCKING_SUM: Duration = Duration::from_secs(2);
/// Workers are checked by TCP connect in these tests: the kernel completes a connect to a
/// worker whose only thread is computing, so the busy worker stays in rotation however slow
/// the machine (HTTP checks would take it down after 3 s and replace it, /sum and all, after
/// about 6 s) and what the tests see is the balance policy alone.
const HEALTH_CHECK: [&str; 2] = ["--health-check", "tcp"];
/// `/sum` accepts no larger `n` (worker/src/builtin.rs).
const MAX_SUM_N: u64 = 20_000_000_000;
/// Timeout of a request that may wait behind the blocking `/sum`.
const BEHIND_SUM: Duration = Duration::from_secs(60);
/// CPU time (clock ticks, 10 ms each) that marks a worker as computing: the idle worker
/// spends far less on its health checks.
const BUSY_TICKS: u64 = 5;

/// The `n` for which `/sum` takes about [`BLOCKING_SUM`] on this machine now, measured
/// through `addr`.
fn calibrate_sum(addr: SocketAddr) -> u64 {
    let start = Instant::now();
    let (status, body) = get_with_timeout(addr, &format!("/sum?n={CALIBRATION_N}"), BEHIND_SUM)
        .expect("the calibration /sum");
    assert_eq!(status, 200, "{body}");
    let took = start.elapsed().max(Duration::from_millis(1));
    let scale = BLOCKING_SUM.as_secs_f64() / took.as_secs_f64();
    ((CALIBRATION_N as f64 * scale) as u64).clamp(CALIBRATION_N, MAX_SUM_N)
}

/// A `/sum` in flight on one of `workers`: the request's thread, and the busy worker.
struct BlockingSum {
    request: thread::JoinHandle<io::Result<(u16, String)>>,
    busy: u32,
}

impl BlockingSum {
    /// Sends `/sum?n=N` and waits until one of `workers` is visibly computing it.
    fn start(b: &Balancer, addr: SocketAddr, n: u64, workers: &[u32]) -> BlockingSum {
        let ticks = |pid: u32| proc_stat(pid).map_or(0, |s| s.cpu_ticks);
        let before: Vec<u64> = workers.iter().map(|&p| ticks(p)).collect();
        let request =
            thread::spawn(move || get_with_timeout(addr, &format!("/sum?n={n}"), BEHIND_SUM));
        let mut busy = None;
        let computing = wait_until(Duration::from_secs(10), || {
            busy = workers
                .iter()
                .zip(&before)
                .find(|(&p, &t)| ticks(p) >= t + BUSY_TICKS)
                .map(|(&p, _)| p);
            busy.is_some()
        });
        assert!(computing, "no worker started computing /sum:\n{}", b.dump());
        BlockingSum {
            request,
            busy: busy.expect("found above"),
        }
    }

    fn in_flight(&self) -> bool {
        !self.request.is_finished()
    }
}

/// `GET path` like [`get`], also returning the client's own address (the `peer` in the
/// master's log).
fn get_from(addr: SocketAddr, path: &str) -> io::Result<(SocketAddr, u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let me = stream.local_addr()?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad response {raw:?}"));
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((me, status, body.to_owned()))
}

/// With `least-conn`, while one worker is busy in `/sum`, every new client goes to the other.
#[test]
fn least_conn_keeps_clients_off_the_busy_worker() {
    // `-v` for the `connection done` debug lines.
    let mut args = vec!["--cpus", "2", "--balance", "least-conn", "-v"];
    args.extend_from_slice(&HEALTH_CHECK);
    let b = Balancer::start(&args);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let workers = ready_pids(&b);
    assert_eq!(workers.len(), 2, "{}", b.dump());
    let n = calibrate_sum(addr);
    let sum = BlockingSum::start(&b, addr, n, &workers);
    let free = *workers
        .iter()
        .find(|&&p| p != sum.busy)
        .expect("two workers");

    for i in 0..10 {
        assert!(
            sum.in_flight(),
            "/sum?n={n} ended before request {i}: the calibration was too short"
        );
        let (me, status, body) =
            get_from(addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", b.dump()));
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(
            body_pid(&body),
            free,
            "request {i} went to the busy worker {}",
            sum.busy
        );
        // A client has its whole response before the master sees it close; until then the
        // connection still counts for the free worker, and the next pick would be a tie.
        let me = me.to_string();
        b.expect_line(0, "the request's `connection done`", HTTP_TIMEOUT, |l| {
            is_event(l, "connection done") && field(l, "peer") == Some(me.as_str())
        });
    }
    assert_no_panic(&b);
    // The master's death ends the /sum too.
    drop(b);
    let _ = sum.request.join();
}

/// With `round-robin`, a client is sent to the busy worker in its turn, and waits behind the
/// `/sum`: the blocking the issue starts from.
#[test]
fn round_robin_sends_clients_to_the_busy_worker() {
    let mut args = vec!["--cpus", "2", "--balance", "round-robin"];
    args.extend_from_slice(&HEALTH_CHECK);
    let b = Balancer::start(&args);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let workers = ready_pids(&b);
    assert_eq!(workers.len(), 2, "{}", b.dump());
    let n = calibrate_sum(addr);
    let sum = BlockingSum::start(&b, addr, n, &workers);

    let mut queued_behind_sum = 0;
    for i in 0..10 {
        let sent_while_busy = sum.in_flight();
        let (status, body) = get_with_timeout(addr, "/", BEHIND_SUM)
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", b.dump()));
        assert_eq!(status, 200, "request {i}: {body}");
        let pid = body_pid(&body);
        assert!(workers.contains(&pid), "{pid} is not one of {workers:?}");
        if pid == sum.busy && sent_while_busy {
            queued_behind_sum += 1;
        }
    }
    assert!(
        queued_behind_sum >= 1,
        "no request went to the busy worker {} while /sum ran:\n{}",
        sum.busy,
        b.dump()
    );
    let (status, body) = sum
        .request
        .join()
        .expect("the /sum thread")
        .expect("the /sum completes");
    assert_eq!(status, 200, "{body}");
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// Combinations that cannot work: one line of error, exit code 1, no worker.

/// Runs `balancer --listen 127.0.0.1:0 ARGS`, which must refuse to start with its own
/// one-line error; returns that line.
fn refused(args: &[&str]) -> String {
    let mut b = Balancer::start(args);
    let exit = b.expect_exit(EXIT);
    let lines: Vec<String> = b
        .lines()
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        exit.code(),
        Some(1),
        "{args:?}: {exit:?}; stderr:\n{}",
        b.dump()
    );
    assert_eq!(lines.len(), 1, "{args:?}: one line wanted:\n{}", b.dump());
    assert!(
        lines[0].starts_with("balancer: error: "),
        "{args:?}: {:?}",
        lines[0]
    );
    assert!(!looks_like_panic(&lines[0]), "{args:?}: {:?}", lines[0]);
    assert!(b.worker_pids().is_empty(), "{args:?}:\n{}", b.dump());
    assert!(
        b.stdout_lines().is_empty(),
        "{args:?}: {:?}",
        b.stdout_lines()
    );
    lines[0].clone()
}

#[test]
fn ready_spawn_in_proxy_mode_is_refused() {
    let line = refused(&[
        "--cpus", "1", "--mode", "proxy", "--ready", "spawn", "--", "sleep", "30",
    ]);
    assert!(
        line.contains("--ready spawn") && line.contains("proxy"),
        "{line}"
    );
}

#[test]
fn ready_port_in_shared_mode_is_refused() {
    let line = refused(&[
        "--cpus", "1", "--mode", "shared", "--ready", "port", "--", "sleep", "30",
    ]);
    assert!(
        line.contains("--ready port") && line.contains("shared"),
        "{line}"
    );
}

#[test]
fn ready_port_without_a_command_is_refused() {
    let line = refused(&["--cpus", "1", "--ready", "port"]);
    assert!(
        line.contains("COMMAND") && line.to_lowercase().contains("--ready port"),
        "{line}"
    );
}

/// The error should name the value as the user typed it, like the other `--ready` errors do
/// (`--ready port`, not the enum's `Debug` form `--ready Port`).
#[test]
fn ready_without_a_command_error_names_the_value_as_typed() {
    for value in ["port", "spawn"] {
        let line = refused(&["--cpus", "1", "--ready", value]);
        assert!(line.contains(&format!("--ready {value} ")), "{line}");
    }
}

/// In handoff mode a worker must take each connection over IPC, which a program that knows
/// nothing of IPC cannot do. Today balancer starts, admits the worker at once and, having no
/// hand-off channel for it, forwards clients to the worker's "address", which in handoff mode
/// is the master's own listening address: every client connection loops back into the
/// master until `--max-conns` is used up. (No client is sent here.)
#[test]
fn ready_spawn_in_handoff_mode_is_refused() {
    let line = refused(&[
        "--cpus", "1", "--mode", "handoff", "--ready", "spawn", "--", "sleep", "30",
    ]);
    assert!(
        line.contains("--ready spawn") && line.contains("handoff"),
        "{line}"
    );
}

/// In handoff mode workers have no port of their own, so there is nothing for `--ready port`
/// to assign or probe; today the worker never becomes ready and is replaced every
/// `--ready-timeout`, forever.
#[test]
fn ready_port_in_handoff_mode_is_refused() {
    let line = refused(&[
        "--cpus", "1", "--mode", "handoff", "--ready", "port", "--", "sleep", "30",
    ]);
    assert!(
        line.contains("--ready port") && line.contains("handoff"),
        "{line}"
    );
}
