//! `Upgrade` pass-through (WebSocket and friends): the upgrade request goes to one backend
//! like any other; when it answers 101, both connections are taken from hyper (its
//! upgrade API) and bytes are copied both ways until either side closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::header::{CONNECTION, UPGRADE};
use hyper::upgrade::OnUpgrade;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::backends::ActiveGuard;
use crate::server::Connections;

/// Whether `req` asks for an upgrade (an `Upgrade` header and `upgrade` among the
/// `Connection` options, RFC 9110 §7.8).
pub fn requested<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(UPGRADE) && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, option: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case(option))
}

/// After a 101 from the backend: waits for both sides' upgraded streams and copies
/// between them on a task in `conns` (ended at the end of the grace period like any
/// connection, or when `closed` resolves: a retired backend's `--grace` is over, as on the
/// tcp path). `active` keeps the backend's in-flight count until the copy ends.
pub(crate) fn splice<B>(
    client: OnUpgrade,
    backend: &mut Response<B>,
    conns: &Connections,
    (active, closed): (ActiveGuard, Option<WaitForCancellationFutureOwned>),
    stats: Arc<super::Http>,
) {
    let backend_side = hyper::upgrade::on(backend);
    let abort = conns.abort.clone();
    conns.tracker.spawn(async move {
        let _active = active;
        let copy = async {
            let (client, backend) = tokio::try_join!(client, backend_side)?;
            stats.stats.upgrades.fetch_add(1, Ordering::Relaxed);
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            let copied = tokio::io::copy_bidirectional(&mut client, &mut backend).await?;
            Ok::<_, SpliceError>(copied)
        };
        tokio::select! {
            _ = abort.cancelled() => tracing::debug!("upgraded connection aborted at shutdown"),
            () = until(closed) => tracing::debug!("upgraded connection closed: its backend was retired and its --grace is over"),
            done = copy => match done {
                Ok((up, down)) => tracing::debug!(to_backend = up, to_client = down, "upgraded connection done"),
                Err(e) => tracing::debug!(error = %e, "upgraded connection failed"),
            },
        }
    });
}

/// Resolves with `closed`; never without one (a local worker's connection).
async fn until(closed: Option<WaitForCancellationFutureOwned>) {
    match closed {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// Both failure kinds as one displayable error.
#[derive(Debug, thiserror::Error)]
enum SpliceError {
    #[error("upgrading: {0}")]
    Upgrade(#[from] hyper::Error),
    #[error("copying: {0}")]
    Io(#[from] std::io::Error),
}
