//! `balancer top` in a real terminal: tmux runs it in a detached 140x40 pane on a private
//! server (`tmux -L`), the test reads the screen with `capture-pane` and types with
//! `send-keys`. tmux is installed by `.ci/run`; a machine without it fails here.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// How long the view may take to show what the master says: a poll a second, a debug build
/// on a busy 2-core machine.
const SHOWN: Duration = Duration::from_secs(30);

/// How long a graceful stop with nothing left to drain may take.
const EXIT: Duration = Duration::from_secs(15);

/// A private tmux server with one session; `kill-server` on its own socket when dropped, so
/// a failed assertion leaves no tmux (nor the `top` inside it) behind, and the socket file
/// removed (tmux leaves it in /tmp/tmux-UID/).
struct Tmux {
    /// The `-L` socket name, which is also the session's name.
    name: String,
    /// The server's socket file.
    socket: Option<std::path::PathBuf>,
}

impl Tmux {
    /// Starts `sh script` in a detached `width`x`height` session.
    fn start(script: &Path, width: u16, height: u16) -> Tmux {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "balancer-top-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut tmux = Tmux { name, socket: None };
        let (w, h) = (width.to_string(), height.to_string());
        let command = format!("sh {}", script.display());
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &tmux.name,
            "-x",
            &w,
            "-y",
            &h,
            &command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        let out = tmux.run(&["display", "-p", "-t", &tmux.name, "#{socket_path}"]);
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        tmux.socket = (!path.is_empty()).then(|| path.into());
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.name)
            .args(args)
            // A test run from inside tmux must not reach the developer's server.
            .env_remove("TMUX")
            .output()
            .expect("running tmux (installed by .ci/run)")
    }

    /// The pane's text now (empty once the session has ended).
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", &self.name]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen satisfies `pred`, and returns it.
    fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let shown = wait_until(SHOWN, || {
            last = self.screen();
            pred(&last)
        });
        assert!(shown, "the view never showed {what}; last screen:\n{last}");
        last
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", &self.name])
            .status
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// The cells of the worker row whose pid is `pid`, box borders stripped.
fn worker_row(screen: &str, pid: u32) -> Option<Vec<String>> {
    let pid = pid.to_string();
    screen.lines().find_map(|l| {
        let cells: Vec<String> = l
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (cells.get(1) == Some(&pid)).then_some(cells)
    })
}

/// The header's total rate: the number before `unit` (`conn/s`, `req/s`) on the
/// `workers …` line.
fn header_rate(screen: &str, unit: &str) -> Option<u64> {
    let line = screen.lines().find(|l| l.starts_with("workers "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == unit)?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

#[test]
fn top_shows_workers_and_rates_survives_the_master_going_away_and_quits_on_q() {
    let dir = TempDir::new("ops-top");
    let sock = dir.path().join("admin.sock");
    let sock_arg = sock.display().to_string();
    let mut b = Balancer::start(&["--cpus", "2", "--admin", &sock_arg]);
    wait_all_ready(&b, 2);
    let pids = ready_pids(&b);
    let listen = b.addr();

    let (script, after) = top_script(dir.path(), &sock_arg, "q");
    let tmux = Tmux::start(&script, 140, 40);

    let screen = tmux.wait_screen("both workers' pids", |s| {
        pids.iter().all(|&p| worker_row(s, p).is_some())
    });
    assert!(
        screen.contains(&format!("listen {listen}  mode proxy  protocol tcp")),
        "{screen}"
    );
    assert!(
        screen.contains("workers 2 running / 2 wanted, 2 in rotation"),
        "{screen}"
    );
    for &pid in &pids {
        let row = worker_row(&screen, pid).unwrap_or_default();
        assert_eq!(row.get(2).map(String::as_str), Some("ready"), "{screen}");
    }

    traffic_until_counted(&tmux, listen, &pids, "conn/s");

    // The master goes away: the view says so, keeps the last rows, and keeps running.
    b.signal(libc::SIGTERM);
    b.expect_exit(EXIT);
    let screen = tmux.wait_screen("`master unreachable`", |s| {
        s.contains("master unreachable: no master at")
    });
    assert!(worker_row(&screen, pids[0]).is_some(), "{screen}");
    assert!(tmux.alive(), "top exited when the master went away");

    let out = tmux.run(&["send-keys", "-t", &tmux.name, "q"]);
    assert!(out.status.success(), "send-keys: {out:?}");
    let ended = wait_until(SHOWN, || !tmux.alive());
    assert!(ended, "top still running after q:\n{}", tmux.screen());
    assert_exited_restored(&after);
}

/// Sends requests (a connection each) to `listen` until the rows of `pids` count at least
/// 40 in their TOTAL column and the header has shown a `unit` rate above 0.
fn traffic_until_counted(tmux: &Tmux, listen: SocketAddr, pids: &[u32], unit: &str) {
    const SENT: u64 = 40;
    let mut sent = 0u64;
    let mut saw_rate = false;
    let mut last = String::new();
    let counted = wait_until(SHOWN, || {
        for _ in 0..5 {
            get_ok(listen, "/");
            sent += 1;
        }
        last = tmux.screen();
        saw_rate |= header_rate(&last, unit).is_some_and(|r| r > 0);
        let total: u64 = pids
            .iter()
            .filter_map(|&p| worker_row(&last, p)?.get(5)?.parse::<u64>().ok())
            .sum();
        sent >= SENT && total >= SENT && saw_rate
    });
    assert!(
        counted,
        "after {sent} requests the view shows (a {unit} rate above 0 seen: {saw_rate}):\n{last}"
    );
}

#[test]
fn top_counts_requests_per_second_in_http_mode() {
    // In http mode the rate is responses from /metrics and a worker's total counts requests.
    let dir = TempDir::new("ops-top-http");
    let sock = dir.path().join("admin.sock");
    let sock_arg = sock.display().to_string();
    let b = Balancer::start(&["--cpus", "2", "--protocol", "http", "--admin", &sock_arg]);
    wait_all_ready(&b, 2);
    let pids = ready_pids(&b);
    let listen = b.addr();
    let (script, after) = top_script(dir.path(), &sock_arg, "http");
    let tmux = Tmux::start(&script, 140, 40);
    let screen = tmux.wait_screen("both workers' pids", |s| {
        pids.iter().all(|&p| worker_row(s, p).is_some())
    });
    assert!(screen.contains("protocol http"), "{screen}");
    assert!(screen.contains("REQ/S"), "{screen}");
    traffic_until_counted(&tmux, listen, &pids, "req/s");
    let out = tmux.run(&["send-keys", "-t", &tmux.name, "q"]);
    assert!(out.status.success(), "send-keys: {out:?}");
    assert!(
        wait_until(SHOWN, || !tmux.alive()),
        "top still running after q"
    );
    assert_exited_restored(&after);
}

/// A script that runs `top` on `sock`, then has the same shell say how it ended and how it
/// left the terminal: its exit code, the line discipline (raw mode undone: `icanon`, `echo`
/// back) and, from tmux itself, whether the alternate screen was left and the cursor shown
/// again. Returns the script and where its report goes.
fn top_script(dir: &Path, sock: &str, tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let after = dir.join(format!("after-{tag}.txt"));
    let script = dir.join(format!("top-{tag}.sh"));
    std::fs::write(
        &script,
        format!(
            "'{BIN}' top --admin '{sock}'\n\
             echo \"rc=$?\" > '{out}'\n\
             stty -a >> '{out}'\n\
             tmux display -p 'alt=#{{alternate_on}} cursor=#{{cursor_flag}}' >> '{out}'\n",
            out = after.display()
        ),
    )
    .expect("writing the script");
    (script, after)
}

/// `top` exited 0 and left the terminal as the shell had it.
fn assert_exited_restored(after: &Path) {
    let report = std::fs::read_to_string(after).expect("the script's report after top");
    assert!(report.starts_with("rc=0\n"), "{report}");
    let words: Vec<&str> = report.split_whitespace().collect();
    for on in ["icanon", "echo", "isig", "opost"] {
        assert!(words.contains(&on), "{on} not restored:\n{report}");
    }
    assert!(report.contains("alt=0 cursor=1"), "{report}");
}

#[test]
fn top_shows_remote_upstreams_and_quits_on_escape_and_ctrl_c_too() {
    let dir = TempDir::new("ops-top-keys");
    let sock = dir.path().join("admin.sock");
    let sock_arg = sock.display().to_string();
    // A remote backend: a bound listener passes TCP checks from its backlog.
    let remote = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a remote backend");
    let remote = remote.local_addr().expect("its address").to_string();
    let b = Balancer::start(&["--cpus", "1", "--upstream", &remote, "--admin", &sock_arg]);
    wait_all_ready(&b, 1);
    let pid = ready_pids(&b)[0];
    for (tag, key) in [("esc", "Escape"), ("ctrl-c", "C-c")] {
        let (script, after) = top_script(dir.path(), &sock_arg, tag);
        let tmux = Tmux::start(&script, 120, 30);
        tmux.wait_screen("the worker's pid and the remote upstream", |s| {
            worker_row(s, pid).is_some()
                && s.contains(" remote upstreams ")
                && s.lines().any(|l| l.contains(&remote) && l.contains(" up "))
        });
        let out = tmux.run(&["send-keys", "-t", &tmux.name, key]);
        assert!(out.status.success(), "send-keys {key}: {out:?}");
        let ended = wait_until(SHOWN, || !tmux.alive());
        assert!(ended, "top still running after {key}:\n{}", tmux.screen());
        assert_exited_restored(&after);
    }
}

/// The pid of `balancer top` in the pane: the child of the pane's shell.
fn top_pid(tmux: &Tmux) -> u32 {
    let out = tmux.run(&["display", "-p", "-t", &tmux.name, "#{pane_pid}"]);
    let shell: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("tmux's pane_pid");
    let mut found = None;
    assert!(
        wait_until(SHOWN, || {
            found = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .find(|&pid| proc_stat(pid).is_some_and(|st| st.ppid == shell));
            found.is_some()
        }),
        "no child of the pane's shell {shell}"
    );
    found.unwrap_or_default()
}

#[test]
fn top_restores_the_terminal_and_exits_0_on_sigterm_and_sighup() {
    let dir = TempDir::new("ops-top-signals");
    let sock = dir.path().join("admin.sock");
    let sock_arg = sock.display().to_string();
    let b = Balancer::start(&["--cpus", "1", "--admin", &sock_arg]);
    wait_all_ready(&b, 1);
    let pid = ready_pids(&b)[0];
    // SIGTERM from a process manager or `kill`; SIGHUP is what a closed terminal sends.
    for (tag, sig) in [("term", libc::SIGTERM), ("hup", libc::SIGHUP)] {
        let (script, after) = top_script(dir.path(), &sock_arg, tag);
        let tmux = Tmux::start(&script, 120, 30);
        tmux.wait_screen("the worker's pid", |s| worker_row(s, pid).is_some());
        let top = top_pid(&tmux);
        send_signal(top, sig);
        let ended = wait_until(SHOWN, || !tmux.alive());
        assert!(
            ended,
            "top still running after signal {sig}:\n{}",
            tmux.screen()
        );
        assert_exited_restored(&after);
    }
}

#[test]
fn top_fails_with_one_line_without_a_master_or_without_a_terminal() {
    let run = run_client(&["top", "--admin", "/nonexistent/balancer.sock"]);
    assert_one_error_line(&run, "no such socket");
    let run = run_client(&["top"]);
    assert_one_error_line(&run, "--admin");

    let b = Balancer::start(&["--cpus", "1", "--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&b).to_string();
    let run = run_client(&["top", "--admin", &admin, "--interval", "1ms"]);
    assert_one_error_line(&run, "--interval");
    // Here stdout is a pipe.
    let run = run_client(&["top", "--admin", &admin]);
    assert_one_error_line(&run, "stdout is not one");
    assert!(run.stdout.is_empty(), "{run:?}");
}
