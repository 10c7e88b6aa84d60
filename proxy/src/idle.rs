//! Idle detection for a proxied connection without a timer per read: the copy loop sets a
//! flag on every transfer, and one watcher per connection wakes every half timeout to see
//! whether the flag was set since its last look.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Resolves once no bytes moved for `timeout` (detected between 1× and 1.5× `timeout`);
/// never resolves when `timeout` is `None`.
pub async fn idle(moved: &AtomicBool, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let half = timeout / 2;
    let mut quiet_looks = 0;
    loop {
        tokio::time::sleep(half).await;
        if moved.swap(false, Ordering::Relaxed) {
            quiet_looks = 0;
        } else {
            quiet_looks += 1;
            if quiet_looks >= 2 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_silence() {
        let moved = AtomicBool::new(false);
        let started = tokio::time::Instant::now();
        idle(&moved, Some(Duration::from_secs(10))).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let started = tokio::time::Instant::now();
        let activity = async {
            // Bytes move at 4 s and 9 s; then silence.
            tokio::time::sleep(Duration::from_secs(4)).await;
            moved.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(5)).await;
            moved.store(true, Ordering::Relaxed);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = idle(&moved, Some(Duration::from_secs(10))) => {}
            _ = activity => unreachable!(),
        }
        // Looks at 5, 10 (both saw activity), 15, 20 (quiet): closed at 20 s.
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }
}
