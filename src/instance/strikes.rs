//! Protocol strikes: malformed or over-long lines, impossible ports, a port that fails
//! admission, uninvited descriptors and floods each count one; at [`MAX_STRIKES`] the worker
//! is replaced. Unknown message types are not strikes (protocols grow).

use std::time::{Duration, Instant};

/// Protocol violations (malformed lines, impossible ports, floods) a worker may commit
/// before it is replaced. High enough that a chatty but honest worker is never hit.
const MAX_STRIKES: u32 = 20;
/// More messages than this in one second is a flood: one strike per such second.
const FLOOD_PER_SECOND: u32 = 1000;

/// Protocol violations of one worker, plus a message-rate window to detect floods.
#[derive(Debug)]
pub(super) struct Strikes {
    /// Strikes so far.
    pub(super) count: u32,
    /// When uninvited descriptors were last counted as a strike.
    last_uninvited: Option<Instant>,
    window: Instant,
    in_window: u32,
}

impl Default for Strikes {
    fn default() -> Self {
        Self {
            count: 0,
            last_uninvited: None,
            window: Instant::now(),
            in_window: 0,
        }
    }
}

impl Strikes {
    pub(super) fn add(&mut self, slot: usize, pid: u32, what: &str) {
        self.count += 1;
        tracing::warn!(slot, pid, strikes = self.count, "ipc: {what}; ignored");
    }

    /// Descriptors the worker sent that no message asked for (already closed): one strike
    /// and one log line per second in which it happened, however many there were.
    pub(super) fn uninvited(&mut self, slot: usize, pid: u32, closed: usize) {
        if closed == 0 {
            return;
        }
        let now = Instant::now();
        if self
            .last_uninvited
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_uninvited = Some(now);
            self.add(
                slot,
                pid,
                &format!("{closed} file descriptor(s) sent uninvited, closed"),
            );
        }
    }

    pub(super) fn message(&mut self, slot: usize, pid: u32) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window == FLOOD_PER_SECOND {
            self.count += 1;
            tracing::warn!(
                slot,
                pid,
                strikes = self.count,
                "ipc: more than {FLOOD_PER_SECOND} messages in a second"
            );
        }
    }

    /// Whether the worker has committed enough violations to be replaced.
    pub(super) fn exceeded(&self) -> bool {
        self.count >= MAX_STRIKES
    }
}
