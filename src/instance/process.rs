//! A worker's process as its instance waits for it: one this master image spawned (a
//! `tokio::process::Child`), or one it adopted after an in-place upgrade (see
//! `crate::upgrade`). An adopted worker is still the master's child (same pid across the
//! exec), but no `Child` exists for it in the new image, so it is waited for through a pidfd:
//! `pidfd_open` once, readiness of the fd on exit, then `waitid(P_PIDFD)` reaps exactly that
//! process. Never `waitpid(-1)` and never a SIGCHLD handler: those would steal the exit
//! statuses of tokio's own children.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use tokio::io::unix::AsyncFd;
use tokio::process::Child;

/// The process behind one instance.
#[derive(Debug)]
pub(super) enum Process {
    /// Spawned by this image; dropping it kills the worker (`kill_on_drop`).
    Spawned(Child),
    /// Carried across an upgrade.
    Adopted(Adopted),
}

impl Process {
    /// Waits for the process to exit and reaps it. Cancel-safe: the reap is one system call
    /// made only once the process has exited.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Self::Spawned(child) => child.wait().await,
            Self::Adopted(a) => a.wait().await,
        }
    }

    /// Reaps the process if it has exited; `None` while it runs.
    pub(super) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self {
            Self::Spawned(child) => child.try_wait(),
            Self::Adopted(a) => a.try_wait(),
        }
    }
}

/// A worker this image did not spawn: its pid and a pidfd to it.
#[derive(Debug)]
pub(super) struct Adopted {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// Its exit status once reaped (the pid may then belong to another process).
    status: Option<ExitStatus>,
}

impl Adopted {
    /// Opens a pidfd to `pid`, which must be this process's unreaped child (an exited one
    /// that nobody reaped yet works too: a zombie still has its pid). Must run inside a tokio
    /// runtime.
    pub(super) fn open(pid: u32) -> io::Result<Self> {
        let raw = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or -1); no memory
        // is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // A pidfd is close-on-exec from the start (pidfd_open sets it).
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same fd for as long
        // as the AsyncFd lives.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            pid,
            pidfd,
            status: None,
        })
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            // Readable once the process has exited.
            let mut guard = self.pidfd.readable().await?;
            guard.clear_ready();
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        let raw = match waitid(Id::PIDFd(self.pidfd.get_ref().as_fd()), flags) {
            Ok(WaitStatus::Exited(_, code)) => (code & 0xff) << 8,
            Ok(WaitStatus::Signaled(_, sig, core)) => sig as i32 | if core { 0x80 } else { 0 },
            Ok(_) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(io::Error::from(e)),
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(Some(status))
    }
}

impl Drop for Adopted {
    /// The same last safety net as `kill_on_drop` for a spawned worker: an instance that
    /// ends without reaping its process kills it rather than leave it unsupervised.
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            crate::child::signal(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_adopted_child_is_waited_for_by_pidfd() {
        // A std child, so that no tokio reaper knows of it: only the pidfd can reap it (the
        // std handle is never waited on, so it cannot steal the status).
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawning sh");
        let mut adopted = Adopted::open(child.id()).expect("pidfd_open");
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), adopted.wait())
            .await
            .expect("sh exits at once")
            .expect("reaped");
        assert_eq!(status.code(), Some(7));
        assert_eq!(
            adopted.try_wait().ok().flatten().and_then(|s| s.code()),
            Some(7)
        );
    }
}
