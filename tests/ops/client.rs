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

/// Pids in the rows of a `balancer status` table (the second column; the summary line and
/// the header are skipped).
fn table_pids(table: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = table
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn unix_admin_socket_is_0600_serves_status_and_reload_and_is_removed_at_exit() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = TempDir::new("ops-unix-admin");
    let sock = dir.path().join("admin.sock");
    // A socket file left by a master that was killed: replaced, not refused.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("a stale socket"));
    let sock_arg = sock.display().to_string();
    let mut b = Balancer::start(&["--cpus", "2", "--admin", &sock_arg]);
    b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening") && field(l, "addr") == Some(sock_arg.as_str())
    });
    let meta = std::fs::symlink_metadata(&sock).expect("the admin socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{meta:?}");
    wait_all_ready(&b, 2);

    // A second master on the same socket is refused; the first keeps it.
    let mut second = Balancer::start(&["--cpus", "1", "--admin", &sock_arg]);
    let status = second.expect_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", second.dump());
    assert!(
        second
            .lines()
            .iter()
            .any(|l| l.contains("another master is serving on")),
        "{}",
        second.dump()
    );

    let run = run_client(&["status", "--admin", &sock_arg]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let mut serving = ready_pids(&b);
    serving.sort_unstable();
    assert_eq!(table_pids(&run.stdout), serving, "{}", run.stdout);
    assert!(
        run.stdout
            .lines()
            .nth(1)
            .is_some_and(|h| h.starts_with("SLOT  PID")),
        "{}",
        run.stdout
    );
    let json = run_client(&["status", "--json", "--admin", &sock_arg]);
    assert_eq!(json.code, Some(0), "{json:?}");
    assert!(json.stdout.trim_start().starts_with('{') && json.stdout.contains("\"workers\""));

    // No token needed on the socket: its mode is the check.
    let run = run_client(&["reload", "--admin", &sock_arg]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.trim(), "rolling reload requested", "{run:?}");
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });
    let table = run_client(&["status", "--admin", &sock_arg]).stdout;
    let now = table_pids(&table);
    assert_eq!(now.len(), 2, "{table}");
    assert!(
        now.iter().all(|p| !serving.contains(p)),
        "reload left old workers {serving:?}: {table}"
    );
    assert!(table.contains("retired"), "last exit shown: {table}");

    b.signal(libc::SIGTERM);
    b.expect_exit(EXIT_TIMEOUT);
    assert!(!sock.exists(), "the admin socket outlived the master");
}

/// How long a graceful stop with nothing to drain may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn tcp_admin_changes_need_the_token_and_reads_do_not() {
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--admin-token",
        "s3cret-token",
    ]);
    let admin = admin_addr(&b).to_string();
    wait_all_ready(&b, 1);
    let run = run_client(&["reload", "--admin", &admin]);
    assert_one_error_line(&run, "401 Unauthorized");
    let run = run_client(&["reload", "--admin", &admin, "--admin-token", "s3cret-tokex"]);
    assert_one_error_line(&run, "401 Unauthorized");
    let run = run_client(&["status", "--admin", &admin]);
    assert_eq!(run.code, Some(0), "reads need no token: {run:?}");
    assert!(
        !b.lines()
            .iter()
            .any(|l| is_event(l, "admin: rolling reload requested")),
        "a refused reload ran:\n{}",
        b.dump()
    );
    let run = run_client(&["reload", "--admin", &admin, "--admin-token", "s3cret-token"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });

    // Without a token on the master, changes over TCP are refused outright.
    let plain = Balancer::start(&["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&plain).to_string();
    let run = run_client(&["reload", "--admin", &admin, "--admin-token", "anything"]);
    assert_one_error_line(&run, "403 Forbidden");
}

#[test]
fn non_loopback_tcp_admin_without_a_token_is_refused_at_start() {
    let mut b = Balancer::start(&["--cpus", "1", "--admin", "0.0.0.0:0"]);
    let status = b.expect_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", b.dump());
    let lines = b.lines();
    assert_eq!(lines.len(), 1, "one error line:\n{}", b.dump());
    assert!(
        lines[0].starts_with("balancer: error: --admin 0.0.0.0:0 is reachable from other machines"),
        "{}",
        b.dump()
    );
    assert!(!lines.iter().any(|l| is_event(l, "listening")));
}

/// The table has a row per remote `--upstream` backend after the workers' rows, with the
/// master's real state of it: its address, `up` once its first check passed, and later
/// `down` with the reason once its checks fail.
#[test]
fn status_table_shows_remote_upstream_rows() {
    let dir = TempDir::new("ops-client-upstreams");
    let sock = dir.path().join("admin.sock").display().to_string();
    // A remote backend: a listener whose backlog completes the TCP checks.
    let remote = std::net::TcpListener::bind("127.0.0.1:0").expect("a remote backend");
    let remote_addr = remote.local_addr().expect("its address").to_string();
    let args = [
        "--cpus",
        "1",
        "--upstream",
        remote_addr.as_str(),
        "--health-check",
        "tcp",
        "--health-interval",
        "200ms",
        "--health-fall",
        "1",
        "--admin",
        sock.as_str(),
    ];
    let b = Balancer::start(&args);
    b.addr();
    wait_all_ready(&b, 1);
    b.expect_line(0, "`upstream backend up`", READY_TIMEOUT, |l| {
        is_event(l, "upstream backend up")
    });
    let remote_row = |table: &str| -> Vec<String> {
        table
            .lines()
            .skip_while(|l| !l.starts_with("UPSTREAM"))
            .find(|l| l.contains(&remote_addr))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_else(|| panic!("no row for {remote_addr}:\n{table}"))
    };
    let run = run_client(&["status", "--admin", &sock]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let mut serving = ready_pids(&b);
    serving.sort_unstable();
    assert_eq!(table_pids(&run.stdout), serving, "{}", run.stdout);
    let row = remote_row(&run.stdout);
    assert_eq!(row[1], remote_addr, "{}", run.stdout);
    assert_eq!(row[2], "up", "{}", run.stdout);

    drop(remote);
    b.expect_line(0, "`upstream backend down`", READY_TIMEOUT, |l| {
        is_event(l, "upstream backend down")
    });
    let table = run_client(&["status", "--admin", &sock]).stdout;
    let row = remote_row(&table);
    assert_eq!(row[2], "down", "{table}");
    assert!(table.contains("health checks failing"), "{table}");
}
