//! The backend side of the HTTP path: [`Balance`], the innermost tower service, which
//! picks a backend per request and sends the request to it over the thread's [`Pool`] of
//! keep-alive connections (HTTP/1.1 to each backend, idle ones bounded and timed out, a
//! connection that saw an error never reused).
//!
//! Each proxy thread has its own pool, so a pooled connection is always driven by the
//! thread that uses it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, Uri};

use crate::backends::{ActiveGuard, Backend};

use super::error::ProxyError;
use super::pool::{Pool, Pooled, SendError};
use super::replay::ReplayBody;
use super::Http;

/// Backends a request has been sent to and must not be sent to again (a request
/// extension, updated by the retry policy).
#[derive(Debug, Clone, Default)]
pub struct Tried(pub Vec<u64>);

/// A backend's response, with the backend it came from and its in-flight count.
#[derive(Debug)]
pub struct Routed {
    /// The response head and body.
    pub response: Response<Pooled<ReplayBody>>,
    /// The backend that answered.
    pub backend: Arc<Backend>,
    /// Counts the request in flight on `backend` until the response is done.
    pub(crate) active: ActiveGuard,
}

/// Picks a backend per request (`--balance`, skipping those in [`Tried`]) and sends the
/// request over the pool.
///
/// Cloned per request (by the stack and by tower's retry), so it is one `Arc`.
#[derive(Clone)]
pub struct Balance(Arc<Inner>);

struct Inner {
    /// The backends (`http.proxy.backends`) and the retry counter.
    http: Arc<Http>,
    pool: Pool<ReplayBody>,
}

impl std::fmt::Debug for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("backends", &self.0.http.proxy.backends.len())
            .finish_non_exhaustive()
    }
}

impl Balance {
    /// Balances over `http`'s backends through `pool`.
    pub fn new(http: Arc<Http>, pool: Pool<ReplayBody>) -> Self {
        Self(Arc::new(Inner { http, pool }))
    }
}

/// Makes `req`'s URI origin-form (`/path?query`), the form a request to an origin server is
/// sent in (RFC 9112 §3.2.1): a client's absolute-form URI, or an HTTP/2 request's
/// scheme and authority, lose both (its `Host` header carries the authority). `CONNECT`'s
/// authority-form is left alone, as is `*`.
pub fn origin_form<B>(req: &mut Request<B>) {
    if req.uri().authority().is_none() || req.method() == Method::CONNECT {
        return;
    }
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
}

impl tower::Service<Request<ReplayBody>> for Balance {
    type Response = Routed;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Routed, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReplayBody>) -> Self::Future {
        origin_form(&mut req);
        let this = Arc::clone(&self.0);
        Box::pin(async move { this.send(req).await })
    }
}

impl Inner {
    /// Picks a backend (skipping those in [`Tried`]) and sends `req` to it. A backend that
    /// refuses the connection or times out connecting is skipped and the next one picked
    /// here, the request still whole in hand: nothing was sent, so any method goes on,
    /// a body too long to replay included, and the retry policy need not have copied the
    /// request for it.
    async fn send(&self, mut req: Request<ReplayBody>) -> Result<Routed, ProxyError> {
        loop {
            let tried = req
                .extensions()
                .get::<Tried>()
                .map_or(&[][..], |t| &t.0[..]);
            let Some(backend) = self.http.proxy.backends.pick_excluding(tried) else {
                return Err(match tried.len() {
                    0 => ProxyError::NoBackend,
                    tries => ProxyError::AllFailed { tries },
                });
            };
            // Counted from the pick: least-conn must see it at once, or concurrent picks
            // all land on the same idle-looking backend.
            let active = backend.open();
            // A retired backend's --grace running out ends the wait for its answer (the
            // pooled connection is dropped with the request, never reused).
            let sent = tokio::select! {
                r = self.pool.send_to(&backend, req) => r,
                () = backend.closed() => {
                    return Err(ProxyError::Retired {
                        key: backend.key,
                        addr: backend.addr,
                    })
                }
            };
            match sent {
                Ok(response) => {
                    backend.record_connect(true);
                    return Ok(Routed {
                        response,
                        backend,
                        active,
                    });
                }
                Err(SendError::Connect { source, request }) => {
                    backend.record_connect(false);
                    tracing::debug!(slot = backend.slot, addr = %backend.addr, error = ?source, "backend connect failed; trying another");
                    self.http.stats.retries.fetch_add(1, Ordering::Relaxed);
                    req = *request;
                    req.extensions_mut()
                        .get_or_insert_default::<Tried>()
                        .0
                        .push(backend.key);
                }
                Err(SendError::Backend(source)) => {
                    return Err(ProxyError::Backend {
                        key: backend.key,
                        addr: backend.addr,
                        source,
                    })
                }
            }
        }
    }
}
