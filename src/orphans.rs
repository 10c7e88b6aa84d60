//! Processes the workers started that outlived them: the master is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so they are re-parented to it instead of to init, and here it
//! signals and reaps them. "Workers never outlive the master" holds for everything a worker
//! started: children in its process group, children in sessions of their own, daemons.
//!
//! Hand-written because no crate does this: it sits between tokio's own child handling and
//! the kernel. tokio reaps the workers it spawned itself (by pidfd), so the master must never
//! install a SIGCHLD handler nor call `waitpid(-1)`, which would steal those exit statuses.
//! Instead [`Orphans`] knows the pids the instances reap (registered right after spawn, on
//! the supervisor's thread, before anything here can run), lists the master's children from
//! `/proc`, and `waitpid`s only the others, by pid: the adopted ones.
//!
//! A process that is our unreaped child cannot have its pid reused, so signalling it by pid is
//! safe; its process group cannot vanish while it is in it, so `killpg` on its group is too.

use std::collections::HashSet;
use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// How long processes a worker left behind get after SIGTERM before SIGKILL. Short: their
/// worker is gone, and a stop or a reload waits for them.
pub const LEFTOVER_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// After SIGKILL, how long to wait for the last of them to be reaped (and for their own
/// children, re-parented to the master as they die, to be found and killed too).
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two looks at the master's children while waiting for leftovers to exit.
const POLL: Duration = Duration::from_millis(20);

/// Makes the master a child subreaper: orphans among its descendants become its children.
/// Call before the first worker is spawned.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes integers only and touches no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A child of the master that no instance reaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Adopted {
    pid: i32,
    /// Its process group (a dead worker's pid for a child left in the worker's group).
    pgid: i32,
    /// Exited, waiting to be reaped.
    zombie: bool,
}

/// The master's adopted children, told apart from the workers the instances reap.
#[derive(Debug, Default)]
pub struct Orphans {
    /// Pids of the worker processes their instances wait for (tokio children, unreaped). A
    /// worker's process group has its pid as id, so these are also the live workers' groups.
    workers: Mutex<HashSet<u32>>,
}

impl Orphans {
    /// A worker process was spawned: its instance reaps it, never this module. Call on the
    /// supervisor's thread right after the spawn, before any await.
    pub fn started(&self, pid: u32) {
        self.lock().insert(pid);
    }

    /// The worker process `pid` was reaped by its instance.
    pub fn reaped(&self, pid: u32) {
        self.lock().remove(&pid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The master's children that are not workers.
    fn adopted(&self) -> Vec<Adopted> {
        let workers = self.lock().clone();
        children()
            .into_iter()
            .filter(|pid| u32::try_from(*pid).is_ok_and(|p| !workers.contains(&p)))
            .filter_map(stat)
            .collect()
    }

    /// Reaps adopted children that have exited (never a worker: those are tokio's). Returns
    /// how many were reaped.
    pub fn reap_exited(&self) -> usize {
        self.adopted()
            .into_iter()
            .filter(|a| a.zombie && reap(a.pid))
            .count()
    }

    /// Stops what dead workers left behind: every adopted child outside the process groups
    /// of live workers (a child left in a dead worker's group, one in a session of its own,
    /// a daemon); SIGTERM first, SIGKILL after `patience` (at once with `Duration::ZERO`);
    /// reaps them. Children of theirs that are re-parented to the master as they die are
    /// stopped too. `group` is the process group of the worker that just ended: it is
    /// signalled as a whole (SIGKILL too, although its leader is dead). Returns how many
    /// processes were stopped. A live worker's own children stay: they are in its group.
    pub async fn stop_leftovers(&self, group: Option<u32>, patience: Duration) -> usize {
        let group = group.and_then(|g| i32::try_from(g).ok()).filter(|&g| g > 1);
        let mut found: HashSet<i32> = HashSet::new();
        let mut termed: HashSet<i32> = HashSet::new();
        let mut killing = patience.is_zero();
        let term_until = tokio::time::Instant::now() + patience;
        let kill_until = term_until + KILL_TIMEOUT;
        loop {
            let now = self.leftovers();
            if now.is_empty() {
                break;
            }
            for a in &now {
                found.insert(a.pid);
                if a.zombie {
                    reap(a.pid);
                } else if killing {
                    signal(a, group, Signal::SIGKILL);
                } else if termed.insert(a.pid) {
                    signal(a, group, Signal::SIGTERM);
                    signal(a, group, Signal::SIGCONT);
                }
            }
            let t = tokio::time::Instant::now();
            if !killing && t >= term_until {
                tracing::warn!(
                    leftovers = now.iter().filter(|a| !a.zombie).count(),
                    timeout = ?patience,
                    "processes left behind by a worker ignored SIGTERM; sending SIGKILL"
                );
                killing = true;
                continue;
            }
            if t >= kill_until {
                let pids: Vec<i32> = now.iter().map(|a| a.pid).collect();
                tracing::warn!(
                    ?pids,
                    "processes left behind by a worker are still not reaped; giving up on them"
                );
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        found.len()
    }

    /// Whether any adopted child is outside the process groups of live workers.
    pub fn any_leftovers(&self) -> bool {
        !self.leftovers().is_empty()
    }

    /// Adopted children outside the process groups of live workers.
    fn leftovers(&self) -> Vec<Adopted> {
        let adopted = self.adopted();
        let workers = self.lock();
        adopted
            .into_iter()
            .filter(|a| u32::try_from(a.pgid).map_or(true, |g| !workers.contains(&g)))
            .collect()
    }
}

/// Signals an adopted child by pid (which cannot be reused while it is our unreaped child),
/// and its process group when that is safe to name: a group it leads, or `group`, the group
/// of the worker that just ended, when the child is in it (a group id stays in use while it
/// has members, and every member of that group descends from that worker). Never some other
/// group it may have joined (a hostile child could join the master's own).
fn signal(a: &Adopted, group: Option<i32>, sig: Signal) {
    if a.pgid == a.pid || Some(a.pgid) == group {
        let _ = killpg(Pid::from_raw(a.pgid), sig);
    }
    let _ = kill(Pid::from_raw(a.pid), sig);
}

/// `waitpid(pid, WNOHANG)`: whether it was reaped now.
fn reap(pid: i32) -> bool {
    !matches!(
        waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
        Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_)
    )
}

/// The master's children: from each thread's `/proc/self/task/TID/children` (an orphan is
/// re-parented to one of the master's threads), or by scanning `/proc` for processes whose
/// parent is the master where that file does not exist.
fn children() -> Vec<i32> {
    let mut pids = Vec::new();
    let mut found_any = false;
    if let Ok(tasks) = fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                found_any = true;
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if found_any {
        return pids;
    }
    let me = std::process::id() as i32;
    let Ok(all) = fs::read_dir("/proc") else {
        return pids;
    };
    all.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_and_group(pid).is_some_and(|(ppid, _, _)| ppid == me))
        .collect()
}

fn stat(pid: i32) -> Option<Adopted> {
    let (_, pgid, state) = parent_and_group(pid)?;
    Some(Adopted {
        pid,
        pgid,
        zombie: state == 'Z',
    })
}

/// `(ppid, pgid, state)` from `/proc/PID/stat`.
fn parent_and_group(pid: i32) -> Option<(i32, i32, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((ppid, pgid, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat() {
        let me = std::process::id() as i32;
        let (ppid, pgid, state) = parent_and_group(me).expect("own stat");
        assert!(ppid > 0 && pgid > 0, "{ppid} {pgid}");
        assert_ne!(state, 'Z');
    }

    #[test]
    fn registered_workers_are_not_adopted() {
        let orphans = Orphans::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawning sleep");
        let pid = child.id();
        orphans.started(pid);
        assert!(orphans.adopted().iter().all(|a| a.pid != pid as i32));
        orphans.reaped(pid);
        assert!(orphans.adopted().iter().any(|a| a.pid == pid as i32));
        let _ = child.kill();
        let _ = child.wait();
    }
}
