//! The operator subcommands against a real master: `balancer health`.

use super::*;

#[test]
fn health_exits_0_while_a_worker_is_in_rotation() {
    let b = Balancer::start(&["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&b).to_string();
    wait_all_ready(&b, 1);
    let run = run_client(&["health", "--admin", &admin]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.is_empty() && run.stdout.is_empty(), "{run:?}");
}

#[test]
fn health_fails_with_one_line_when_no_worker_is_in_rotation() {
    // `sleep` never announces ready: nothing is in rotation, /healthz is 503.
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
    let admin = admin_addr(&b).to_string();
    b.expect_line(0, "`worker spawned`", STARTUP, |l| {
        is_event(l, "worker spawned")
    });
    let run = run_client(&["health", "--admin", &admin]);
    assert_one_error_line(&run, "503 Service Unavailable no worker in rotation");
}

#[test]
fn health_fails_with_one_line_without_a_master() {
    // A port nobody listens on: bind one, note it, close it.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let run = run_client(&["health", "--admin", &free]);
    assert_one_error_line(&run, "no master at");
    let run = run_client(&["health", "--admin", "/nonexistent/balancer.sock"]);
    assert_one_error_line(&run, "no such socket");
    let run = run_client(&["health"]);
    assert_one_error_line(&run, "--admin");
    let run = run_client(&["health", "--admin", "not-an-address"]);
    assert_one_error_line(&run, "expected IP:PORT");
}
