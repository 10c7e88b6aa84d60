//! systemd socket activation: the listening sockets a service manager opened for this process.
//!
//! The convention (`sd_listen_fds(3)`): the manager binds the sockets, starts the program with
//! them as descriptors 3, 4, … and sets `LISTEN_FDS` to their count and `LISTEN_PID` to the
//! program's own pid, so a child that inherits the environment does not take them as well.
//! balancer itself does not start workers this way; this is for programs started by systemd
//! (or `systemd-socket-activate`) that then run as, or next to, balancer workers.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Environment variable with the pid the descriptors are meant for.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// Environment variable with how many descriptors were passed.
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// Environment variable with their names, colon-separated (removed, not interpreted).
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first passed descriptor; the others follow it without gaps.
pub const LISTEN_FDS_START: RawFd = 3;

/// Set once the descriptors have been taken, so two callers racing cannot both own them.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Why the socket-activation variables could not be honoured.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a process id.
    #[error("{ENV_LISTEN_PID}={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a descriptor count (or one too large to be real).
    #[error("{ENV_LISTEN_FDS}={0:?} is not a descriptor count")]
    BadCount(String),
    /// A descriptor the variables promise is not open.
    #[error("{ENV_LISTEN_FDS} promises descriptor {fd}, which is not open")]
    NotOpen {
        /// The missing descriptor number.
        fd: RawFd,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Marking a passed descriptor close-on-exec failed.
    #[error("marking descriptor {fd} close-on-exec")]
    Cloexec {
        /// The descriptor number.
        fd: RawFd,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Another caller in this process has already taken the descriptors.
    #[error("the socket-activation descriptors were already taken")]
    AlreadyTaken,
}

/// Takes the descriptors passed by socket activation, in order (fd 3 first), marked
/// close-on-exec, and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
/// environment (like `sd_listen_fds(1)`), so children are not confused by them.
///
/// An empty list when this process was not socket-activated: the variables are absent, or
/// `LISTEN_PID` names another process. Call it once, early, before the program opens other
/// files (which could otherwise take the numbers 3, 4, … if nothing was passed) and before
/// threads that read the environment start.
pub fn listen_fds() -> Result<Vec<OwnedFd>, ActivationError> {
    let pid = std::env::var(ENV_LISTEN_PID).ok();
    let fds = std::env::var(ENV_LISTEN_FDS).ok();
    let count = passed_count(pid.as_deref(), fds.as_deref(), std::process::id())?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if CLAIMED.swap(true, Ordering::AcqRel) {
        return Err(ActivationError::AlreadyTaken);
    }
    // SAFETY: LISTEN_PID names this process, so the service manager passed descriptors
    // 3..3+count to us; `CLAIMED` makes this the only call that takes them, and the variables
    // are removed below so no later reader of the environment can claim them again.
    let taken = unsafe { claim(LISTEN_FDS_START, count) }?;
    for var in [ENV_LISTEN_PID, ENV_LISTEN_FDS, ENV_LISTEN_FDNAMES] {
        std::env::remove_var(var);
    }
    Ok(taken)
}

/// How many descriptors the variables say were passed to the process `own_pid`.
fn passed_count(
    pid: Option<&str>,
    fds: Option<&str>,
    own_pid: u32,
) -> Result<usize, ActivationError> {
    let Some(pid) = pid else { return Ok(0) };
    let pid_value: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
    if pid_value != own_pid {
        return Ok(0);
    }
    let Some(fds) = fds else { return Ok(0) };
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))?;
    // The last descriptor number must be representable, as sd_listen_fds checks.
    if count > (RawFd::MAX - LISTEN_FDS_START) as usize {
        return Err(ActivationError::BadCount(fds.to_owned()));
    }
    Ok(count)
}

/// Checks that descriptors `start..start + count` are all open, then owns them and marks them
/// close-on-exec. Nothing is taken unless all are open.
///
/// # Safety
///
/// The descriptors must belong to the caller alone: nothing else in the process may own or
/// close them afterwards.
unsafe fn claim(start: RawFd, count: usize) -> Result<Vec<OwnedFd>, ActivationError> {
    let range = (0..count).map(|i| start + i as RawFd);
    for fd in range.clone() {
        // Reads the flags of the number only: an fd that is not open fails with EBADF.
        fcntl(fd, FcntlArg::F_GETFD).map_err(|e| ActivationError::NotOpen {
            fd,
            source: e.into(),
        })?;
    }
    let mut taken = Vec::with_capacity(count);
    for fd in range {
        // SAFETY: `fd` is open (checked above) and the caller guarantees it is ours alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| ActivationError::Cloexec {
            fd,
            source: e.into(),
        })?;
        taken.push(owned);
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn counts_from_the_variables() {
        assert_eq!(passed_count(None, Some("2"), 10).ok(), Some(0));
        assert_eq!(passed_count(Some("10"), None, 10).ok(), Some(0));
        assert_eq!(passed_count(Some("11"), Some("2"), 10).ok(), Some(0));
        assert_eq!(passed_count(Some(" 10 "), Some("2"), 10).ok(), Some(2));
        assert!(matches!(
            passed_count(Some("ten"), Some("2"), 10),
            Err(ActivationError::BadPid(_))
        ));
        assert!(matches!(
            passed_count(Some("10"), Some("-1"), 10),
            Err(ActivationError::BadCount(_))
        ));
        assert!(matches!(
            passed_count(Some("10"), Some("99999999999"), 10),
            Err(ActivationError::BadCount(_))
        ));
    }

    #[test]
    fn claims_open_descriptors_close_on_exec() {
        // Two consecutive numbers far above what the other tests use. Another test thread
        // may take a number in between: then try again higher up, a bounded number of times.
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut base = 700;
        let a = loop {
            assert!(base < 1700, "no two consecutive free descriptors above 700");
            let a = fcntl(r.as_raw_fd(), FcntlArg::F_DUPFD(base)).expect("dup");
            let b = fcntl(w.as_raw_fd(), FcntlArg::F_DUPFD(a + 1)).expect("dup");
            if b == a + 1 {
                break a;
            }
            // Someone holds a + 1; do not claim a number we do not own.
            // SAFETY: `a` and `b` were just created by this test and are owned by nothing else.
            unsafe { drop((OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b))) };
            base = b + 1;
        };
        // SAFETY: `a` and `a + 1` were just created by this test and nothing else owns them.
        let taken = unsafe { claim(a, 2) }.expect("claim");
        assert_eq!(taken.len(), 2);
        for fd in &taken {
            let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).expect("flags");
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
        let numbers: Vec<RawFd> = taken.into_iter().map(IntoRawFd::into_raw_fd).collect();
        assert_eq!(numbers, vec![a, a + 1]);
        // SAFETY: taken back from the OwnedFds above; closed exactly once here.
        unsafe { drop((OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(a + 1))) };
    }

    #[test]
    fn a_closed_descriptor_is_an_error_and_nothing_is_taken() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let a = fcntl(r.as_raw_fd(), FcntlArg::F_DUPFD(800)).expect("dup");
        // SAFETY: `a` was just created by this test; it is closed here, once.
        unsafe { drop(OwnedFd::from_raw_fd(a)) };
        // SAFETY: nothing is taken when a descriptor is missing (that is what is tested), and
        // `a` is closed, so no owner can be disturbed.
        let err = unsafe { claim(a, 1) }.expect_err("closed");
        assert!(matches!(err, ActivationError::NotOpen { fd, .. } if fd == a));
    }
}
