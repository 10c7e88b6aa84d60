//! Runtime scaling and SIGHUP re-reading `--config` (issue 14): SIGTTIN/SIGTTOU,
//! `balancer scale` and `POST /scale` change the worker count, a removed worker drains
//! before it stops, the count never goes below 1; a changed file is applied by the rolling
//! reload, a broken one refused.

use std::path::Path;
use std::thread;

use super::*;

/// How long a graceful stop with nothing to drain may take.
const EXIT: Duration = Duration::from_secs(15);

/// A master with a Unix admin socket in `dir`.
fn start_with_socket(dir: &TempDir, args: &[&str]) -> (Balancer, String) {
    let sock = dir.path().join("admin.sock").display().to_string();
    let mut all = vec!["--admin", sock.as_str()];
    all.extend_from_slice(args);
    let b = Balancer::start(&all);
    b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    (b, sock)
}

/// `/status` over the socket, through `balancer status --json`.
fn status_json(sock: &str) -> String {
    let run = run_client(&["status", "--json", "--admin", sock]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run.stdout
}

/// The number after `"key": ` in a JSON text (the test binary has no JSON parser).
fn json_number(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    json[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Waits until `/status` says `wanted` workers wanted, running and in rotation.
fn wait_for_count(b: &Balancer, sock: &str, wanted: u64) {
    let mut last = String::new();
    let settled = wait_until(READY_TIMEOUT, || {
        last = status_json(sock);
        ["workers_wanted", "workers_running", "in_rotation"]
            .iter()
            .all(|k| json_number(&last, k) == Some(wanted))
    });
    assert!(settled, "never {wanted} workers:\n{last}\n{}", b.dump());
}

#[test]
fn sigttin_and_sigttou_change_the_count_and_a_removed_worker_drains_first() {
    let dir = TempDir::new("ops-scale-signals");
    // Busy workers answer no health check while they compute: they must not be replaced.
    let (mut b, sock) = start_with_socket(
        &dir,
        &["--cpus", "2", "--grace", "20s", "--health-fall", "1000"],
    );
    let addr = b.addr();
    wait_all_ready(&b, 2);
    b.signal(libc::SIGTTIN);
    wait_for_count(&b, &sock, 3);

    // One slow request on each of the 3 workers (round-robin), then one worker fewer: the
    // removed one must finish its request before it stops.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(move || {
                get_with_timeout(
                    addr,
                    &format!("/sum?n={}", crate::SLOW_SUM_N),
                    READY_TIMEOUT,
                )
            })
        })
        .collect();
    // The workers log nothing per request: wait on the master's open-connection count.
    assert!(
        wait_until(READY_TIMEOUT, || json_number(&status_json(&sock), "open")
            == Some(3)),
        "3 slow requests never in flight:\n{}",
        b.dump()
    );
    b.signal(libc::SIGTTOU);
    for (i, t) in slow.into_iter().enumerate() {
        let answer = t.join().expect("request thread");
        assert!(
            matches!(answer, Ok((200, _))),
            "request {i} during the scale-down: {answer:?}\n{}",
            b.dump()
        );
    }
    wait_for_count(&b, &sock, 2);
    let lines = b.lines();
    let out = lines
        .iter()
        .position(|l| is_event(l, "worker out of rotation") && field(l, "slot") == Some("2"));
    let removed = lines
        .iter()
        .position(|l| is_event(l, "slot removed by scaling") && field(l, "slot") == Some("2"));
    assert!(
        matches!((out, removed), (Some(o), Some(r)) if o < r),
        "slot 2 must leave rotation, then be removed:\n{}",
        b.dump()
    );

    // Never below one worker.
    b.signal(libc::SIGTTOU);
    wait_for_count(&b, &sock, 1);
    b.signal(libc::SIGTTOU);
    b.expect_line(0, "`scale refused`", STARTUP, |l| {
        is_event(l, "scale refused") && l.contains("at least 1 worker")
    });
    assert_eq!(json_number(&status_json(&sock), "workers_running"), Some(1));
    assert_eq!(get_ok(addr, "/healthz"), "ok");
    b.signal(libc::SIGTERM);
    b.expect_exit(EXIT);
}

#[test]
fn balancer_scale_sets_adds_and_removes_workers() {
    let dir = TempDir::new("ops-scale-client");
    let (b, sock) = start_with_socket(&dir, &["--cpus", "1"]);
    wait_all_ready(&b, 1);
    let scale = |to: &str| run_client(&["scale", to, "--admin", &sock]);
    let run = scale("3");
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "workers 1 -> 3\n"),
        "{run:?}"
    );
    wait_for_count(&b, &sock, 3);
    let run = scale("+1");
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "workers 3 -> 4\n"),
        "{run:?}"
    );
    let run = scale("-2");
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "workers 4 -> 2\n"),
        "{run:?}"
    );
    wait_for_count(&b, &sock, 2);
    // Slot 2 again, as a new slot: no restarts carried over from the one removed.
    let run = scale("+1");
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "workers 2 -> 3\n"),
        "{run:?}"
    );
    wait_for_count(&b, &sock, 3);
    let table = run_client(&["status", "--admin", &sock]).stdout;
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("2 "))
        .unwrap_or_else(|| panic!("no slot 2: {table}"))
        .split_whitespace()
        .collect();
    assert_eq!((row[5], row[8]), ("0", "-"), "restarts, last exit: {table}");
    let run = scale("-1");
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "workers 3 -> 2\n"),
        "{run:?}"
    );
    wait_for_count(&b, &sock, 2);
    assert_one_error_line(&scale("0"), "409 Conflict cannot scale to 0");
    assert_one_error_line(&scale("-5"), "409 Conflict");
    assert_one_error_line(&scale("two"), "expected N, +K or -K");
    let table = run_client(&["status", "--admin", &sock]).stdout;
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|l| l.contains("workers 2 wanted, 2 running")),
        "{table}"
    );
}

/// A `--ready port` worker serving `dir` with python's http.server.
fn python_worker_file(listen_extra: &str, served: &Path) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\ncpus = 1\nready = \"port\"\n{listen_extra}\
         command = [\"{}\", \"-m\", \"http.server\", \"--bind\", \"127.0.0.1\", \"--directory\", \"{}\", \"{{port}}\"]\n",
        python3().display(),
        served.display()
    )
}

#[test]
fn sighup_applies_a_changed_config_file_and_refuses_a_broken_one() {
    let dir = TempDir::new("ops-sighup");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for (d, marker) in [(&one, "one"), (&two, "two")] {
        std::fs::create_dir_all(d).expect("a served directory");
        std::fs::write(d.join("marker"), marker).expect("a marker file");
    }
    let file = dir.path().join("balancer.toml");
    std::fs::write(&file, python_worker_file("", &one)).expect("config");
    let file_arg = file.display().to_string();
    let sock = dir.path().join("admin.sock").display().to_string();
    let mut b = Balancer::start_exact(&["--config", file_arg.as_str(), "--admin", &sock]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    assert_eq!(get_ok(addr, "/marker"), "one");

    // A new command (another directory) and two workers: applied by scaling and the reload;
    // a new listen address is named and left alone.
    std::fs::write(
        &file,
        python_worker_file("", &two)
            .replace("cpus = 1", "cpus = 2")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .expect("config");
    b.signal(libc::SIGHUP);
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });
    wait_for_count(&b, &sock, 2);
    for _ in 0..4 {
        assert_eq!(
            get_ok(addr, "/marker"),
            "two",
            "every worker runs the new command"
        );
    }
    assert!(
        b.lines()
            .iter()
            .any(|l| l.contains("only with a restart") && l.contains("listen")),
        "the kept listen address is named:\n{}",
        b.dump()
    );
    assert_eq!(b.addr(), addr);

    // A broken file: one error line, nothing changes.
    std::fs::write(&file, "cpus = 2\nnot a key\n").expect("config");
    let reloads_before = b
        .lines()
        .iter()
        .filter(|l| is_event(l, "rolling reload started"))
        .count();
    b.signal(libc::SIGHUP);
    let (_, refused) = b.expect_line(0, "`configuration refused`", STARTUP, |l| {
        is_event(l, "SIGHUP: configuration refused; the running one stays")
    });
    assert!(refused.contains("line 2"), "{refused}");
    assert!(b.is_running());
    let reloads_after = b
        .lines()
        .iter()
        .filter(|l| is_event(l, "rolling reload started"))
        .count();
    assert_eq!(
        reloads_before,
        reloads_after,
        "a refused file reloaded:\n{}",
        b.dump()
    );
    assert_eq!(get_ok(addr, "/marker"), "two");
    b.signal(libc::SIGTERM);
    b.expect_exit(EXIT);
}
