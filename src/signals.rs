//! Unix signals, mapped to what the operator means by them.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks the master to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// SIGTERM, or SIGINT from a terminal: stop accepting, drain open connections up to
    /// `--grace`, stop the workers. A second one stops at once (see `main`).
    Graceful,
    /// SIGHUP: rolling reload of the workers (re-reading `--config` first).
    Reload,
    /// SIGTTIN: one worker more (as in Gunicorn).
    ScaleUp,
    /// SIGTTOU: one worker fewer.
    ScaleDown,
    /// SIGUSR2: re-execute the master's binary in the same pid (see `crate::upgrade`).
    Upgrade,
}

impl Intent {
    /// The signal that means this (what an upgrade re-sends to the new image when it
    /// arrived during the exec).
    pub fn signal(self) -> libc::c_int {
        match self {
            Intent::Graceful => libc::SIGTERM,
            Intent::Reload => libc::SIGHUP,
            Intent::ScaleUp => libc::SIGTTIN,
            Intent::ScaleDown => libc::SIGTTOU,
            Intent::Upgrade => libc::SIGUSR2,
        }
    }
}

/// The signals the master handles. A mask that blocks them survives `execve`: blocked
/// before an in-place upgrade's exec, a signal that arrives meanwhile stays pending until
/// the new image has installed its handlers and unblocks them, instead of meeting the
/// default action (death, for all of them) in between.
const HANDLED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGUSR2,
];

/// Blocks [`HANDLED`] signals in the calling thread (the proxy threads for good, so the
/// main thread receives them; the main thread just before an upgrade's exec).
pub fn block() {
    mask(libc::SIG_BLOCK);
}

/// Unblocks [`HANDLED`] signals in the calling thread: on the main thread once the handlers
/// are installed (a master started by an upgrade inherits them blocked), and after a failed
/// exec.
pub fn unblock() {
    mask(libc::SIG_UNBLOCK);
}

fn mask(how: libc::c_int) {
    // SAFETY: the set is initialised by sigemptyset before use and lives on this stack
    // frame for both calls; pthread_sigmask only reads it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for sig in HANDLED {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// The master's signal handlers. Installed before any worker is spawned, so an early
/// SIGTERM is an orderly stop rather than the default (immediate death with orphans).
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    ttin: Signal,
    ttou: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU and SIGUSR2.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Intent {
        tokio::select! {
            _ = self.term.recv() => Intent::Graceful,
            _ = self.int.recv() => Intent::Graceful,
            _ = self.hup.recv() => Intent::Reload,
            _ = self.ttin.recv() => Intent::ScaleUp,
            _ = self.ttou.recv() => Intent::ScaleDown,
            _ = self.usr2.recv() => Intent::Upgrade,
        }
    }

    /// The signals received and not yet taken, without waiting (before an upgrade's exec,
    /// with the signals blocked: these are carried to the new image).
    pub async fn pending(&mut self) -> Vec<Intent> {
        let mut all = Vec::new();
        loop {
            let next = tokio::select! {
                biased;
                intent = self.next() => Some(intent),
                () = std::future::ready(()) => None,
            };
            match next {
                Some(intent) => all.push(intent),
                None => return all,
            }
        }
    }
}
