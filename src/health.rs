//! Health decisions: which check a worker gets, and when results flip it between up and
//! down (HAProxy's `rise`/`fall`: N results in a row, logged once per flip).

use std::time::Duration;

/// Which active check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Per worker: HTTP `GET /healthz` for the built-in worker, IPC ping for a worker that
    /// announced the `ping` feature, TCP connect otherwise.
    Auto,
    /// A TCP connect. Proves a socket listens, not that the process is alive: the kernel
    /// completes handshakes for a stopped process.
    Tcp,
    /// `GET <path>` expecting a 2xx status.
    Http(String),
    /// `ping`/`pong` over the IPC channel.
    Ipc,
}

/// The check a particular worker gets, [`CheckKind::Auto`] resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// See [`CheckKind::Tcp`].
    Tcp,
    /// See [`CheckKind::Http`].
    Http(String),
    /// See [`CheckKind::Ipc`].
    Ipc,
    /// No active check: only the process's exit or its channel closing count. For workers
    /// that share the master's address (shared, reuseport), where a TCP or HTTP probe would
    /// reach whichever worker the kernel picks, and that cannot answer pings.
    Liveness,
}

impl CheckKind {
    /// The check for one worker, given whether it is the built-in worker, whether it
    /// announced the `ping` feature, and whether it has an address of its own to probe.
    pub fn resolve(&self, builtin: bool, supports_ping: bool, own_address: bool) -> Check {
        if !own_address {
            return if supports_ping {
                Check::Ipc
            } else {
                Check::Liveness
            };
        }
        match self {
            Self::Auto if builtin => Check::Http("/healthz".to_owned()),
            Self::Auto if supports_ping => Check::Ipc,
            Self::Auto | Self::Tcp => Check::Tcp,
            Self::Http(path) => Check::Http(path.clone()),
            // A worker that cannot answer pings would be declared dead at once.
            Self::Ipc if supports_ping => Check::Ipc,
            Self::Ipc => Check::Tcp,
        }
    }
}

/// Active health-check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Which check.
    pub kind: CheckKind,
    /// Time between checks of one worker.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Successes in a row that bring a down worker back into rotation.
    pub rise: u32,
    /// Failures in a row that take a worker out of rotation.
    pub fall: u32,
}

/// What one result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// No change of state.
    None,
    /// The worker just went down (out of rotation).
    Down,
    /// The worker just came back up (into rotation).
    Up,
}

/// Counts results in a row and decides flips.
#[derive(Debug, Clone)]
pub struct Tally {
    up: bool,
    streak: u32,
    /// Failures in a row while down, so a worker that stays dead can be replaced.
    down_failures: u32,
    rise: u32,
    fall: u32,
}

impl Tally {
    /// A tally for a worker that starts up (it just passed admission).
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            up: true,
            streak: 0,
            down_failures: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// New thresholds (a re-read configuration, for a backend that is not replaced); the
    /// results in a row so far count towards them.
    pub fn set_limits(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Whether the worker is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Failures in a row since the worker went down (0 while up).
    pub fn down_failures(&self) -> u32 {
        self.down_failures
    }

    /// Records one result.
    pub fn record(&mut self, ok: bool) -> Flip {
        match (self.up, ok) {
            (true, true) => {
                self.streak = 0;
                Flip::None
            }
            (true, false) => {
                self.streak += 1;
                if self.streak >= self.fall {
                    self.up = false;
                    self.streak = 0;
                    self.down_failures = 0;
                    Flip::Down
                } else {
                    Flip::None
                }
            }
            (false, true) => {
                // While down, `streak` counts successes; a failure resets it.
                self.streak += 1;
                self.down_failures = 0;
                if self.streak >= self.rise {
                    self.up = true;
                    self.streak = 0;
                    Flip::Up
                } else {
                    Flip::None
                }
            }
            (false, false) => {
                self.streak = 0;
                self.down_failures += 1;
                Flip::None
            }
        }
    }

    /// Forces the worker down (passive failures); it needs `rise` successes to come back.
    pub fn force_down(&mut self) -> Flip {
        if self.up {
            self.up = false;
            self.streak = 0;
            self.down_failures = 0;
            Flip::Down
        } else {
            Flip::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_after_n_in_a_row() {
        let mut t = Tally::new(2, 3);
        assert_eq!(t.record(false), Flip::None);
        assert_eq!(t.record(false), Flip::None);
        assert_eq!(t.record(true), Flip::None); // streak broken
        assert_eq!(t.record(false), Flip::None);
        assert_eq!(t.record(false), Flip::None);
        assert_eq!(t.record(false), Flip::Down);
        assert!(!t.is_up());
        assert_eq!(t.record(false), Flip::None);
        assert_eq!(t.down_failures(), 1);
        assert_eq!(t.record(true), Flip::None);
        assert_eq!(t.down_failures(), 0);
        assert_eq!(t.record(false), Flip::None); // success streak broken
        assert_eq!(t.record(true), Flip::None);
        assert_eq!(t.record(true), Flip::Up);
        assert!(t.is_up());
    }

    #[test]
    fn forced_down_needs_rise_to_return() {
        let mut t = Tally::new(2, 3);
        assert_eq!(t.force_down(), Flip::Down);
        assert_eq!(t.force_down(), Flip::None);
        assert_eq!(t.record(true), Flip::None);
        assert_eq!(t.record(true), Flip::Up);
    }

    #[test]
    fn auto_resolution() {
        let http = |p: &str| Check::Http(p.into());
        assert_eq!(CheckKind::Auto.resolve(true, true, true), http("/healthz"));
        assert_eq!(CheckKind::Auto.resolve(false, true, true), Check::Ipc);
        assert_eq!(CheckKind::Auto.resolve(false, false, true), Check::Tcp);
        assert_eq!(CheckKind::Ipc.resolve(false, false, true), Check::Tcp);
        assert_eq!(
            CheckKind::Http("/h".into()).resolve(false, false, true),
            http("/h")
        );
        // A shared address: only IPC or liveness make sense.
        assert_eq!(
            CheckKind::Http("/h".into()).resolve(true, true, false),
            Check::Ipc
        );
        assert_eq!(CheckKind::Tcp.resolve(false, false, false), Check::Liveness);
    }
}
