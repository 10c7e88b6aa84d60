//! Item 11: what a new user sees at start-up. `--listen` takes a host name; when no worker
//! ever becomes ready, the error names the line that explains it.

use std::time::Duration;

use crate::helper::*;

/// How long a crashing worker's first failures take: a Node start-up or a shell, plus the
/// backoff (100, 200, 400 ms, ...), on a busy machine.
const FAILURES: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing to drain may take.
const EXIT: Duration = Duration::from_secs(15);

/// The `no worker has become ready yet` lines of the first `n` failures.
fn summaries(b: &Balancer, n: usize) -> Vec<String> {
    let mut from = 0;
    (0..n)
        .map(|i| {
            let (at, line) = b.expect_line(from, &format!("summary {i}"), FAILURES, |l| {
                is_event(l, "no worker has become ready yet")
            });
            from = at + 1;
            line
        })
        .collect()
}

/// The `last_stderr` of a summary line: the rest of the line, unquoted (the value may hold
/// spaces).
fn last_stderr(line: &str) -> &str {
    let value = line.split_once(" last_stderr=").map_or("", |(_, v)| v);
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

fn stop(mut b: Balancer) {
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}

#[test]
fn listen_accepts_a_host_name() {
    let b = Balancer::start_exact(&["--listen", "localhost:0", "--cpus", "1"]);
    let addr = b.addr();
    assert!(addr.ip().is_loopback(), "localhost bound as {addr}");
    assert_ne!(addr.port(), 0);
    let (_, resolved) = b.expect_line(0, "the resolved --listen", STARTUP, |l| {
        is_event(l, "--listen resolved")
    });
    assert_eq!(field(&resolved, "name"), Some("localhost:0"), "{resolved}");
    assert!(
        field(&resolved, "listening").is_some_and(|a| a.contains(&addr.ip().to_string())),
        "{resolved}"
    );
    wait_all_ready(&b, 1);
    let body = get_ok(addr, "/");
    assert!(body.starts_with("child worker run"), "{body:?}");
    stop(b);
}

#[test]
fn listen_with_an_unknown_host_name_is_one_clear_error() {
    let mut b = Balancer::start_exact(&["--listen", "no-such-host.invalid:8080"]);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(1), "{exit:?}");
    let lines: Vec<String> = b.lines().into_iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(
        lines[0].starts_with("balancer: error: --listen \"no-such-host.invalid:8080\""),
        "{lines:?}"
    );
    assert!(!b.worker_pids().iter().any(|_| true), "no worker spawned");
}

#[test]
fn summary_names_a_node_syntax_error() {
    let dir = TempDir::new("syntax");
    let script = dir.path().join("worker.js");
    std::fs::write(
        &script,
        "const http = require('http');\nhttp.createServer((req, res) => {\n  res.end('x';\n}).listen(0);\n",
    )
    .expect("writing the script");
    let b = Balancer::start(&["--cpus", "1", "--", "node", script.to_str().expect("UTF-8")]);
    b.addr();
    for line in summaries(&b, 3) {
        assert!(
            last_stderr(&line).starts_with("SyntaxError: "),
            "{line}\nlog:\n{}",
            b.dump()
        );
    }
    stop(b);
}

#[test]
fn summary_waits_for_the_end_of_the_workers_output() {
    // The last line comes a moment after the worker is reaped (from a process it started,
    // on the same stderr): the summary must wait for the end of the output, not read what
    // the relay happened to have copied when the exit was noticed.
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--",
        "sh",
        "-c",
        "seq 1 300 >&2; (sleep 0.05; echo 'fatal: cannot open the database' >&2) & exit 3",
    ]);
    b.addr();
    for line in summaries(&b, 4) {
        assert_eq!(
            last_stderr(&line),
            "fatal: cannot open the database",
            "{line}"
        );
    }
    stop(b);
}

#[test]
fn summary_says_output_is_ignored() {
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--worker-output",
        "ignore",
        "--",
        "sh",
        "-c",
        "echo 'fatal: no config' >&2; exit 3",
    ]);
    b.addr();
    for line in summaries(&b, 2) {
        assert!(
            last_stderr(&line).contains("--worker-output ignore"),
            "{line}"
        );
    }
    stop(b);
}
