//! When a request is sent again, as a tower retry [`Policy`] (the shape of linkerd2-proxy's
//! retry policies and tower's `retry::Policy`): a backend that failed before answering (or
//! was retired, its `--grace` over, before answering) is retried for idempotent methods
//! only, at most `--`[`MAX_REPLAYS`] times; a body too large to keep for a replay, or one
//! the client failed to send, is never retried. Each retry adds the failed backend to the
//! request's [`Tried`] so the next pick skips it; the pick runs out when every backend was
//! tried. (A refused or timed-out connect is not this policy's: nothing was sent, and
//! [`Balance`](super::client::Balance) picks the next backend itself with the request
//! still in hand.)
//!
//! tower's `Retry` asks for a copy of every request before sending it, whether it may be
//! retried or not; [`Replay::clone_request`] makes one only when a replay can follow
//! (an idempotent method, replays left, a replayable body): copying the `HeaderMap` was
//! ≈900 instructions per request (bench/NOTES.md).
//!
//! [`MAX_REPLAYS`]: super::MAX_REPLAYS

use std::future::{ready, Ready};
use std::sync::Arc;

use hyper::{Method, Request};
use tower::retry::Policy;

use super::client::{Routed, Tried};
use super::error::ProxyError;
use super::replay::ReplayBody;
use super::HttpStats;

/// The retry policy of one request (tower clones it per request).
#[derive(Debug, Clone)]
pub struct Replay {
    /// Replays left after a backend failed before answering.
    replays_left: usize,
    stats: Arc<super::Http>,
}

impl Replay {
    /// At most `max_replays` replays after early failures; connect failures are bounded
    /// by the number of backends.
    pub fn new(max_replays: usize, http: Arc<super::Http>) -> Self {
        Self {
            replays_left: max_replays,
            stats: http,
        }
    }

    fn stats(&self) -> &HttpStats {
        &self.stats.stats
    }
}

/// Methods a client expects may be applied more than once (RFC 9110 §9.2.2), less the
/// ones that change nothing anyway.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Policy<Request<ReplayBody>, Routed, ProxyError> for Replay {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        req: &mut Request<ReplayBody>,
        result: &mut Result<Routed, ProxyError>,
    ) -> Option<Ready<()>> {
        let Err(error) = result else { return None };
        if req.body().client_failed() {
            *error = if req.body().too_large() {
                ProxyError::BodyTooLarge
            } else {
                ProxyError::ClientBody
            };
            return None;
        }
        let key = match error {
            ProxyError::Backend { key, .. } | ProxyError::Retired { key, .. }
                if idempotent(req.method()) && self.replays_left > 0 =>
            {
                self.replays_left -= 1;
                *key
            }
            _ => return None,
        };
        if !req.body().replayable() {
            return None;
        }
        tracing::debug!(error = %error, "retrying on another backend");
        req.extensions_mut()
            .get_or_insert_default::<Tried>()
            .0
            .push(key);
        self.stats()
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(ready(()))
    }

    fn clone_request(&mut self, req: &Request<ReplayBody>) -> Option<Request<ReplayBody>> {
        if self.replays_left == 0 || !idempotent(req.method()) || !req.body().replayable() {
            return None;
        }
        let mut clone = Request::new(req.body().replay());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        if let Some(tried) = req.extensions().get::<Tried>() {
            clone.extensions_mut().insert(tried.clone());
        }
        Some(clone)
    }
}
