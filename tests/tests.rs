//! Integration tests: each one runs the real `balancer` binary on a free loopback port,
//! talks to it over TCP, sends it real signals and reads its log. See `helper` for the
//! harness; every process a test starts is killed when its `Balancer` is dropped.

mod helper;

mod cluster;
mod compat;
mod datapath;
mod defects;
mod faults;
mod http;
mod ops;
mod redispatch;
mod systemd;
mod upgrade;
mod upstream;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::Duration;

use helper::*;

/// How long workers may take from spawn to rotation: the built-in worker is a debug build,
/// up to a few tests run at once on a 2-core machine, and on a starved host an admission
/// can fail and cost one `--ready-timeout` (10 s) before the replacement is admitted.
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing left to drain may take.
const EXIT: Duration = Duration::from_secs(15);
/// `n` for a `/sum` that takes about one second in a debug build (measured 1.08 s alone on
/// the 2-core CI machine; 400M, the default, takes about 4 s).
const SLOW_SUM_N: u64 = 100_000_000;

/// The pid of the worker behind one `GET /`.
fn who_answers(addr: std::net::SocketAddr) -> u32 {
    body_pid(&get_ok(addr, "/"))
}

// ---------------------------------------------------------------------------------------------
// Selection.

#[test]
fn round_robin_is_exact_over_all_workers() {
    let b = Balancer::start(&["--cpus", "3"]);
    let addr = b.addr();
    wait_all_ready(&b, 3);

    let first: Vec<u32> = (0..3).map(|_| who_answers(addr)).collect();
    let distinct: HashSet<u32> = first.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "3 requests, 3 workers: {first:?}");
    let spawned: HashSet<u32> = b.worker_pids().into_iter().collect();
    assert!(
        distinct.is_subset(&spawned),
        "answers {first:?} from spawned {spawned:?}"
    );

    let mut hits: HashMap<u32, usize> = HashMap::new();
    for _ in 0..6 {
        *hits.entry(who_answers(addr)).or_default() += 1;
    }
    assert_eq!(hits.len(), 3, "6 requests: {hits:?}");
    assert!(
        hits.values().all(|&n| n == 2),
        "each worker exactly twice: {hits:?}"
    );
    assert!(
        hits.keys().all(|pid| distinct.contains(pid)),
        "{hits:?} vs {distinct:?}"
    );

    assert_eq!(
        get(addr, "/healthz").expect("GET /healthz"),
        (200, "ok".to_owned())
    );
    let (status, body) = get(addr, "/sum?n=4").expect("GET /sum");
    assert_eq!((status, body.as_str()), (200, "14\n"));
}

// ---------------------------------------------------------------------------------------------
// Supervision.

#[test]
fn killed_worker_is_replaced_and_traffic_keeps_flowing() {
    let b = Balancer::start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);

    let victim = who_answers(addr);
    let (_, spawned) = b.expect_line(0, "the victim's `worker spawned`", READY, |l| {
        is_event(l, "worker spawned") && field_u32(l, "pid") == Some(victim)
    });
    let slot = field(&spawned, "slot").expect("slot").to_owned();
    send_signal(victim, libc::SIGKILL);

    let of_victim = |l: &str| field_u32(l, "pid") == Some(victim);
    b.expect_line(0, "`worker out of rotation` for the victim", READY, |l| {
        is_event(l, "worker out of rotation") && of_victim(l)
    });
    let (exit_at, exited) = b.expect_line(0, "`worker exited` for the victim", READY, |l| {
        is_event(l, "worker exited") && of_victim(l)
    });
    assert!(exited.contains("status=signal 9 (SIGKILL)"), "{exited}");
    assert_eq!(field(&exited, "slot"), Some(slot.as_str()));
    let (_, respawned) = b.expect_line(exit_at, "a new `worker spawned` in the slot", READY, |l| {
        is_event(l, "worker spawned") && field(l, "slot") == Some(slot.as_str())
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    assert_ne!(replacement, victim);

    // The exit is logged after the worker left rotation: from now on nothing may fail.
    for i in 0..20 {
        let pid = match get(addr, "/") {
            Ok((200, body)) => body_pid(&body),
            other => panic!("request {i} after the exit: {other:?}\nlog:\n{}", b.dump()),
        };
        assert_ne!(pid, victim, "request {i} reached the killed worker");
    }

    b.expect_line(exit_at, "`worker ready` for the replacement", READY, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid") == Some(replacement)
    });
    assert!(
        wait_until(Duration::from_secs(5), || who_answers(addr) == replacement),
        "the replacement {replacement} never answered"
    );
    assert!(!pid_alive(victim));
    assert_no_panic(&b);
}

#[test]
fn sigterm_lets_an_inflight_request_finish() {
    let mut b = Balancer::start(&["--cpus", "1", "--grace", "20s"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let worker = ready_pids(&b)[0];
    let before = proc_stat(worker).expect("worker stat").cpu_ticks;

    let slow = thread::spawn(move || {
        get_with_timeout(
            addr,
            &format!("/sum?n={SLOW_SUM_N}"),
            Duration::from_secs(30),
        )
    });
    // The request is in flight once the single-threaded worker is burning CPU on it.
    assert!(
        wait_until(Duration::from_secs(10), || {
            proc_stat(worker).is_some_and(|s| s.cpu_ticks >= before + 5)
        }),
        "the worker never started computing"
    );
    b.signal(libc::SIGTERM);
    b.expect_line(0, "`stopping` with one open connection", EXIT, |l| {
        is_event(l, "stopping: draining connections") && field(l, "open_connections") == Some("1")
    });

    let (status, body) = slow
        .join()
        .expect("request thread")
        .expect("the in-flight request completes");
    assert_eq!(status, 200);
    assert!(body.trim().parse::<u64>().is_ok(), "a sum, got {body:?}");

    let exit = b.expect_exit(EXIT);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
        b.dump()
    );
    assert!(
        b.wait_for_line(Duration::ZERO, |l| is_event(l, "worker stopped"))
            .is_some(),
        "{}",
        b.dump()
    );
    assert!(
        b.lines().last().is_some_and(|l| is_event(l, "stopped")),
        "{}",
        b.dump()
    );
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
    assert_no_panic(&b);
}

#[test]
fn killing_the_master_kills_every_worker() {
    let mut b = Balancer::start(&["--cpus", "2"]);
    b.addr();
    wait_all_ready(&b, 2);
    // Every worker ever spawned must be gone afterwards; at least the two in rotation are
    // alive now (under heavy load a slow starter may already have been replaced).
    let workers = b.worker_pids();
    let master = b.pid();
    let live = workers
        .iter()
        .filter(|&&p| proc_stat(p).is_some_and(|s| s.is_alive() && s.ppid == master))
        .count();
    assert!(
        live >= 2,
        "workers {workers:?}: {live} live children of the master {master}\n{}",
        b.dump()
    );

    b.signal(libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(2), || !workers
            .iter()
            .any(|&p| pid_alive(p))),
        "workers {:?} still alive 2 s after the master was killed",
        workers
            .iter()
            .filter(|&&p| pid_alive(p))
            .collect::<Vec<_>>()
    );
}

#[test]
fn crashing_worker_is_retried_with_growing_backoff() {
    let mut b = Balancer::start(&["--cpus", "1", "--", "sh", "-c", "exit 3"]);
    let addr = b.addr();

    let mut delays = Vec::new();
    for n in 1..=4u32 {
        let (_, line) = b.expect_line(0, &format!("backoff line failures={n}"), READY, |l| {
            is_event(
                l,
                "worker failed before becoming ready; respawning after backoff",
            ) && field_u32(l, "failures") == Some(n)
        });
        let delay = field(&line, "delay")
            .and_then(parse_debug_duration)
            .unwrap_or_else(|| panic!("no delay in {line:?}"));
        delays.push(delay);
    }
    assert!(delays[0] >= Duration::from_millis(100), "{delays:?}");
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "delays must grow: {delays:?}"
    );
    assert!(
        b.lines()
            .iter()
            .any(|l| is_event(l, "worker exited") && l.contains("status=exit code 3")),
        "{}",
        b.dump()
    );

    // Still alive with the port taken; with no worker ever ready the master does not accept,
    // so the client waits in the backlog (neither served nor closed).
    assert!(b.is_running());
    let mut conn = TcpStream::connect(addr).expect("the port is still bound");
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut rest = Vec::new();
    match conn.read_to_end(&mut rest) {
        Ok(_) => panic!("no worker ready, yet the connection ended with {rest:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    assert!(b.is_running());

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
        b.dump()
    );
    assert_no_panic(&b);
}

#[test]
fn silent_worker_is_replaced_after_ready_timeout() {
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready-timeout",
        "300ms",
        "--",
        "sleep",
        "60",
    ]);
    b.addr();

    let (_, first) = b.expect_line(0, "the first `worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let first = field_u32(&first, "pid").expect("pid");
    let (timeout_at, line) = b.expect_line(0, "the ready-timeout line", READY, |l| {
        is_event(
            l,
            "worker did not become ready within --ready-timeout; replacing it",
        )
    });
    assert_eq!(field_u32(&line, "pid"), Some(first), "{line}");
    assert_eq!(field(&line, "timeout"), Some("300ms"), "{line}");
    let (_, second) = b.expect_line(timeout_at, "a second `worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let second = field_u32(&second, "pid").expect("pid");
    assert_ne!(second, first);
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(first)),
        "the timed-out `sleep` {first} is still alive"
    );

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
        b.dump()
    );
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "`sleep` {pid} outlived the master");
    }
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// Bad input: one error line, a non-zero exit, no panic, no worker.

/// Runs `balancer ARGS` (exactly these), which must fail at start-up with balancer's own
/// one-line error; returns that line.
fn fatal_error(args: &[&str]) -> String {
    fatal_error_from(Balancer::start_exact(args), args)
}

/// [`fatal_error`] of a master already started with `args`.
fn fatal_error_from(mut b: Balancer, args: &[&str]) -> String {
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
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: exactly one line wanted:\n{}",
        b.dump()
    );
    assert!(
        lines[0].starts_with("balancer: error: "),
        "{args:?}: {:?}",
        lines[0]
    );
    assert!(!looks_like_panic(&lines[0]), "{args:?}: {:?}", lines[0]);
    assert!(b.worker_pids().is_empty());
    assert!(
        b.stdout_lines().is_empty(),
        "{args:?}: {:?}",
        b.stdout_lines()
    );
    lines[0].clone()
}

/// Like [`fatal_error`], with `--listen 127.0.0.1:0` first (so a check that wrongly passes
/// cannot bind a real port).
fn fatal_error_loopback(args: &[&str]) -> String {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    fatal_error(&all)
}

#[test]
fn bad_input_cpus_zero() {
    let line = fatal_error_loopback(&["--cpus", "0"]);
    assert!(line.contains("--cpus 0"), "{line}");
}

#[test]
fn bad_input_cpus_not_a_number() {
    let line = fatal_error_loopback(&["--cpus", "abc"]);
    assert!(line.contains("--cpus \"abc\""), "{line}");
}

#[test]
fn bad_input_cpus_too_many() {
    let line = fatal_error_loopback(&["--cpus", "99999999999"]);
    assert!(line.contains("99999999999"), "{line}");
}

#[test]
fn bad_input_listen_not_an_address() {
    let line = fatal_error(&["--listen", "nonsense"]);
    assert!(line.contains("--listen \"nonsense\""), "{line}");
}

#[test]
fn bad_input_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding a port to occupy");
    let addr = taken.local_addr().unwrap().to_string();
    let line = fatal_error(&["--listen", &addr, "--cpus", "1"]);
    assert!(line.contains(&format!("binding {addr}")), "{line}");
    drop(taken);
}

#[test]
fn bad_input_low_port_without_privilege() {
    // Binding port 1 needs privilege: as root (as on CI) the master runs as `nobody`.
    let unprivileged_start =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(1024);
    if unprivileged_start <= 1 {
        // This host lets anyone bind port 1 (not so where CI runs).
        eprintln!("skipped: net.ipv4.ip_unprivileged_port_start is {unprivileged_start}");
        return;
    }
    let args = ["--listen", "127.0.0.1:1", "--cpus", "1"];
    let as_user = (euid() == 0).then_some(NOBODY);
    let line = fatal_error_from(Balancer::start_exact_as(&args, as_user), &args);
    assert!(line.contains("binding 127.0.0.1:1"), "{line}");
    assert!(line.to_lowercase().contains("permission denied"), "{line}");
}

#[test]
fn bad_input_command_path_does_not_exist() {
    let line = fatal_error_loopback(&["--cpus", "1", "--", "/nonexistent/prog"]);
    assert!(line.contains("/nonexistent/prog"), "{line}");
}

#[test]
fn bad_input_command_not_in_path() {
    let line = fatal_error_loopback(&["--cpus", "1", "--", "no-such-cmd-xyz"]);
    assert!(line.contains("no-such-cmd-xyz"), "{line}");
}

#[test]
fn bad_input_command_not_executable() {
    let dir = TempDir::new("noexec");
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = script.to_str().expect("UTF-8 temp path");
    let line = fatal_error_loopback(&["--cpus", "1", "--", script]);
    assert!(line.contains("not executable"), "{line}");
}

#[test]
fn bad_input_grace_not_a_duration() {
    let line = fatal_error_loopback(&["--grace", "abc"]);
    assert!(line.contains("--grace \"abc\""), "{line}");
}

#[test]
fn bad_input_rejected_by_clap_exits_2() {
    for args in [
        &["--listen", "127.0.0.1:0", "--max-conns", "abc"][..],
        &["--listen", "127.0.0.1:0", "--no-such-flag"][..],
    ] {
        let mut b = Balancer::start_exact(args);
        let exit = b.expect_exit(EXIT);
        let lines = b.lines();
        assert_eq!(
            exit.code(),
            Some(2),
            "{args:?}: {exit:?}; stderr:\n{}",
            b.dump()
        );
        assert!(
            lines.first().is_some_and(|l| l.starts_with("error:")),
            "{args:?}:\n{}",
            b.dump()
        );
        assert!(
            !lines.iter().any(|l| looks_like_panic(l)),
            "{args:?}:\n{}",
            b.dump()
        );
        assert!(b.worker_pids().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Workers in other languages, speaking the IPC protocol by hand.

/// A python HTTP server on 127.0.0.1:0, plus `send(line)` and `ready(port)` over the IPC fd,
/// and a thread that exits at once when the master sends `shutdown` (or goes away). Each test
/// appends what its worker does before `server.serve_forever()`.
const PY_WORKER: &str = r#"
import http.server, json, os, sys, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("python worker pid %d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
ipc_fd = int(os.environ["BALANCER_IPC_FD"])
ipc = os.fdopen(ipc_fd, "w", buffering=1)

def send(line):
    ipc.write(line + "\n")

def ready(port):
    send(json.dumps({"type": "ready", "port": port}))

def obey_master():
    for line in os.fdopen(os.dup(ipc_fd), "r"):
        if json.loads(line).get("type") == "shutdown":
            break
    os._exit(0)

threading.Thread(target=obey_master, daemon=True).start()
"#;

fn python_worker(body: &str) -> String {
    format!("{PY_WORKER}\n{body}\nserver.serve_forever()\n")
}

#[test]
fn python_worker_speaks_the_protocol() {
    let script = python_worker("ready(server.server_address[1])");
    let python = python3().to_str().expect("UTF-8 python path");
    let mut b = Balancer::start(&["--cpus", "1", "--", python, "-c", &script]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let worker = ready_pids(&b)[0];

    for _ in 0..3 {
        assert_eq!(get_ok(addr, "/"), format!("python worker pid {worker}\n"));
    }

    // The worker exits by itself on the `shutdown` message.
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
        b.dump()
    );
    let stopped = format!("pid={worker} status=exit code 0");
    assert!(
        b.lines()
            .iter()
            .any(|l| is_event(l, "worker stopped") && l.contains(&stopped)),
        "{}",
        b.dump()
    );
    assert!(!pid_alive(worker));
    assert_no_panic(&b);
}

#[test]
fn malformed_ipc_lines_do_not_hurt_the_master() {
    // The worker reads the master's port, then later a go-ahead, from a FIFO the test writes.
    let dir = TempDir::new("ipc");
    let fifo = dir.path().join("control");
    make_fifo(&fifo);
    let script = python_worker(
        r#"
control = open(sys.argv[1])
master_port = int(control.readline())
send("not json")
send("x" * (100 * 1024))
send(json.dumps({"type": "ready", "port": master_port}))
send(json.dumps({"type": "ready", "port": 1}))
control.readline()
ready(server.server_address[1])
"#,
    );
    let python = python3().to_str().expect("UTF-8 python path");
    let fifo_arg = fifo.to_str().expect("UTF-8 temp path");
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready-timeout",
        "30s",
        "--",
        python,
        "-c",
        &script,
        fifo_arg,
    ]);
    let addr = b.addr();
    let mut control = open_fifo_writer(&fifo, READY);
    writeln!(control, "{}", addr.port()).expect("writing to the worker");

    // The wording of these warnings is the product's to change; each must be a warning
    // naming the worker and what was wrong.
    let (_, spawned) = b.expect_line(0, "`worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let pid = field_u32(&spawned, "pid").expect("pid");
    let warning = |l: &str, what: &str| {
        event(l).is_some_and(|(level, _)| level == "WARN")
            && field_u32(l, "pid") == Some(pid)
            && l.contains(what)
    };
    b.expect_line(0, "the `not json` warning", READY, |l| {
        warning(l, "not valid JSON")
    });
    b.expect_line(0, "the over-long line warning", READY, |l| {
        warning(l, "longer than")
    });
    b.expect_line(0, "the warning about the master's own port", READY, |l| {
        warning(l, "the master's own listening port")
    });
    b.expect_line(0, "the failed admission of port 1", READY, |l| {
        warning(l, "announced port not admitted") && l.contains("port 1 ")
    });
    assert!(b.is_running());
    assert!(
        !b.lines().iter().any(|l| is_event(l, "worker ready")),
        "{}",
        b.dump()
    );

    writeln!(control, "go").expect("writing to the worker");
    wait_all_ready(&b, 1);
    assert_eq!(b.worker_pids(), vec![pid], "replaced:\n{}", b.dump());
    assert_eq!(get_ok(addr, "/"), format!("python worker pid {pid}\n"));
    assert_no_panic(&b);
}

/// A worker that corrects a wrong announcement at once is admitted with the corrected port.
/// (Before 4e8c939 the correction arrived while the wrong port was being probed, for up to
/// 2 s, and was dropped as a "duplicate ready": the worker sat out its ready timeout and was
/// replaced, forever.)
#[test]
fn corrected_ready_during_a_pending_probe_is_admitted() {
    let script = python_worker(
        r#"
send(json.dumps({"type": "ready", "port": 1}))
ready(server.server_address[1])
"#,
    );
    let python = python3().to_str().expect("UTF-8 python path");
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready-timeout",
        "5s",
        "--",
        python,
        "-c",
        &script,
    ]);
    let addr = b.addr();
    // Admission of the corrected port takes milliseconds; well under the 5 s ready timeout.
    b.expect_line(0, "`worker ready`", Duration::from_secs(4), |l| {
        is_event(l, "worker ready")
    });
    let worker = ready_pids(&b)[0];
    assert_eq!(get_ok(addr, "/"), format!("python worker pid {worker}\n"));
}

#[test]
fn worker_output_is_relayed_with_slot_and_pid() {
    let script = python_worker(
        r#"
print("hello from worker", flush=True)
print("a warning", file=sys.stderr, flush=True)
ready(server.server_address[1])
"#,
    );
    let python = python3().to_str().expect("UTF-8 python path");
    let b = Balancer::start(&["--cpus", "1", "--", python, "-c", &script]);
    b.addr();
    let (_, spawned) = b.expect_line(0, "`worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let pid = field_u32(&spawned, "pid").expect("pid");

    let stdout = format!("[worker 0 pid {pid} stdout] hello from worker");
    let stderr = format!("[worker 0 pid {pid} stderr] a warning");
    b.expect_line(0, "the relayed stdout line", READY, |l| l == stdout);
    b.expect_line(0, "the relayed stderr line", READY, |l| l == stderr);
    assert!(
        b.stdout_lines().is_empty(),
        "the master's stdout: {:?}",
        b.stdout_lines()
    );
}

// ---------------------------------------------------------------------------------------------
// Readiness without IPC, and rolling reload.

#[test]
fn ready_port_admits_a_program_that_knows_nothing_of_ipc() {
    let python = python3().to_str().expect("UTF-8 python path");
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready",
        "port",
        "--",
        python,
        "-m",
        "http.server",
        "{port}",
        "--bind",
        "127.0.0.1",
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let (status, body) = get(addr, "/").expect("GET / through the master");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing"), "{body}");

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
    assert_no_panic(&b);
}

#[test]
fn sighup_replaces_every_worker_without_failing_a_request() {
    use std::sync::mpsc;

    /// Pause between two requests of the background client: about 200 requests a second
    /// cover the reload densely without filling the host's TCP table with TIME_WAIT entries.
    const PACE: Duration = Duration::from_millis(5);

    let b = Balancer::start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let old: HashSet<u32> = b.worker_pids().into_iter().collect();

    // Requests keep going through the whole reload; none may fail. The client stops when
    // `stop` is dropped or sent to.
    let (stop, stopped) = mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut failures = Vec::new();
        let mut sent = 0;
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(PACE) {
            sent += 1;
            match get(addr, "/") {
                Ok((200, _)) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        (sent, failures)
    });
    send_signal(b.pid(), libc::SIGHUP);
    b.expect_line(0, "`rolling reload done`", READY, |l| {
        is_event(l, "rolling reload done")
    });
    assert!(
        wait_until(Duration::from_secs(10), || !old
            .iter()
            .any(|&p| pid_alive(p))),
        "old workers {old:?} still alive after the reload"
    );
    drop(stop);
    let (sent, failures) = client.join().expect("client thread");
    assert!(sent > 0);
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during the reload: {failures:?}\nlog:\n{}",
        failures.len(),
        b.dump()
    );

    let now: HashSet<u32> = (0..2).map(|_| who_answers(addr)).collect();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.is_disjoint(&old), "old {old:?}, now {now:?}");
    assert_no_panic(&b);
}
