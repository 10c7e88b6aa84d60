//! `--user USER [--group GROUP]` (issue 14): the master binds as root, then it and every
//! worker run as the user, with no capability and no way back; the workers still serve, and
//! still die with the master. Tests and CI run as root; run as another user, a test checks
//! the one-line refusal instead.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// How long the workers may take to go after a `kill -9` of the master (PR_SET_PDEATHSIG
/// fires at once; this is only the scheduling of a loaded machine).
const GONE: Duration = Duration::from_secs(5);

/// The numbers after `NAME:` in `/proc/PID/status`.
fn status_numbers(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let prefix = format!("{name}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `who` (pid) runs as `uid`/`gid` in all four fields, with `gid` its only group, and has
/// no effective or permitted capability.
fn assert_unprivileged(pid: u32, uid: u32, gid: u32, who: &str) {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    assert_eq!(status_numbers(pid, "Uid"), [uid.as_str(); 4], "{who} {pid}");
    assert_eq!(status_numbers(pid, "Gid"), [gid.as_str(); 4], "{who} {pid}");
    assert_eq!(status_numbers(pid, "Groups"), [gid.as_str()], "{who} {pid}");
    for caps in ["CapEff", "CapPrm"] {
        assert_eq!(
            status_numbers(pid, caps),
            ["0000000000000000"],
            "{who} {pid}: {caps}"
        );
    }
}

/// The gid of `name` in /etc/group, or of user `name`'s primary group in /etc/passwd.
fn gid_in(file: &str, name: &str) -> u32 {
    let text = std::fs::read_to_string(file).expect("reading the user database");
    let field = if file.ends_with("passwd") { 3 } else { 2 };
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .and_then(|f| f.get(field)?.parse().ok())
        .unwrap_or_else(|| panic!("{name} has no gid in {file}"))
}

/// Starts `balancer --listen 127.0.0.1:0 ARGS` as root. Not root: checks that the master
/// refuses with its error as the last line and exit 1, and returns `None`.
fn start_as_root(args: &[&str]) -> Option<Balancer> {
    let mut b = Balancer::start(args);
    if euid() == 0 {
        return Some(b);
    }
    let exit = b.expect_exit(crate::EXIT);
    let last = b.lines().last().cloned().unwrap_or_default();
    assert_eq!(exit.code(), Some(1), "{}", b.dump());
    assert!(
        last.starts_with("balancer: error: dropping to --user") && last.contains("not root"),
        "{}",
        b.dump()
    );
    None
}

#[test]
fn user_nobody_runs_the_master_and_every_worker_unprivileged() {
    let dir = TempDir::new("ops-privilege");
    // Sticky and world-writable like /tmp: the dropped master may remove the socket at exit
    // only because it was handed the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = dir.path().join("admin.sock");
    let socket_arg = socket.to_str().expect("UTF-8 temp path");
    let Some(mut b) = start_as_root(&["--cpus", "2", "--user", "nobody", "--admin", socket_arg])
    else {
        return;
    };
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let gid = gid_in("/etc/passwd", "nobody");
    let (_, line) = b.expect_line(0, "`dropped privileges`", STARTUP, |l| {
        is_event(l, "dropped privileges")
    });
    assert_eq!(field(&line, "uid"), Some("65534"), "{line}");
    assert_unprivileged(b.pid(), NOBODY, gid, "the master");
    // The drop comes after both binds and before the first spawn.
    let at = |what: &str| {
        b.lines()
            .iter()
            .position(|l| is_event(l, what))
            .unwrap_or_else(|| panic!("no `{what}`:\n{}", b.dump()))
    };
    assert!(at("listening") < at("dropped privileges"), "{}", b.dump());
    assert!(at("admin endpoint listening") < at("dropped privileges"));
    assert!(
        at("dropped privileges") < at("worker spawned"),
        "{}",
        b.dump()
    );

    let workers = ready_pids(&b);
    assert_eq!(workers.len(), 2, "{}", b.dump());
    for &pid in &workers {
        assert_unprivileged(pid, NOBODY, gid, "worker");
    }
    // They serve: round-robin reaches both.
    let answers: std::collections::HashSet<u32> =
        (0..4).map(|_| body_pid(&get_ok(addr, "/"))).collect();
    assert_eq!(answers, workers.iter().copied().collect(), "{}", b.dump());

    // The admin socket belongs to the user now, still 0600, and answers.
    let meta = std::fs::metadata(&socket).expect("the admin socket");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));
    let run = run_client(&["status", "--admin", socket_arg]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains(&workers[0].to_string()), "{run:?}");

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(crate::EXIT);
    assert_eq!(exit.code(), Some(0), "{}", b.dump());
    assert!(!socket.exists(), "the dropped master removed its socket");
    assert_no_panic(&b);
}

#[test]
fn user_and_group_drop_and_kill_9_of_the_master_takes_every_worker() {
    let group = gid_in("/etc/group", "daemon");
    let Some(mut b) = start_as_root(&["--cpus", "2", "--user", "nobody", "--group", "daemon"])
    else {
        return;
    };
    b.addr();
    wait_all_ready(&b, 2);
    assert_unprivileged(b.pid(), NOBODY, group, "the master");
    let workers = ready_pids(&b);
    for &pid in &workers {
        assert_unprivileged(pid, NOBODY, group, "worker");
    }
    // The credential change cleared no worker's PR_SET_PDEATHSIG: they were forked after it.
    let spawned = b.worker_pids();
    b.signal(libc::SIGKILL);
    assert!(
        wait_until(GONE, || !spawned.iter().any(|&p| pid_alive(p))),
        "workers {:?} outlived the master by {GONE:?}",
        spawned
            .iter()
            .filter(|&&p| pid_alive(p))
            .collect::<Vec<_>>()
    );
}

#[test]
fn an_unknown_user_is_one_line_before_anything_is_bound() {
    // The test holds the port: a master that bound before checking the user would fail with
    // `binding …` instead.
    let held = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let listen = held.local_addr().expect("its address").to_string();
    let line = crate::fatal_error(&[
        "--listen",
        &listen,
        "--cpus",
        "1",
        "--user",
        "no-such-user-xyz",
    ]);
    assert!(
        line.ends_with("--user \"no-such-user-xyz\": no such user"),
        "{line}"
    );
    let line = crate::fatal_error(&[
        "--listen", &listen, "--user", "nobody", "--group", "nope-xyz",
    ]);
    assert!(
        line.ends_with("--group \"nope-xyz\": no such group"),
        "{line}"
    );
}

#[test]
fn check_judges_user_and_group() {
    let run = run_client(&["--check", "--user", "no-such-user-xyz"]);
    assert_one_error_line(&run, "--user \"no-such-user-xyz\": no such user");
    let run = run_client(&["--check", "--group", "daemon"]);
    assert_one_error_line(&run, "--group \"daemon\" needs --user");
    let run = run_client(&[
        "--check",
        "--listen",
        "127.0.0.1:80",
        "--mode",
        "reuseport",
        "--user",
        "nobody",
    ]);
    assert_one_error_line(&run, "the workers bind port 80 themselves");
    let run = run_client(&["--check", "--user", "root"]);
    assert_one_error_line(&run, "that is root");
    let run = run_client(&["--check", "--user", "nobody", "--group", "daemon"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "configuration ok\n"),
        "{run:?}"
    );
    // As config-file keys, with the line.
    let dir = TempDir::new("ops-privilege-check");
    let file = dir.path().join("balancer.toml");
    std::fs::write(&file, "cpus = 1\nuser = \"no-such-user-xyz\"\n").unwrap();
    let run = run_client(&["--check", "--config", file.to_str().expect("UTF-8 path")]);
    assert_one_error_line(
        &run,
        "line 2: key `user`: --user \"no-such-user-xyz\": no such user",
    );
}

/// A master that already runs as the user (an in-place upgrade re-executes it after the
/// drop, in the same pid) skips the drop instead of failing, and serves.
#[test]
fn a_master_already_running_as_the_user_skips_the_drop() {
    if euid() != 0 {
        // Only root can start the master as nobody; as another user, the same path runs
        // when --user names that user.
        let me = euid().to_string();
        let b = Balancer::start(&["--cpus", "1", "--user", &me]);
        b.expect_line(0, "`already running as --user`", STARTUP, |l| {
            is_event(l, "already running as --user; nothing to drop")
        });
        return;
    }
    let args = ["--listen", "127.0.0.1:0", "--cpus", "1", "--user", "nobody"];
    let b = Balancer::start_exact_as(&args, Some(NOBODY));
    let addr = b.addr();
    b.expect_line(0, "`already running as --user`", STARTUP, |l| {
        is_event(l, "already running as --user; nothing to drop")
    });
    wait_all_ready(&b, 1);
    let worker = ready_pids(&b)[0];
    // (std's `Command::uid` leaves the test's master with no supplementary group at all.)
    for pid in [b.pid(), worker] {
        assert_eq!(status_numbers(pid, "Uid"), ["65534"; 4], "{pid}");
        assert_eq!(status_numbers(pid, "CapEff"), ["0000000000000000"], "{pid}");
    }
    assert_eq!(body_pid(&get_ok(addr, "/")), worker);
    assert_no_panic(&b);
}
