//! The engine's timers: one lazy min-heap of "look at this connection then" entries,
//! polled through `epoll_wait`'s timeout.
//!
//! A connection keeps its own deadlines (connect, idle, response) as plain `Instant`s that
//! the copy path moves forward without touching the heap; the heap only holds the earliest
//! moment something *might* expire. When that moment comes, the connection is looked at: a
//! deadline that moved on is pushed again, one that passed fires. So a busy connection
//! costs one heap push per timeout period, not one per read, and no timer syscall at all
//! (the one `epoll_wait` of the loop is the timer). A wheel would be O(1) per entry, but
//! at a few hundred pushes per second per thread a `BinaryHeap` is simpler and as cheap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The slot and generation of a connection an entry is for (a reused slot has a new
/// generation, so an entry for its previous connection is recognised as stale).
pub(super) type Key = (u32, u32);

/// Pending looks, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl Timers {
    /// Look at `key` at `at`.
    pub(super) fn push(&mut self, at: Instant, key: Key) {
        self.heap.push(Reverse((at, key)));
    }

    /// The next entry due at or before `now`, removed.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, Key)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => {
                // Entries of closed connections stay until their time (up to the longest
                // timeout after a burst of short connections): give the memory back after.
                if self.heap.capacity() > 4096 && self.heap.len() < self.heap.capacity() / 4 {
                    self.heap.shrink_to(self.heap.len() * 2);
                }
                None
            }
        }
    }

    /// How long until the earliest entry, from `now` (`None`: no entry).
    pub(super) fn next_in(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_out_earliest_first_and_only_when_due() {
        let mut t = Timers::default();
        let now = Instant::now();
        t.push(now + Duration::from_millis(30), (3, 0));
        t.push(now + Duration::from_millis(10), (1, 0));
        t.push(now + Duration::from_millis(20), (2, 0));
        assert_eq!(t.next_in(now), Some(Duration::from_millis(10)));
        assert_eq!(t.pop_due(now), None);
        let later = now + Duration::from_millis(25);
        assert_eq!(t.pop_due(later).map(|e| e.1), Some((1, 0)));
        assert_eq!(t.pop_due(later).map(|e| e.1), Some((2, 0)));
        assert_eq!(t.pop_due(later), None);
        assert_eq!(t.next_in(later), Some(Duration::from_millis(5)));
    }
}
