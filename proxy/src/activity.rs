//! What a proxied connection has been doing, and the two timeouts that read it: idle (no
//! bytes either way) and response (the backend has said nothing since the client's last
//! bytes). The response wait restarts with every client read, so a client that trickles its
//! request (slowloris) is never blamed on the backend: the backend is charged only once it
//! has had everything the client sent for the whole timeout.
//!
//! No timer per read: the copy loop only sets flags ([`Activity`]), and one watcher per
//! connection ([`watch`]) looks at them [`LOOKS`] times per timeout. A look that finds a
//! flag set knows only that something happened since the last look, so a timeout fires
//! between 1 and 1 + 1/[`LOOKS`] times its length after the last activity (inclusive).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Looks per (shortest) timeout. 16: a timeout fires at most 6.25 % late (`--idle-timeout
/// 4s` closes between 4.0 and 4.25 s), and an idle connection with the default 60 s costs
/// one wake-up every 3.75 s (every 1.9 s with the default 30 s response timeout).
pub const LOOKS: u32 = 16;

/// Flags the copy loop sets as bytes move. Relaxed atomics: the copy and the watcher run
/// on the same task, one at a time; the atomics only make the shared borrow possible.
#[derive(Debug, Default)]
pub struct Activity {
    /// Bytes moved (either way) since the watcher's last look.
    moved: AtomicBool,
    /// The client has sent bytes that the backend has not answered yet.
    awaiting: AtomicBool,
    /// How many client reads there have been: tells the watcher a wait is a new one.
    waits: AtomicU32,
    /// The backend has sent at least one byte on this connection.
    answered: AtomicBool,
    /// How many backend → client moves there have been: with `waits`, tells a look that
    /// bytes moved without taking the watcher's `moved` flag from it.
    answers: AtomicU32,
    /// The client's first bytes went out with the connect (not counted in `waits`).
    early: AtomicBool,
}

impl Activity {
    /// Bytes moved client → backend: from now on the backend owes an answer.
    pub fn to_backend(&self) {
        self.moved.store(true, Ordering::Relaxed);
        self.awaiting.store(true, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes moved backend → client: the backend answered.
    pub fn to_client(&self) {
        self.moved.store(true, Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
        if self.awaiting.load(Ordering::Relaxed) {
            self.awaiting.store(false, Ordering::Relaxed);
        }
        if !self.answered.load(Ordering::Relaxed) {
            self.answered.store(true, Ordering::Relaxed);
        }
    }

    /// The client's first bytes went to the backend before the copy began (read with the
    /// connect): from now on the backend owes an answer, but the copy has read nothing, so
    /// [`Activity::untouched`] holds until it does.
    pub fn sent_early(&self) {
        self.moved.store(true, Ordering::Relaxed);
        self.awaiting.store(true, Ordering::Relaxed);
        self.early.store(true, Ordering::Relaxed);
    }

    /// Whether the client is between two exchanges: it has sent bytes, and the backend has
    /// answered since its last ones. In a request/response protocol, its next bytes are a
    /// new request (see [`crate::quiesce`]).
    pub fn between_exchanges(&self) -> bool {
        let spoke = self.waits.load(Ordering::Relaxed) > 0 || self.early.load(Ordering::Relaxed);
        spoke && self.answered() && !self.owes()
    }

    /// Bytes moved, direction not known (a buffered rest drained).
    pub fn moved(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Whether the backend ever sent a byte.
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Whether the backend owes an answer: the client sent bytes it has not answered yet.
    pub fn owes(&self) -> bool {
        self.awaiting.load(Ordering::Relaxed)
    }

    /// Counts of the moves each way so far: equal twice means nothing moved in between.
    pub fn marks(&self) -> (u32, u32) {
        (
            self.waits.load(Ordering::Relaxed),
            self.answers.load(Ordering::Relaxed),
        )
    }

    /// Whether nothing was read from either side yet: the client's bytes, if it sent any,
    /// are still in its socket, and the backend said nothing.
    pub fn untouched(&self) -> bool {
        self.waits.load(Ordering::Relaxed) == 0 && !self.answered()
    }
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No bytes either way for the idle timeout.
    Idle(Duration),
    /// The backend said nothing for the response timeout after the client's last bytes.
    Response(Duration),
}

/// Resolves when a timeout fires; never, when both are `None`.
pub async fn watch(
    activity: &Activity,
    idle: Option<Duration>,
    response: Option<Duration>,
) -> Expired {
    let shortest = match (idle, response) {
        (None, None) => return std::future::pending().await,
        (Some(i), Some(r)) => i.min(r),
        (Some(t), None) | (None, Some(t)) => t,
    };
    let look = (shortest / LOOKS).max(Duration::from_millis(1));
    // Looks in a row needed: ceil(timeout / look).
    let needed = |t: Duration| t.as_nanos().div_ceil(look.as_nanos()).max(1);
    let (idle_looks, response_looks) = (idle.map(needed), response.map(needed));
    let (mut quiet, mut waited, mut wait) = (0u128, 0u128, activity.waits.load(Ordering::Relaxed));
    // Fixed ticks, not a sleep after each look: the error must not grow with the looks.
    let mut next = tokio::time::Instant::now();
    loop {
        next += look;
        tokio::time::sleep_until(next).await;
        if activity.moved.swap(false, Ordering::Relaxed) {
            quiet = 0;
        } else {
            quiet += 1;
        }
        let now_wait = activity.waits.load(Ordering::Relaxed);
        if !activity.awaiting.load(Ordering::Relaxed) || now_wait != wait {
            // Not waiting, or a new wait began since the last look.
            waited = 0;
            wait = now_wait;
        } else {
            waited += 1;
        }
        if let (Some(limit), Some(t)) = (idle_looks, idle) {
            if quiet >= limit {
                return Expired::Idle(t);
            }
        }
        if let (Some(limit), Some(t)) = (response_looks, response) {
            if activity.awaiting.load(Ordering::Relaxed) && waited >= limit {
                return Expired::Response(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_within_a_look_of_the_last_byte() {
        let a = Activity::default();
        let started = tokio::time::Instant::now();
        let t = Duration::from_secs(4);
        assert_eq!(watch(&a, Some(t), None).await, Expired::Idle(t));
        assert_eq!(started.elapsed(), t);

        let started = tokio::time::Instant::now();
        let activity = async {
            // Bytes move at 1.1 s and 3.3 s; then silence.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            a.to_client();
            tokio::time::sleep(Duration::from_millis(2200)).await;
            a.to_client();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            e = watch(&a, Some(t), None) => assert_eq!(e, Expired::Idle(t)),
            _ = activity => unreachable!(),
        }
        // Last byte at 3.3 s: closed in [7.3, 7.55] s.
        let after_last = started.elapsed() - Duration::from_millis(3300);
        assert!(
            after_last >= t && after_last <= t + t / LOOKS,
            "{after_last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn response_timeout_counts_from_the_last_unanswered_byte() {
        let a = Activity::default();
        let idle = Some(Duration::from_secs(60));
        let response = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let client = async {
            // Request, answer at 1 s; a second request at 1.5 s, more of it at 2.5 s (the
            // wait starts again), then nothing comes back.
            a.to_backend();
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.to_client();
            tokio::time::sleep(Duration::from_millis(500)).await;
            a.to_backend();
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.to_backend();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            e = watch(&a, idle, Some(response)) => assert_eq!(e, Expired::Response(response)),
            _ = client => unreachable!(),
        }
        let since_wait = started.elapsed() - Duration::from_millis(2500);
        assert!(
            since_wait >= response && since_wait <= response + response / LOOKS,
            "{since_wait:?}"
        );
        assert!(a.answered());
    }

    #[tokio::test(start_paused = true)]
    async fn no_response_timeout_while_nothing_is_owed() {
        let a = Activity::default();
        // The backend spoke first and the client never sent: only the idle timeout applies.
        a.to_client();
        let e = watch(
            &a,
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(1)),
        )
        .await;
        assert_eq!(e, Expired::Idle(Duration::from_secs(10)));
    }
}
