//! Node cluster primary, hand-off mode and the admin endpoint (issue 6).
//!
//! The Node tests run an unchanged textbook `cluster` program (`fixtures/app.js`) under the
//! real `node`: balancer starts each worker with `NODE_UNIQUE_ID`, so the program takes its
//! worker path and balancer answers its `server.listen()` as the cluster primary. The
//! hand-off tests also use a python worker written from docs/PROTOCOL.md alone
//! (`fixtures/handoff_worker.py`), which can refuse a connection, die holding one or sit on
//! one while busy, things Node cannot be made to do on cue.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;
use serde_json::Value as Json;

/// How long workers may take from spawn to rotation: Node starts in about 100 ms and python
/// in about 400 ms alone, but several tests run at once on a 2-core machine, and a start
/// that misses its admission costs a `--ready-timeout` (10 s) before the replacement.
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing slow left to drain may take.
const EXIT: Duration = Duration::from_secs(15);
/// How long a relayed worker output line may take to reach the master's log after the event
/// that caused it (it goes through a pipe and a relay task).
const RELAY: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The `node` executable (Node.js 20 or newer). Panics with what to install if there is
/// none: these tests exist to run the real Node, a skip would hide a broken CI image.
fn node() -> &'static str {
    static NODE: OnceLock<Result<String, String>> = OnceLock::new();
    let found = NODE.get_or_init(|| {
        let mut seen = Vec::new();
        for candidate in ["/usr/bin/node", "node"] {
            let Ok(out) = Command::new(candidate)
                .args(["-p", "process.versions.node"])
                .output()
            else {
                continue;
            };
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let major: u32 = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if out.status.success() && major >= 20 {
                return Ok(candidate.to_owned());
            }
            seen.push(format!("{candidate} is version {version:?}"));
        }
        Err(format!(
            "the cluster tests need Node.js 20 or newer as /usr/bin/node or `node` in PATH \
             (CI installs it; locally install nodejs 20); found: {}",
            if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            }
        ))
    });
    match found {
        Ok(path) => path,
        Err(why) => panic!("{why}"),
    }
}

/// The path of a file in `tests/cluster/fixtures/`.
fn fixture(name: &str) -> String {
    format!(
        "{}/tests/cluster/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A port that was free a moment ago, for the modes where balancer's `--listen` port must
/// equal the port the program asks for. (The listener is dropped before balancer binds.)
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
        .port()
}

/// Starts balancer in `mode` with `--cpus N` and `extra` flags, running the fixture `app`
/// under Node as a cluster worker. In shared and reuseport modes the workers accept on
/// balancer's client port themselves, so it must be the port the app asks for: there,
/// balancer listens on a free port (which the `PORT`-reading fixtures then ask for) and
/// `--node-cluster on` is given (`auto` is off in shared mode).
fn start_node(mode: &str, cpus: usize, extra: &[&str], app: &str) -> Balancer {
    let app = fixture(app);
    let cpus = cpus.to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--cpus", cpus.as_str(), "--mode", mode];
    if matches!(mode, "shared" | "reuseport") {
        args.extend(["--listen", listen.as_str(), "--node-cluster", "on"]);
    } else {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    args.extend(["--", node(), app.as_str()]);
    Balancer::start_exact(&args)
}

/// The pid of the worker logged `worker ready` in `slot` (the first one).
fn ready_pid_of_slot(b: &Balancer, slot: usize) -> u32 {
    let (_, line) = b.expect_line(0, &format!("`worker ready` for slot {slot}"), READY, |l| {
        is_event(l, "worker ready") && field(l, "slot") == Some(&slot.to_string())
    });
    field_u32(&line, "pid").expect("pid in `worker ready`")
}

/// The pid in a fixture app's body: `hello from 123` (or `slow hello from 123`).
fn node_pid(body: &str) -> u32 {
    body.trim_end()
        .rsplit_once("hello from ")
        .and_then(|(_, pid)| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a fixture app's body: {body:?}"))
}

/// The Node worker behind one `GET /`.
fn who_answers_node(addr: SocketAddr) -> u32 {
    node_pid(&get_ok(addr, "/"))
}

/// Every live descendant of `pid` (children, grandchildren, ...), from `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(p).filter(|s| s.is_alive()) {
            children.entry(stat.ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// The command name of `pid` (`/proc/<pid>/comm`), empty if it is gone.
fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// Sends `2 * pids.len()` sequential requests and asserts exact round-robin: each worker of
/// `pids` answers exactly twice. `answer` sends one request and returns who answered.
fn assert_round_robin(pids: &[u32], answer: impl Fn() -> u32, b: &Balancer) {
    let n = pids.len();
    let mut hits: HashMap<u32, usize> = HashMap::new();
    for _ in 0..2 * n {
        *hits.entry(answer()).or_default() += 1;
    }
    let wanted: HashMap<u32, usize> = pids.iter().map(|&p| (p, 2)).collect();
    assert_eq!(
        hits,
        wanted,
        "{} requests over workers {pids:?}\nlog:\n{}",
        2 * n,
        b.dump()
    );
}

/// Waits for the master's exit after a stop signal and asserts a clean one: status 0, the
/// last log line `stopped`, no worker left alive.
fn assert_clean_exit(b: &mut Balancer, timeout: Duration) {
    let exit = b.expect_exit(timeout);
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit:?}; log:\n{}",
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
    assert_no_panic(b);
}

/// The address from `admin endpoint listening addr=...`.
fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
}

/// `GET /status` from the admin endpoint, parsed.
fn admin_status(admin: SocketAddr) -> Json {
    let body = get_ok(admin, "/status");
    serde_json::from_str::<Json>(&body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// The value of the sample `name` (no labels) in a Prometheus text body.
fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in /metrics:\n{body}"))
}

// ---------------------------------------------------------------------------------------------
// 1. An unchanged cluster program: balancer's workers, not the program's own forks, serve.

/// Runs `app.js` with 2 workers in `mode` and checks that the two Node processes balancer
/// spawned (and only they) serve the clients on balancer's port.
fn textbook_program_is_served_by_balancers_workers(mode: &str) -> (Balancer, Vec<u32>) {
    let b = start_node(mode, 2, &[], "app.js");
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let serving = ready_pids(&b);
    assert_eq!(serving.len(), 2, "{serving:?}\n{}", b.dump());
    let spawned: HashSet<u32> = b.worker_pids().into_iter().collect();
    for &pid in &serving {
        b.expect_line(
            0,
            &format!("`node cluster worker online` for {pid}"),
            READY,
            |l| is_event(l, "node cluster worker online") && field_u32(l, "pid") == Some(pid),
        );
    }

    // The program did not fork children of its own: the master's process tree holds exactly
    // the two Node workers, as its direct children, and nothing else.
    let master = b.pid();
    let mut tree = descendants(master);
    tree.sort_unstable();
    let mut want = serving.clone();
    want.sort_unstable();
    let named: Vec<(u32, String)> = tree.iter().map(|&p| (p, comm(p))).collect();
    assert_eq!(tree, want, "the master's process tree: {named:?}");
    for (pid, name) in &named {
        assert_eq!(name, "node", "{pid} in the master's tree: {named:?}");
        assert_eq!(
            proc_stat(*pid).map(|s| s.ppid),
            Some(master),
            "{pid}'s parent"
        );
    }

    // Both answer on balancer's port (the program asked for 8000; nothing listens there for
    // it).
    let mut seen = HashSet::new();
    for _ in 0..20 {
        seen.insert(who_answers_node(addr));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        serving.iter().copied().collect::<HashSet<_>>(),
        "who answered, vs the workers in rotation\n{}",
        b.dump()
    );
    assert!(
        seen.is_subset(&spawned),
        "answers from {seen:?}, `worker spawned` {spawned:?}"
    );
    assert!(
        !b.lines()
            .iter()
            .any(|l| is_event(l, "node cluster worker's listen refused:")),
        "{}",
        b.dump()
    );
    (b, serving)
}

#[test]
fn cluster_program_in_proxy_mode_is_served_by_balancers_workers() {
    let (b, _) = textbook_program_is_served_by_balancers_workers("proxy");
    assert_no_panic(&b);
}

#[test]
fn cluster_program_in_handoff_mode_is_served_by_balancers_workers() {
    let (b, serving) = textbook_program_is_served_by_balancers_workers("handoff");
    let addr = b.addr();
    assert_round_robin(&serving, || who_answers_node(addr), &b);
    assert_no_panic(&b);
}

/// In proxy mode a Node cluster worker is served by hand-off and admitted with the master's
/// own client address; its health check must not connect to that address, or every check
/// becomes a client connection handed to some worker (and counted as one).
#[test]
fn cluster_workers_in_proxy_mode_get_only_client_connections() {
    let app = fixture("app.js");
    let b = Balancer::start(&[
        "--cpus",
        "2",
        "--health-interval",
        "100ms",
        "--admin",
        "127.0.0.1:0",
        "--",
        node(),
        &app,
    ]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_all_ready(&b, 2);
    let serving = ready_pids(&b);

    // No client has connected: for ten health intervals the master accepts nothing.
    let accepted = || {
        metric(
            &get_ok(admin, "/metrics"),
            "balancer_connections_accepted_total",
        )
    };
    assert!(
        !wait_until(Duration::from_secs(1), || accepted() > 0),
        "the master accepted {} connections with no client\n{}",
        accepted(),
        b.dump()
    );
    // And sequential clients take exact turns.
    assert_round_robin(&serving, || who_answers_node(addr), &b);
}

// ---------------------------------------------------------------------------------------------
// 2. Shared mode: the workers accept on the master's socket, so the ports must agree.

/// Shared and reuseport modes: a cluster program that listens on `PORT` (balancer's own
/// port) is served, by workers that accept themselves.
fn cluster_program_serves_on_the_port_it_asks_for(mode: &str) {
    let b = start_node(mode, 2, &[], "app_port_env.js");
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let serving: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(serving.len(), 2, "{serving:?}\n{}", b.dump());

    // The kernel, not balancer, picks the worker here: only check that workers answer.
    for i in 0..10 {
        let pid = who_answers_node(addr);
        assert!(
            serving.contains(&pid),
            "request {i} answered by {pid}, not one of {serving:?}"
        );
    }
    assert!(
        !b.lines()
            .iter()
            .any(|l| is_event(l, "node cluster worker's listen refused:")),
        "{}",
        b.dump()
    );
    assert_no_panic(&b);
}

#[test]
fn cluster_program_in_shared_mode_serves_on_the_port_it_asks_for() {
    cluster_program_serves_on_the_port_it_asks_for("shared");
}

#[test]
fn cluster_program_in_reuseport_mode_serves_on_the_port_it_asks_for() {
    cluster_program_serves_on_the_port_it_asks_for("reuseport");
}

#[test]
fn cluster_program_in_shared_mode_on_another_port_is_refused_with_a_hint() {
    // app.js asks for port 8000; balancer listens on a free ephemeral port (never 8000).
    let app = fixture("app.js");
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--mode",
        "shared",
        "--node-cluster",
        "on",
        "--",
        node(),
        &app,
    ]);
    let addr = b.addr();
    assert_ne!(addr.port(), 8000);

    let refused = |l: &str| is_event(l, "node cluster worker's listen refused:");
    let (_, line) = b.expect_line(0, "the refusal of port 8000", READY, refused);
    assert!(
        event(&line).is_some_and(|(level, _)| level == "WARN"),
        "{line}"
    );
    assert_eq!(field_u32(&line, "port"), Some(8000), "{line}");
    assert!(line.contains("port 8000"), "{line}");
    assert!(
        line.contains(&format!("serves port {}", addr.port())),
        "{line}"
    );
    assert!(line.contains("use --listen :8000"), "the hint: {line}");
    let first = field_u32(&line, "pid").expect("pid");

    // Node throws EADDRINUSE and exits; the master respawns with backoff and keeps running.
    let (at, _) = b.expect_line(0, "the backoff after the refused worker", READY, |l| {
        is_event(
            l,
            "worker failed before becoming ready; respawning after backoff",
        )
    });
    b.expect_line(at, "a respawned worker refused the same way", READY, |l| {
        refused(l) && field_u32(l, "pid").is_some_and(|p| p != first)
    });
    assert!(b.is_running(), "{}", b.dump());
    assert!(
        !b.lines().iter().any(|l| is_event(l, "worker ready")),
        "{}",
        b.dump()
    );

    b.signal(libc::SIGTERM);
    assert_clean_exit(&mut b, EXIT);
}

// ---------------------------------------------------------------------------------------------
// 3-5. Supervision of Node cluster workers: kill -9, SIGHUP, SIGTERM.

#[test]
fn killed_cluster_worker_is_replaced_and_traffic_keeps_flowing() {
    let app = fixture("app.js");
    let b = Balancer::start(&["--cpus", "2", "--", node(), &app]);
    let addr = b.addr();
    wait_all_ready(&b, 2);

    let victim = who_answers_node(addr);
    let (_, spawned) = b.expect_line(0, "the victim's `worker spawned`", READY, |l| {
        is_event(l, "worker spawned") && field_u32(l, "pid") == Some(victim)
    });
    let slot = field(&spawned, "slot").expect("slot").to_owned();
    send_signal(victim, libc::SIGKILL);

    let (exit_at, exited) = b.expect_line(0, "`worker exited` for the victim", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(victim)
    });
    assert!(exited.contains("status=signal 9 (SIGKILL)"), "{exited}");

    // The exit is logged after the worker left rotation: from now on nothing may fail.
    for i in 0..20 {
        let pid = match get(addr, "/") {
            Ok((200, body)) => node_pid(&body),
            other => panic!("request {i} after the exit: {other:?}\nlog:\n{}", b.dump()),
        };
        assert_ne!(pid, victim, "request {i} reached the killed worker");
    }

    let (_, respawned) = b.expect_line(exit_at, "a new `worker spawned` in the slot", READY, |l| {
        is_event(l, "worker spawned") && field(l, "slot") == Some(slot.as_str())
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    b.expect_line(exit_at, "`worker ready` for the replacement", READY, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid") == Some(replacement)
    });
    assert!(
        wait_until(Duration::from_secs(5), || who_answers_node(addr)
            == replacement),
        "the replacement {replacement} never answered\n{}",
        b.dump()
    );
    assert!(!pid_alive(victim));
    assert_no_panic(&b);
}

#[test]
fn two_sighups_replace_every_cluster_worker_without_failing_a_request() {
    /// Pause between two requests of the background client: dense enough to cover every
    /// hand-over, sparse enough not to fill the TCP table with TIME_WAIT entries.
    const PACE: Duration = Duration::from_millis(5);

    let app = fixture("app.js");
    let b = Balancer::start(&["--cpus", "2", "--", node(), &app]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let mut generations: Vec<Vec<u32>> = vec![ready_pids(&b)];
    assert_eq!(generations[0].len(), 2, "{}", b.dump());

    let (stop, stopped) = mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut failures = Vec::new();
        let mut sent = 0;
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(PACE) {
            sent += 1;
            match get(addr, "/") {
                Ok((200, body)) if body.starts_with("hello from ") => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        (sent, failures)
    });

    let mut from = 0;
    for reload in 1..=2 {
        send_signal(b.pid(), libc::SIGHUP);
        let (done, _) = b.expect_line(
            from,
            &format!("`rolling reload done` #{reload}"),
            READY,
            |l| is_event(l, "rolling reload done"),
        );
        from = done + 1;
        let old = generations.last().expect("a generation").clone();
        assert!(
            wait_until(Duration::from_secs(10), || !old
                .iter()
                .any(|&p| pid_alive(p))),
            "reload {reload}: old workers {old:?} still alive\n{}",
            b.dump()
        );
        let now = ready_pids(&b);
        assert_eq!(now.len(), 2, "reload {reload}: {now:?}\n{}", b.dump());
        generations.push(now);
    }
    drop(stop);
    let (sent, failures) = client.join().expect("client thread");
    assert!(sent > 0);
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during the reloads: {failures:?}\nlog:\n{}",
        failures.len(),
        b.dump()
    );

    let last: HashSet<u32> = generations[2].iter().copied().collect();
    let earlier: HashSet<u32> = generations[..2].iter().flatten().copied().collect();
    assert!(last.is_disjoint(&earlier), "generations {generations:?}");
    let answering: HashSet<u32> = (0..2).map(|_| who_answers_node(addr)).collect();
    assert_eq!(answering, last, "generations {generations:?}");
    assert_no_panic(&b);
}

/// SIGTERM while a 1.5 s request is in a Node worker's hands: the request completes, the
/// worker exits by itself (cluster `disconnect`), the master exits 0.
fn sigterm_lets_a_slow_cluster_request_finish(mode: &str) {
    let mut b = start_node(mode, 1, &["--grace", "20s"], "app_slow.js");
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let worker = ready_pids(&b)[0];

    let slow = thread::spawn(move || get_with_timeout(addr, "/slow", Duration::from_secs(20)));
    let started = format!("[worker 0 pid {worker} stdout] slow request started");
    b.expect_line(0, "the worker's `slow request started`", READY, |l| {
        l == started
    });
    b.signal(libc::SIGTERM);
    b.expect_line(0, "`stopping: draining connections`", EXIT, |l| {
        is_event(l, "stopping: draining connections")
    });

    let (status, body) = slow
        .join()
        .expect("request thread")
        .expect("the in-flight request completes");
    assert_eq!(
        (status, body.as_str()),
        (200, format!("slow hello from {worker}\n").as_str())
    );
    assert_clean_exit(&mut b, EXIT);
    let stopped = format!("pid={worker} status=exit code 0");
    assert!(
        b.lines()
            .iter()
            .any(|l| is_event(l, "worker stopped") && l.contains(&stopped)),
        "the worker exits by itself, 0:\n{}",
        b.dump()
    );
}

#[test]
fn sigterm_lets_a_slow_cluster_request_finish_in_proxy_mode() {
    sigterm_lets_a_slow_cluster_request_finish("proxy");
}

#[test]
fn sigterm_lets_a_slow_cluster_request_finish_in_handoff_mode() {
    sigterm_lets_a_slow_cluster_request_finish("handoff");
}

#[test]
fn sigterm_lets_a_slow_cluster_request_finish_in_shared_mode() {
    sigterm_lets_a_slow_cluster_request_finish("shared");
}

// ---------------------------------------------------------------------------------------------
// 6. Hand-off mode with the built-in worker.

#[test]
fn handoff_builtin_workers_take_exact_turns() {
    let b = Balancer::start(&["--cpus", "3", "--mode", "handoff"]);
    let addr = b.addr();
    wait_all_ready(&b, 3);
    let serving = ready_pids(&b);
    assert_eq!(serving.len(), 3, "{}", b.dump());
    let who = || body_pid(&get_ok(addr, "/"));
    let first: HashSet<u32> = (0..3).map(|_| who()).collect();
    assert_eq!(
        first,
        serving.iter().copied().collect(),
        "3 requests, 3 workers"
    );
    assert_round_robin(&serving, who, &b);
    assert_eq!(
        get(addr, "/sum?n=4").expect("GET /sum"),
        (200, "14\n".to_owned())
    );
    assert_no_panic(&b);
}

#[test]
fn handoff_builtin_worker_killed_is_replaced_and_sigterm_stops_cleanly() {
    let mut b = Balancer::start(&["--cpus", "2", "--mode", "handoff"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let who = || body_pid(&get_ok(addr, "/"));

    let victim = who();
    send_signal(victim, libc::SIGKILL);
    let (exit_at, exited) = b.expect_line(0, "`worker exited` for the victim", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(victim)
    });
    assert!(exited.contains("status=signal 9 (SIGKILL)"), "{exited}");
    for i in 0..10 {
        let pid = match get(addr, "/") {
            Ok((200, body)) => body_pid(&body),
            other => panic!("request {i} after the exit: {other:?}\nlog:\n{}", b.dump()),
        };
        assert_ne!(pid, victim, "request {i} reached the killed worker");
    }
    let (_, ready) = b.expect_line(exit_at, "`worker ready` for a replacement", READY, |l| {
        is_event(l, "worker ready")
    });
    let replacement = field_u32(&ready, "pid").expect("pid");
    assert!(
        wait_until(Duration::from_secs(5), || who() == replacement),
        "the replacement {replacement} never answered\n{}",
        b.dump()
    );

    b.signal(libc::SIGTERM);
    assert_clean_exit(&mut b, EXIT);
    let stopped = b
        .lines()
        .iter()
        .filter(|l| is_event(l, "worker stopped"))
        .count();
    assert_eq!(stopped, 2, "{}", b.dump());
}

// ---------------------------------------------------------------------------------------------
// 7. Hand-off loses no connection: refused or orphaned sockets go to another worker.

/// Starts 2 python hand-off workers with the given roles (see `fixtures/handoff_worker.py`).
fn python_handoff(roles: [&str; 2]) -> Balancer {
    let python = python3().to_str().expect("UTF-8 python path");
    let worker = fixture("handoff_worker.py");
    let b = Balancer::start(&[
        "--cpus", "2", "--mode", "handoff", "--", python, &worker, roles[0], roles[1],
    ]);
    b.addr();
    wait_all_ready(&b, 2);
    b
}

/// Sends `n` requests; each must be answered by the slot-1 worker `server`.
fn all_served_by(b: &Balancer, n: usize, server: u32) {
    let addr = b.addr();
    let want = format!("handoff worker slot 1 pid {server}\n");
    for i in 0..n {
        match get(addr, "/") {
            Ok((200, body)) if body == want => {}
            other => panic!(
                "request {i}: {other:?}, wanted {want:?}\nlog:\n{}",
                b.dump()
            ),
        }
    }
}

#[test]
fn handoff_connection_rejected_by_a_worker_goes_to_another() {
    let b = python_handoff(["reject", "serve"]);
    let rejecter = ready_pid_of_slot(&b, 0);
    let server = ready_pid_of_slot(&b, 1);
    all_served_by(&b, 8, server);

    // Round-robin offered some of them to slot 0 first, which refused them.
    let rejected = format!("[worker 0 pid {rejecter} stdout] rejected conn ");
    b.expect_line(0, "a `rejected conn` from slot 0", RELAY, |l| {
        l.starts_with(&rejected)
    });
    assert!(pid_alive(rejecter));
    assert!(
        !b.lines().iter().any(|l| l.contains("connection lost")),
        "{}",
        b.dump()
    );
    assert_no_panic(&b);
}

#[test]
fn handoff_connection_survives_its_worker_dying_before_accepting() {
    let b = python_handoff(["die", "serve"]);
    let first_victim = ready_pid_of_slot(&b, 0);
    let server = ready_pid_of_slot(&b, 1);
    all_served_by(&b, 6, server);

    // Slot 0 got a connection and died holding it; the master gave it to slot 1.
    let dying = format!("[worker 0 pid {first_victim} stdout] dying with conn ");
    b.expect_line(0, "slot 0's `dying with conn`", RELAY, |l| {
        l.starts_with(&dying)
    });
    let (_, exited) = b.expect_line(0, "`worker exited` for slot 0", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(first_victim)
    });
    assert!(exited.contains("status=exit code 3"), "{exited}");
    b.expect_line(0, "the re-dispatch of its connection", READY, |l| {
        is_event(
            l,
            "giving connections the worker did not take to other workers",
        ) && field_u32(l, "pid") == Some(first_victim)
    });
    assert!(
        !b.lines().iter().any(|l| l.contains("connection lost")),
        "{}",
        b.dump()
    );
    assert!(pid_alive(server));
    assert_no_panic(&b);
}

/// A hand-off worker that is busy (reading nothing, not even its channel) when a reload
/// retires it still takes the connection it was handed before: the master must not hand the
/// same socket to the replacement too. Two workers holding one client means one serves it
/// and the other keeps it open, waiting for a request that never comes, so the client does
/// not see the end of its response until that second worker gives up.
#[test]
fn handoff_connection_pending_at_a_busy_retiring_worker_is_served_once() {
    let python = python3().to_str().expect("UTF-8 python path");
    let worker = fixture("handoff_worker.py");
    let b = Balancer::start(&[
        "--cpus", "1", "--mode", "handoff", "--", python, &worker, "slow",
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let old = ready_pids(&b)[0];

    let client = thread::spawn(move || {
        let started = Instant::now();
        let response = get_with_timeout(addr, "/", Duration::from_secs(20));
        (response, started.elapsed())
    });
    let busy = format!("[worker 0 pid {old} stdout] busy with conn 0");
    b.expect_line(0, "the worker's `busy with conn 0`", RELAY, |l| l == busy);
    // The replacement starts, enters rotation, and the busy worker is retired, all while
    // it has not answered for the connection yet.
    send_signal(b.pid(), libc::SIGHUP);
    b.expect_line(0, "`rolling reload done`", READY, |l| {
        is_event(l, "rolling reload done")
    });

    let (response, elapsed) = client.join().expect("client thread");
    assert_eq!(
        response.expect("the client's response"),
        (200, format!("handoff worker slot 0 pid {old}\n")),
        "{}",
        b.dump()
    );
    // The busy worker answers after 1 s; anything near its 10 s read timeout means another
    // worker held the client open.
    assert!(
        elapsed < Duration::from_secs(5),
        "the response took {elapsed:?}\n{}",
        b.dump()
    );
    assert!(
        !b.lines()
            .iter()
            .any(|l| l.contains("busy with conn") && !l.contains(&format!("pid {old} "))),
        "the client was handed to a second worker:\n{}",
        b.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// 8. The admin endpoint.

#[test]
fn admin_endpoint_reports_workers_counts_connections_and_health() {
    let b = Balancer::start(&["--cpus", "2", "--mode", "handoff", "--admin", "127.0.0.1:0"]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    assert_ne!(admin, addr);
    wait_all_ready(&b, 2);
    let serving: HashSet<u32> = ready_pids(&b).into_iter().collect();

    let status = admin_status(admin);
    assert_eq!(
        status.get("listen").and_then(Json::as_str),
        Some(addr.to_string().as_str()),
        "{status:?}"
    );
    assert_eq!(status.get("mode").and_then(Json::as_str), Some("handoff"));
    assert_eq!(status.get("workers_wanted").and_then(Json::as_u64), Some(2));
    assert_eq!(status.get("in_rotation").and_then(Json::as_u64), Some(2));
    let workers = status
        .get("workers")
        .and_then(Json::as_array)
        .unwrap_or_else(|| panic!("no workers array: {status:?}"));
    let listed: HashSet<u32> = workers
        .iter()
        .map(|w| {
            assert_eq!(
                w.get("state").and_then(Json::as_str),
                Some("ready"),
                "{w:?}"
            );
            let pid = w.get("pid").and_then(Json::as_u64).expect("pid");
            u32::try_from(pid).expect("pid fits u32")
        })
        .collect();
    assert_eq!(listed, serving, "/status workers vs `worker ready` pids");
    let mut slots: Vec<u64> = workers
        .iter()
        .filter_map(|w| w.get("slot").and_then(Json::as_u64))
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![0, 1]);

    let metrics = || get_ok(admin, "/metrics");
    let before = metrics();
    for _ in 0..5 {
        get_ok(addr, "/");
    }
    // A connection is counted as accepted before it is handed off, and as handed off by its
    // connection task right after, which may run a moment after the worker has answered.
    let handed_off = "balancer_connections_handed_off_total";
    let settled = metric(&before, handed_off) + 5;
    assert!(
        wait_until(Duration::from_secs(5), || metric(&metrics(), handed_off)
            >= settled),
        "{handed_off} after 5 requests:\nbefore:\n{before}\nnow:\n{}",
        metrics()
    );
    let after = metrics();
    for name in ["balancer_connections_accepted_total", handed_off] {
        assert_eq!(
            metric(&after, name),
            metric(&before, name) + 5,
            "{name} after 5 requests\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    assert_eq!(metric(&after, "balancer_workers_in_rotation"), 2);
    assert_eq!(metric(&after, "balancer_worker_spawns_total"), 2);
    assert!(
        after.contains("balancer_workers{state=\"ready\"} 2"),
        "{after}"
    );
    let accepted = admin_status(admin)
        .get("connections")
        .and_then(|c| c.get("accepted"))
        .and_then(Json::as_u64);
    assert_eq!(
        accepted,
        Some(metric(&after, "balancer_connections_accepted_total"))
    );

    assert_eq!(
        get(admin, "/healthz").expect("GET /healthz"),
        (200, "ok\n".to_owned())
    );
    let (code, _) = get(admin, "/nope").expect("GET /nope");
    assert_eq!(code, 404);
    assert_no_panic(&b);
}

#[test]
fn admin_healthz_is_503_while_no_worker_is_in_rotation() {
    // `sleep` never announces ready: its worker stays `starting`, out of rotation.
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready-timeout",
        "30s",
        "--admin",
        "127.0.0.1:0",
        "--",
        "sleep",
        "30",
    ]);
    b.addr();
    let admin = admin_addr(&b);
    let (_, spawned) = b.expect_line(0, "`worker spawned`", READY, |l| {
        is_event(l, "worker spawned")
    });
    let pid = u64::from(field_u32(&spawned, "pid").expect("pid"));

    assert_eq!(
        get(admin, "/healthz").expect("GET /healthz"),
        (503, "no worker in rotation\n".to_owned())
    );
    let status = admin_status(admin);
    assert_eq!(status.get("in_rotation").and_then(Json::as_u64), Some(0));
    let workers = status
        .get("workers")
        .and_then(Json::as_array)
        .expect("workers");
    assert_eq!(workers.len(), 1, "{status:?}");
    assert_eq!(workers[0].get("pid").and_then(Json::as_u64), Some(pid));
    assert_eq!(
        workers[0].get("state").and_then(Json::as_str),
        Some("starting")
    );
}
