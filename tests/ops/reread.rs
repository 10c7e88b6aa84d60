//! SIGHUP re-reading `--config` (issue 14): a changed `balance` and changed health settings
//! take effect without a restart; `listen` and `mode` stay as they run and are named in the
//! log line.

use std::collections::HashSet;
use std::net::TcpListener;

use super::*;

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("writing the config file");
}

/// Opens a client connection through the master and leaves it idle, then waits until the
/// admin endpoint counts it on a worker; returns the connection and that worker's pid.
fn hold_one(addr: SocketAddr, admin: SocketAddr) -> (TcpStream, u64) {
    let held = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connecting");
    let mut on = None;
    let counted = wait_until(Duration::from_secs(10), || {
        let status: serde_json::Value = match get(admin, "/status") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => return false,
        };
        on = status["workers"].as_array().and_then(|ws| {
            ws.iter()
                .find(|w| w["connections"]["active"] == 1)
                .and_then(|w| w["pid"].as_u64())
        });
        on.is_some()
    });
    assert!(counted, "the held connection was never counted on a worker");
    (held, on.expect("counted"))
}

/// Open connections the admin endpoint counts on the workers, all together.
fn active_total(admin: SocketAddr) -> Option<u64> {
    let status: serde_json::Value = match get(admin, "/status") {
        Ok((200, body)) => serde_json::from_str(&body).ok()?,
        _ => return None,
    };
    let workers = status["workers"].as_array()?;
    Some(
        workers
            .iter()
            .filter_map(|w| w["connections"]["active"].as_u64())
            .sum(),
    )
}

/// The pids that answer `n` requests in a row, each sent once the one before is no longer
/// counted as open (the client reads the whole answer a moment before the master closes
/// its side): every pick sees only the held connection.
fn answering(addr: SocketAddr, admin: SocketAddr, n: usize) -> HashSet<u32> {
    (0..n)
        .map(|_| {
            let pid = body_pid(&get_ok(addr, "/"));
            assert!(
                wait_until(Duration::from_secs(10), || active_total(admin) == Some(1)),
                "the request to {pid} stayed counted as open"
            );
            pid
        })
        .collect()
}

#[test]
fn sighup_changes_balance_at_once_and_names_listen_and_mode_as_kept() {
    let dir = TempDir::new("ops-reread-balance");
    let file = dir.path().join("balancer.toml");
    let base = "listen = \"127.0.0.1:0\"\ncpus = 2\nadmin = \"127.0.0.1:0\"\n";
    write(&file, &format!("{base}balance = \"round-robin\"\n"));
    let file_arg = file.to_str().expect("UTF-8 path");
    let b = Balancer::start_exact(&["--config", file_arg]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_all_ready(&b, 2);

    // Round robin: with a connection held on one worker, new ones still alternate.
    let (held, _) = hold_one(addr, admin);
    assert_eq!(
        answering(addr, admin, 6).len(),
        2,
        "round robin:\n{}",
        b.dump()
    );
    drop(held);

    // least-conn, and restart-only changes beside it.
    write(
        &file,
        &format!("{base}balance = \"least-conn\"\nmode = \"handoff\"\n")
            .replace("127.0.0.1:0\"\ncpus", "127.0.0.1:1\"\ncpus"),
    );
    send_signal(b.pid(), libc::SIGHUP);
    let (_, kept) = b.expect_line(0, "the restart-only line", STARTUP, |l| {
        l.contains("change only with a restart")
    });
    assert!(kept.ends_with("settings=listen, mode"), "{kept}");
    assert!(!kept.contains("balance"), "{kept}");
    let (_, changed) = b.expect_line(0, "`SIGHUP: balance changed`", STARTUP, |l| {
        is_event(l, "SIGHUP: balance changed")
    });
    assert_eq!(field(&changed, "to"), Some("LeastConn"), "{changed}");
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });

    // Least connections: every new connection avoids the worker holding one.
    let (held, busy) = hold_one(addr, admin);
    let answers = answering(addr, admin, 6);
    assert_eq!(answers.len(), 1, "least-conn: {answers:?}\n{}", b.dump());
    assert!(
        !answers.contains(&(busy as u32)),
        "the busy worker {busy} answered"
    );
    assert_eq!(b.addr(), addr, "listen is kept");
    drop(held);
    assert_no_panic(&b);
}

#[test]
fn sighup_changes_a_remote_backends_health_settings_without_a_restart() {
    let dir = TempDir::new("ops-reread-health");
    let file = dir.path().join("balancer.toml");
    // A remote backend: a listener whose backlog completes the TCP checks.
    let remote = TcpListener::bind("127.0.0.1:0").expect("a remote backend");
    let remote_addr = remote.local_addr().expect("its address").to_string();
    let base = format!(
        "listen = \"127.0.0.1:0\"\ncpus = 1\nupstream = [\"{remote_addr}\"]\nhealth-check = \"tcp\"\n"
    );
    // At these settings a dead backend would stay in rotation for 100 s.
    write(
        &file,
        &format!("{base}health-interval = \"1s\"\nhealth-fall = 100\n"),
    );
    let file_arg = file.to_str().expect("UTF-8 path");
    let b = Balancer::start_exact(&["--config", file_arg]);
    b.addr();
    b.expect_line(0, "`upstream backend up`", READY_TIMEOUT, |l| {
        is_event(l, "upstream backend up") && field(l, "addr") == Some(remote_addr.as_str())
    });

    drop(remote);
    write(
        &file,
        &format!("{base}health-interval = \"100ms\"\nhealth-fall = 1\n"),
    );
    send_signal(b.pid(), libc::SIGHUP);
    // The next check (within the old 1 s interval) uses fall 1: down in about a second.
    let (_, down) = b.expect_line(0, "`upstream backend down`", Duration::from_secs(10), |l| {
        is_event(l, "upstream backend down")
    });
    assert_eq!(field(&down, "addr"), Some(remote_addr.as_str()), "{down}");
    assert!(
        !b.lines()
            .iter()
            .any(|l| l.contains("change only with a restart")),
        "health settings are not restart-only:\n{}",
        b.dump()
    );
}

/// Accepts on `PORT` and holds every connection without answering: only the master's grace
/// ends a stop with one open.
const HOLDS: &str = r#"
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
held = []
while True:
    held.append(s.accept()[0])
"#;

#[test]
fn sighup_changes_the_grace_of_the_masters_own_stop() {
    let dir = TempDir::new("ops-reread-grace");
    let file = dir.path().join("balancer.toml");
    let python = python3().to_str().expect("UTF-8 python path");
    let base = "listen = \"127.0.0.1:0\"\ncpus = 1\nready = \"port\"\nadmin = \"127.0.0.1:0\"\n";
    write(&file, &format!("{base}grace = \"30s\"\n"));
    let file_arg = file.to_str().expect("UTF-8 path");
    let mut b = Balancer::start_exact(&["--config", file_arg, "--", python, "-c", HOLDS]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_all_ready(&b, 1);

    write(&file, &format!("{base}grace = \"1s\"\n"));
    send_signal(b.pid(), libc::SIGHUP);
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });

    // A connection the worker never answers, open when the stop starts.
    let (mut held, _) = hold_one(addr, admin);
    held.write_all(b"GET / HTTP/1.1\r\n")
        .expect("sending a partial request");
    let stopped = std::time::Instant::now();
    b.signal(libc::SIGTERM);
    let (_, line) = b.expect_line(0, "`stopping: draining connections`", STARTUP, |l| {
        is_event(l, "stopping: draining connections")
    });
    assert_eq!(field(&line, "grace"), Some("1s"), "{line}");
    let exit = b.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some(),
        "the master still drains {:?} after SIGTERM with grace 1s\n{}",
        stopped.elapsed(),
        b.dump()
    );
    drop(held);
    assert_no_panic(&b);
}

#[test]
fn sighup_names_a_changed_engine_as_kept_and_serves_on_with_the_running_one() {
    let dir = TempDir::new("ops-reread-engine");
    let file = dir.path().join("balancer.toml");
    let base = "listen = \"127.0.0.1:0\"\ncpus = 1\n";
    write(&file, &format!("{base}engine = \"tokio\"\n"));
    let file_arg = file.to_str().expect("UTF-8 path");
    let b = Balancer::start_exact(&["--config", file_arg]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    get_ok(addr, "/");

    // The proxy threads run the tokio engine's loops: an epoll engine needs a restart.
    write(&file, &format!("{base}engine = \"epoll\"\n"));
    send_signal(b.pid(), libc::SIGHUP);
    b.expect_line(0, "`SIGHUP: configuration re-read`", STARTUP, |l| {
        is_event(l, "SIGHUP: configuration re-read")
    });
    // Logged before the re-read line, so it is there by now if at all.
    let kept = b
        .lines()
        .into_iter()
        .find(|l| l.contains("change only with a restart"));
    let kept = kept
        .unwrap_or_else(|| panic!("a changed engine was ignored without a word:\n{}", b.dump()));
    assert!(kept.ends_with("settings=engine"), "{kept}");
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });
    get_ok(addr, "/");
    assert_no_panic(&b);
}
