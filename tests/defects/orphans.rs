//! Item 3: processes started by workers never outlive the master, nor the worker they came
//! from: children that ignore SIGTERM, in the worker's process group or in a session of their
//! own, are stopped at a stop and at a rolling reload; a worker that daemonizes is reported
//! as such and what it left is stopped.

use std::path::PathBuf;
use std::time::Duration;

use crate::helper::*;

/// How long workers may take from spawn to rotation on a busy machine.
const READY: Duration = Duration::from_secs(30);
/// A graceful stop here: 2 s for the worker that does not read `shutdown`, SIGTERM, then
/// 2 s for the leftovers that ignore it, SIGKILL; plus a loaded machine.
const EXIT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "defects",
        "fixtures",
        name,
    ]
    .iter()
    .collect();
    assert!(path.is_file(), "fixture {path:?} is missing");
    path.to_str().expect("UTF-8 path").to_owned()
}

/// The pids the fixtures write, one file per worker (`DIR/<worker pid>`: the processes it
/// started). Dropping it SIGKILLs any of them still running that is still the fixture's
/// python, so a failing test leaves nothing behind.
struct Started(TempDir);

impl Started {
    fn new(tag: &str) -> Started {
        Started(TempDir::new(tag))
    }

    fn dir(&self) -> &str {
        self.0.path().to_str().expect("UTF-8 path")
    }

    /// `(worker, its processes)` for every worker that has written its file.
    fn all(&self) -> Vec<(u32, Vec<u32>)> {
        let Ok(entries) = std::fs::read_dir(self.0.path()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(worker) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let pids: Vec<u32> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != worker)
                .collect();
            out.push((worker, pids));
        }
        out
    }

    fn of(&self, worker: u32) -> Vec<u32> {
        let found = wait_until(READY, || self.all().iter().any(|(w, _)| *w == worker));
        assert!(found, "worker {worker} never wrote its file");
        self.all()
            .into_iter()
            .find(|(w, _)| *w == worker)
            .map(|(_, p)| p)
            .unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for (_, pids) in self.all() {
            for pid in pids {
                if is_python(pid) && pid_alive(pid) {
                    send_signal(pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn is_python(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("python"))
}

fn alive(pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|&p| pid_alive(p)).collect()
}

fn python() -> &'static str {
    python3().to_str().expect("UTF-8 python path")
}

fn script_args<'a>(script: &'a str, started: &'a Started) -> Vec<&'a str> {
    vec!["--", python(), script, started.dir()]
}

/// One worker in rotation with its two children running; returns `(worker, children)`.
fn worker_with_children(b: &Balancer, started: &Started, from: usize) -> (u32, Vec<u32>) {
    let (_, line) = b.expect_line(from, "`worker ready`", READY, |l| {
        is_event(l, "worker ready")
    });
    let worker = field_u32(&line, "pid").expect("pid");
    let children = started.of(worker);
    assert_eq!(children.len(), 2, "{children:?}");
    assert_eq!(alive(&children), children, "the children run");
    let session = children[1];
    let stat = proc_stat(session).expect("stat");
    assert_ne!(stat.ppid, 1, "not yet orphaned");
    (worker, children)
}

#[test]
fn children_that_ignore_sigterm_do_not_outlive_the_master() {
    let started = Started::new("leftovers-stop");
    let script = fixture("leaves_children.py");
    let mut args = vec!["--cpus", "1"];
    args.extend(script_args(&script, &started));
    let mut b = Balancer::start(&args);
    b.addr();
    let (_, children) = worker_with_children(&b, &started, 0);

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    // Already gone when the master exits: nothing is left to init.
    assert_eq!(
        alive(&children),
        Vec::<u32>::new(),
        "children outlived the master\n{}",
        b.dump()
    );
    assert!(
        b.lines()
            .iter()
            .any(|l| is_event(l, "stopped processes the worker left behind")),
        "{}",
        b.dump()
    );
}

#[test]
fn children_that_ignore_sigterm_do_not_outlive_a_reload() {
    let started = Started::new("leftovers-reload");
    let script = fixture("leaves_children.py");
    let mut args = vec!["--cpus", "1"];
    args.extend(script_args(&script, &started));
    let mut b = Balancer::start(&args);
    b.addr();
    let (old, old_children) = worker_with_children(&b, &started, 0);

    let (from, _) = b.expect_line(0, "`all workers ready`", READY, |l| {
        is_event(l, "all workers ready")
    });
    b.signal(libc::SIGHUP);
    let (done, _) = b.expect_line(from, "`rolling reload done`", READY, |l| {
        is_event(l, "rolling reload done")
    });
    assert!(
        !pid_alive(old),
        "the old worker {old} is gone after the reload"
    );
    assert_eq!(
        alive(&old_children),
        Vec::<u32>::new(),
        "the old worker's children outlived the reload\n{}",
        b.dump()
    );
    // The new worker's children are its own, and keep running.
    let new_worker = started
        .all()
        .into_iter()
        .map(|(w, _)| w)
        .find(|&w| w != old)
        .expect("a new worker");
    let new_children = started.of(new_worker);
    assert_eq!(alive(&new_children), new_children, "{}", b.dump());
    assert!(done > from);

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert_eq!(alive(&new_children), Vec::<u32>::new(), "{}", b.dump());
}

#[test]
fn a_daemonizing_worker_is_reported_and_its_daemons_stopped() {
    let started = Started::new("daemonizes");
    let script = fixture("daemonizes.py");
    let mut args = vec!["--cpus", "1"];
    args.extend(script_args(&script, &started));
    let mut b = Balancer::start(&args);
    b.addr();
    let (_, line) = b.expect_line(0, "`worker daemonized`", READY, |l| {
        is_event(l, "worker daemonized")
    });
    let first = field_u32(&line, "pid").expect("pid");
    let daemons = started.of(first);
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    assert!(
        wait_until(Duration::from_secs(10), || alive(&daemons).is_empty()),
        "the daemon {daemons:?} of worker {first} still runs\n{}",
        b.dump()
    );
    assert!(
        !b.lines().iter().any(|l| is_event(
            l,
            "worker failed before becoming ready; respawning after backoff"
        )),
        "a daemonizing worker is not a crash\n{}",
        b.dump()
    );

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    let every: Vec<u32> = started.all().into_iter().flat_map(|(_, p)| p).collect();
    assert!(!every.is_empty());
    assert_eq!(alive(&every), Vec::<u32>::new(), "{}", b.dump());
}
