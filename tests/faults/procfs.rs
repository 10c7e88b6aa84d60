//! What the fault scenarios read about the master from `/proc`: its open descriptors, its
//! children (and their states), its CPU time, and a sampler that watches the number of
//! children over a whole scenario.

use std::collections::BTreeSet;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;

/// How many descriptors `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `fd -> target` for each open descriptor of `pid`, for failure messages.
pub fn fd_list(pid: u32) -> String {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return format!("(no /proc/{pid}/fd)");
    };
    let mut fds: Vec<(u32, String)> = dir
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((n, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds.iter()
        .map(|(n, t)| format!("{n}->{t}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fewest descriptors `pid` holds over `window` (sampled every 10 ms): the steady count,
/// without the sockets of a health check or probe that happens to be open at one instant.
pub fn steady_fd_count(pid: u32, window: Duration) -> usize {
    let mut least = usize::MAX;
    let deadline = Instant::now() + window;
    loop {
        least = least.min(fd_count(pid));
        if Instant::now() >= deadline {
            return least;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `pid` holds at most `bound` descriptors; panics with the descriptors it holds
/// if that does not happen within `timeout`.
pub fn expect_fds_at_most(pid: u32, bound: usize, timeout: Duration, what: &str) -> usize {
    let mut last = 0;
    let ok = wait_until(timeout, || {
        last = fd_count(pid);
        last <= bound
    });
    assert!(
        ok,
        "{what}: the master holds {last} descriptors, more than {bound}, {timeout:?} on: {}",
        fd_list(pid)
    );
    last
}

/// The children of `pid` (every process whose parent it is), with their states.
pub fn children(pid: u32) -> Vec<(u32, char)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let s = proc_stat(p)?;
            (s.ppid == pid).then_some((p, s.state))
        })
        .collect()
}

/// The children of `pid` that are zombies (exited, not yet reaped).
pub fn zombies(pid: u32) -> Vec<u32> {
    children(pid)
        .into_iter()
        .filter(|&(_, state)| state == 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Clock ticks per second, the unit of [`ProcStat::cpu_ticks`].
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

/// The CPU time (user + system) of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = proc_stat(pid).map_or(0, |s| s.cpu_ticks);
    Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
}

/// A CPU-time measurement of one process over a stretch of wall time.
pub struct CpuWatch {
    pid: u32,
    cpu: Duration,
    wall: Instant,
}

impl CpuWatch {
    /// Starts measuring `pid` now.
    pub fn start(pid: u32) -> CpuWatch {
        CpuWatch {
            pid,
            cpu: cpu_time(pid),
            wall: Instant::now(),
        }
    }

    /// CPU time used since the start, and the share of wall time it is (1.0 = one core).
    pub fn read(&self) -> (Duration, f64) {
        let cpu = cpu_time(self.pid).saturating_sub(self.cpu);
        let wall = self.wall.elapsed().as_secs_f64().max(1e-3);
        (cpu, cpu.as_secs_f64() / wall)
    }
}

/// What [`sample_children`] saw.
#[derive(Debug, Default)]
pub struct Sampled {
    /// The most non-zombie children seen at once.
    pub max_alive: usize,
    /// The pids of those children at that moment.
    pub max_pids: Vec<u32>,
    /// How many samples were taken.
    pub samples: usize,
}

/// Pause between two samples: short enough to catch a worker that overlaps its replacement
/// for a few milliseconds.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// Every this many samples, the whole of `/proc` is scanned (a few milliseconds), in case a
/// child exists that `known` does not list yet (spawned, its log line not read yet).
const FULL_SCAN_EVERY: usize = 10;

/// Samples the live (non-zombie) children of `master` until `stop` is raised or `limit`
/// passes: each sample checks the pids `known` lists (the workers the log named, cheap to
/// check one by one), and every [`FULL_SCAN_EVERY`]th sample scans all of `/proc` too.
/// Meant to run on a scoped thread beside the scenario.
pub fn sample_children(
    master: u32,
    known: impl Fn() -> Vec<u32>,
    stop: &AtomicBool,
    limit: Duration,
) -> Sampled {
    let deadline = Instant::now() + limit;
    let mut out = Sampled::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut alive: BTreeSet<u32> = known()
            .into_iter()
            .filter(|&p| proc_stat(p).is_some_and(|s| s.ppid == master && s.is_alive()))
            .collect();
        if out.samples % FULL_SCAN_EVERY == 0 {
            alive.extend(
                children(master)
                    .into_iter()
                    .filter(|&(_, s)| s != 'Z')
                    .map(|(p, _)| p),
            );
        }
        out.samples += 1;
        if alive.len() > out.max_alive {
            out.max_alive = alive.len();
            out.max_pids = alive.into_iter().collect();
        }
        thread::sleep(SAMPLE_EVERY);
    }
    out
}

/// Raises a stop flag when dropped, so that a scoped helper thread ends even when the
/// scenario beside it panics.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
