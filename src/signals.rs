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
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT, SIGHUP, SIGTTIN and SIGTTOU.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
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
        }
    }
}
