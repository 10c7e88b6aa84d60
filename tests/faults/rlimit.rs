//! A master started under a lowered `RLIMIT_NOFILE` (soft *and* hard: the master raises its
//! soft limit to the hard one). The shared [`Balancer`](crate::helper::Balancer) spawns the
//! binary as is, so this is a small spawn of its own: the limit is set between fork and
//! exec, the log is collected line by line, and `Drop` kills the master and every worker it
//! logged.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::helper::*;

/// A running master with a low open-file limit.
pub struct LimitedMaster {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// `(pid, start time)` of every worker logged as spawned, to kill on drop.
    workers: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl LimitedMaster {
    /// Starts `balancer --listen 127.0.0.1:0 ARGS...` with `RLIMIT_NOFILE` = `nofile` (soft
    /// and hard).
    pub fn start(nofile: u64, args: &[&str]) -> LimitedMaster {
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("BALANCER_LOG")
            .env_remove("BALANCER_LISTEN")
            .env_remove("BALANCER_CPUS")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: runs in the child between fork and exec, and only makes two system calls
        // (setrlimit, prctl), which allocate nothing and take no locks; the closure captures
        // a plain integer. PR_SET_PDEATHSIG takes the master down with the test thread if the
        // test process dies without running `Drop`.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawning the balancer binary");
        let pid = child.id();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let workers = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let (lines, workers) = (Arc::clone(&lines), Arc::clone(&workers));
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if is_event(&line, "worker spawned") {
                        let stat = field_u32(&line, "pid")
                            .and_then(|p| Some((p, proc_stat(p)?)))
                            .filter(|(_, s)| s.ppid == pid);
                        if let Some((p, s)) = stat {
                            lock(&workers).push((p, s.start_time));
                        }
                    }
                    lock(&lines).push(line);
                }
            });
        }
        LimitedMaster {
            child,
            lines,
            workers,
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// The log so far, for panic messages.
    pub fn dump(&self) -> String {
        self.lines().iter().map(|l| format!("    {l}\n")).collect()
    }

    /// Waits for a line that satisfies `pred`; panics with the log if none comes.
    pub fn expect_line(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let mut found = None;
        wait_until(timeout, || {
            found = lock(&self.lines).iter().find(|l| pred(l)).cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no {what} within {timeout:?}; log:\n{}", self.dump()))
    }

    /// The client address, from the `listening` line.
    pub fn addr(&self) -> SocketAddr {
        let line = self.expect_line("`listening`", STARTUP, |l| is_event(l, "listening"));
        field(&line, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line:?}"))
    }

    /// Whether the master has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for LimitedMaster {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // The workers die with the master (PR_SET_PDEATHSIG); any that did not are killed
        // here, if they are still the very process that was logged.
        for (pid, start) in lock(&self.workers).drain(..) {
            if proc_stat(pid).is_some_and(|s| s.start_time == start && s.is_alive()) {
                send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
