//! Ending idle tcp-path connections on request, for the master's in-place upgrade.
//!
//! An upgrade stops accepting and waits (bounded) for the proxied connections to finish
//! before it executes the new binary; new clients wait in the listen backlog meanwhile. A
//! keep-alive client's connection never finishes by itself, so without this the wait lasted
//! its whole bound and new clients timed out in the backlog. While quiescing, a connection
//! whose backend owes nothing (it answered everything the client sent) and that moved no
//! byte either way for one [`LOOK`] is closed, as an idle keep-alive connection is closed by
//! any server: the client retries its next request on a new connection, which the new image
//! accepts. A connection with a request outstanding, or a response still streaming, is left
//! to finish. So is one on which nothing moved either way yet, for up to [`FIRST_BYTES`]:
//! its client was accepted just before the upgrade and is sending its first bytes (a
//! request no client retries if its fresh connection is closed under it).
//!
//! One flag and one [`Notify`] for all connections: nothing is polled until an upgrade asks,
//! and a refused or failed upgrade ends the quiescing, so connections accepted afterwards are
//! not cut.

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

    fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Resolves once quiescing is on and the connection behind `activity` is idle: its
    /// backend owes no answer and no byte moved either way for one [`LOOK`] ([`FIRST_BYTES`]
    /// while nothing ever moved).
    pub async fn idle(&self, activity: &Activity) {
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
                if quiet && !first_bytes_due {
                    return;
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
        assert!(tokio::time::timeout(Duration::from_secs(5), q.idle(&a))
            .await
            .is_err());
        // On, but a request is outstanding: not idle.
        a.to_backend();
        q.start();
        assert!(tokio::time::timeout(Duration::from_secs(5), q.idle(&a))
            .await
            .is_err());
        // Answered, then silent: idle within two looks.
        a.to_client();
        let started = tokio::time::Instant::now();
        q.idle(&a).await;
        assert!(started.elapsed() <= LOOK * 2, "{:?}", started.elapsed());
        // Off again: left alone.
        q.stop();
        assert!(tokio::time::timeout(Duration::from_secs(5), q.idle(&a))
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_spoke_gets_its_first_bytes_time() {
        let q = Quiesce::default();
        let a = Activity::default();
        q.start();
        // Nothing moved yet: not idle after a few looks, idle after FIRST_BYTES.
        assert!(tokio::time::timeout(LOOK * 4, q.idle(&a)).await.is_err());
        let started = tokio::time::Instant::now();
        q.idle(&a).await;
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
            () = q.idle(&a) => {}
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
            () = q.idle(&a) => panic!("a streaming response was taken for idle"),
            () = stream => unreachable!(),
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
