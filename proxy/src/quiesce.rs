//! Ending tcp-path connections at a request boundary, for the master's in-place upgrade.
//!
//! An upgrade stops accepting and waits (bounded) for the proxied connections to finish
//! before it executes the new binary; new clients wait in the listen backlog meanwhile, so
//! the drain must be short. A keep-alive client's connection never finishes by itself, so
//! while quiescing a connection ends at the first request boundary the master can see
//! without parsing the protocol:
//! - it forwards no new bytes of a client that is *between exchanges*: it has spoken, and the
//!   backend has answered everything it said (the copy loop waits on [`Quiesce::resumed`]
//!   instead of reading). A request/response client sends its next request only once it has
//!   the whole answer, so that request is held back, never half-delivered;
//! - a connection whose backend owes nothing, that moved no byte either way for one
//!   [`LOOK`] and has nothing queued in the kernel towards the client, is idle and closed,
//!   as any server closes an idle keep-alive connection: the client sends its next (held)
//!   request again on a new connection, which the new image accepts.
//!
//! Without the first rule a busy keep-alive client (its next request within [`LOOK`] of
//! each answer) was never idle and held the drain for its whole bound (10 s) while new
//! clients timed out in the backlog (#16's chaos soak). A connection with a request
//! outstanding, or a response still streaming, is left to finish. So is one on which
//! nothing moved either way yet, for up to [`FIRST_BYTES`]: its client was accepted just
//! before the upgrade and is sending its first bytes (a request no client retries if its
//! fresh connection is closed under it). The limit of reading no protocol: a client that
//! goes on sending after an interim answer (`Expect: 100-continue`, a chat-like protocol)
//! is also held back at that point and ended; such a connection, if it lived longer than
//! the drain, would be cut at the exec anyway.
//!
//! One flag and one [`Notify`] for all connections: nothing is polled until an upgrade asks,
//! and a refused or failed upgrade ends the quiescing (held clients are read again), so
//! connections accepted afterwards are not cut.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::activity::Activity;

/// How long a connection must be silent, owing nothing, to count as idle while quiescing.
pub const LOOK: Duration = Duration::from_millis(25);
/// How long a connection on which nothing moved yet must be silent to count as idle while
/// quiescing. Its client sends right after its connect returns: its bytes follow by about
/// a round trip (and a scheduling delay on a loaded client), which [`LOOK`] does not cover
/// and a second does with room. A connection that stays silent holds the drain this long.
pub const FIRST_BYTES: Duration = Duration::from_secs(1);

/// How long into the quiescing a connection that is still busy says so (at debug): the one
/// that holds the drain can then be named.
pub const BUSY: Duration = Duration::from_secs(1);

/// Whether idle connections are being ended now (see the module's doc).
#[derive(Debug, Default)]
pub struct Quiesce {
    on: AtomicBool,
    changed: Notify,
}

impl Quiesce {
    /// From now, idle connections end.
    pub fn start(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Idle connections are left alone again (the upgrade did not happen).
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Whether quiescing is on now.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Whether the client behind `activity` must not be read now: quiescing is on and the
    /// client is between exchanges (see the module's doc). One atomic load when off.
    pub fn holds(&self, activity: &Activity) -> bool {
        self.is_on() && activity.between_exchanges()
    }

    /// Resolves once quiescing is off (the upgrade was refused or failed): a held client is
    /// read again.
    pub async fn resumed(&self) {
        loop {
            // Registered before the flag is read, so a `stop` between the two is not lost.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.is_on() {
                return;
            }
            changed.await;
        }
    }

    /// Resolves once quiescing is on and the connection behind `activity` is idle: its
    /// backend owes no answer, no byte moved either way for one [`LOOK`] ([`FIRST_BYTES`]
    /// while nothing ever moved) and `unsent()` (what the kernel still holds for the client)
    /// says nothing is left to deliver. If it is still busy [`BUSY`] into the quiescing,
    /// `busy` is called once (for a log line).
    pub async fn idle(&self, activity: &Activity, unsent: impl Fn() -> bool, busy: impl FnOnce()) {
        let mut busy = Some(busy);
        loop {
            // Registered before the flag is read, so a `start` between the two is not lost.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.is_on() {
                changed.await;
                continue;
            }
            let looking = tokio::time::Instant::now();
            while self.is_on() {
                let before = activity.marks();
                tokio::time::sleep(LOOK).await;
                let quiet = self.is_on() && !activity.owes() && activity.marks() == before;
                // Nothing ever moved: its client may be sending its first bytes.
                let first_bytes_due = activity.untouched() && looking.elapsed() < FIRST_BYTES;
                if quiet && !first_bytes_due && !unsent() {
                    return;
                }
                if looking.elapsed() >= BUSY {
                    if let Some(busy) = busy.take() {
                        busy();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ends_only_an_idle_connection_and_only_while_on() {
        let q = Quiesce::default();
        let a = Activity::default();
        // Off: never, however idle.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), q.idle(&a, || false, || {}))
                .await
                .is_err()
        );
        // On, but a request is outstanding: not idle.
        a.to_backend();
        q.start();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), q.idle(&a, || false, || {}))
                .await
                .is_err()
        );
        // Answered, then silent: idle within two looks.
        a.to_client();
        let started = tokio::time::Instant::now();
        q.idle(&a, || false, || {}).await;
        assert!(started.elapsed() <= LOOK * 2, "{:?}", started.elapsed());
        // Off again: left alone.
        q.stop();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), q.idle(&a, || false, || {}))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_between_exchanges_is_held_only_while_on() {
        let q = Quiesce::default();
        let a = Activity::default();
        // Nothing said yet (a new connection's first request): never held.
        q.start();
        assert!(!q.holds(&a));
        // Asked, not answered yet: the rest of the request goes on.
        a.to_backend();
        assert!(!q.holds(&a));
        // Answered: the next request waits.
        a.to_client();
        assert!(q.holds(&a));
        // The upgrade is refused: read again.
        let resumed = q.resumed();
        tokio::pin!(resumed);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), resumed.as_mut())
                .await
                .is_err()
        );
        q.stop();
        resumed.await;
        assert!(!q.holds(&a));
        // The first request read with the connect counts as having spoken.
        let early = Activity::default();
        early.sent_early();
        early.to_client();
        q.start();
        assert!(q.holds(&early));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_still_queued_for_the_client_is_not_idle_and_a_busy_one_says_so() {
        let q = Quiesce::default();
        let a = Activity::default();
        a.to_backend();
        a.to_client();
        q.start();
        let said = std::cell::Cell::new(0);
        let queued = q.idle(&a, || true, || said.set(said.get() + 1));
        assert!(tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .is_err());
        assert_eq!(said.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_spoke_gets_its_first_bytes_time() {
        let q = Quiesce::default();
        let a = Activity::default();
        q.start();
        // Nothing moved yet: not idle after a few looks, idle after FIRST_BYTES.
        assert!(tokio::time::timeout(LOOK * 4, q.idle(&a, || false, || {}))
            .await
            .is_err());
        let started = tokio::time::Instant::now();
        q.idle(&a, || false, || {}).await;
        assert!(
            started.elapsed() >= FIRST_BYTES && started.elapsed() <= FIRST_BYTES + LOOK,
            "{:?}",
            started.elapsed()
        );
        // Its request comes 100 ms in: it is served (owed), answered, then idle within two
        // looks of the answer.
        let a = Activity::default();
        let started = tokio::time::Instant::now();
        let exchange = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.to_backend();
            tokio::time::sleep(Duration::from_millis(300)).await;
            a.to_client();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = q.idle(&a, || false, || {}) => {}
            () = exchange => unreachable!(),
        }
        let after_answer = started.elapsed() - Duration::from_millis(400);
        assert!(after_answer <= LOOK * 2, "{after_answer:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_response_is_not_idle() {
        let q = Quiesce::default();
        let a = Activity::default();
        q.start();
        let stream = async {
            loop {
                a.to_client();
                tokio::time::sleep(LOOK / 5).await;
            }
        };
        tokio::select! {
            () = q.idle(&a, || false, || {}) => panic!("a streaming response was taken for idle"),
            () = stream => unreachable!(),
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
