//! The backend side of the HTTP path: [`Balance`], the innermost tower service, which
//! picks a backend per request and sends the request to it over the thread's [`Pool`] of
//! keep-alive connections (HTTP/1.1 to each backend, idle ones bounded and timed out, a
//! connection that saw an error never reused).
//!
//! Each proxy thread has its own pool, so a pooled connection is always driven by the
//! thread that uses it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, Uri};

use crate::backends::{ActiveGuard, Backend, Backends};

use super::error::ProxyError;
use super::pool::{Pool, Pooled, SendError};
use super::replay::ReplayBody;

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
    backends: Arc<Backends>,
    pool: Pool<ReplayBody>,
}

impl std::fmt::Debug for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("backends", &self.0.backends.len())
            .finish_non_exhaustive()
    }
}

impl Balance {
    /// Balances over `backends` through `pool`.
    pub fn new(backends: Arc<Backends>, pool: Pool<ReplayBody>) -> Self {
        Self(Arc::new(Inner { backends, pool }))
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
        let tried = req
            .extensions()
            .get::<Tried>()
            .map_or(&[][..], |t| &t.0[..]);
        let Some(backend) = self.0.backends.pick_excluding(tried) else {
            let err = match tried.len() {
                0 => ProxyError::NoBackend,
                tries => ProxyError::AllFailed { tries },
            };
            return Box::pin(std::future::ready(Err(err)));
        };
        // Counted from the pick: least-conn must see it at once, or concurrent picks all
        // land on the same idle-looking backend.
        let active = backend.open();
        origin_form(&mut req);
        let pool = self.0.pool.clone();
        Box::pin(async move {
            // A retired backend's --grace running out ends the wait for its answer (the
            // pooled connection is dropped with the request, never reused).
            let sent = tokio::select! {
                r = pool.send(backend.addr, req) => r,
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
                    Ok(Routed {
                        response,
                        backend,
                        active,
                    })
                }
                Err(SendError::Connect(source)) => {
                    backend.record_connect(false);
                    tracing::debug!(slot = backend.slot, addr = %backend.addr, error = ?source, "backend connect failed");
                    Err(ProxyError::Connect {
                        key: backend.key,
                        addr: backend.addr,
                        source,
                    })
                }
                Err(SendError::Backend(source)) => Err(ProxyError::Backend {
                    key: backend.key,
                    addr: backend.addr,
                    source,
                }),
            }
        })
    }
}
