//! The backend side of the HTTP path: hyper-util's pooled legacy client (HTTP/1.1
//! keep-alive connections to each backend, idle ones bounded and timed out, a connection
//! that saw an error never reused) and [`Balance`], the innermost tower service, which
//! picks a backend per request and sends the request to it.
//!
//! The pool is keyed by backend address: a request's URI is rewritten to
//! `http://ADDR/path` (the `Host` header is kept), so one client holds the pools of all
//! backends. Each proxy thread has its own client, so a pooled connection is always
//! driven by the thread that uses it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::backends::{ActiveGuard, Backend, Backends};

use super::error::ProxyError;
use super::replay::ReplayBody;
use super::HttpConfig;

/// The pooled client.
pub type Pool = Client<HttpConnector, ReplayBody>;

/// A new pooled client: connects with `connect_timeout`, `TCP_NODELAY` on.
pub fn pool(config: &HttpConfig, connect_timeout: Duration) -> Pool {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle)
        // The Host header is the client's; never invent one from the backend address.
        .set_host(false)
        .build(connector)
}

/// Backends a request has been sent to and must not be sent to again (a request
/// extension, updated by the retry policy).
#[derive(Debug, Clone, Default)]
pub struct Tried(pub Vec<u64>);

/// A backend's response, with the backend it came from and its in-flight count.
#[derive(Debug)]
pub struct Routed {
    /// The response head and body.
    pub response: Response<Incoming>,
    /// The backend that answered.
    pub backend: Arc<Backend>,
    /// Counts the request in flight on `backend` until the response is done.
    pub(crate) active: ActiveGuard,
}

/// Picks a backend per request (`--balance`, skipping those in [`Tried`]) and sends the
/// request over the pool.
///
/// Cloned per request (by the stack and by tower's retry), so it is one `Arc`: cloning
/// the hyper-util client itself copies its whole configuration.
#[derive(Clone)]
pub struct Balance(Arc<Inner>);

struct Inner {
    backends: Arc<Backends>,
    pool: Pool,
    /// Each backend's address as a URI authority, made once: formatting and parsing a
    /// socket address per request was a visible share of the proxy's instructions.
    /// Bounded by [`AUTHORITY_CACHE`]; a few entries in practice, scanned in order.
    authorities: Mutex<Vec<(SocketAddr, Authority)>>,
}

/// Backend authorities kept; past it the cache starts over (backends come and go on
/// reloads and DNS changes, and a stale entry is only memory).
const AUTHORITY_CACHE: usize = 64;

impl std::fmt::Debug for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("backends", &self.0.backends.len())
            .finish_non_exhaustive()
    }
}

impl Balance {
    /// Balances over `backends` through `pool`.
    pub fn new(backends: Arc<Backends>, pool: Pool) -> Self {
        Self(Arc::new(Inner {
            backends,
            pool,
            authorities: Mutex::new(Vec::new()),
        }))
    }
}

impl Inner {
    /// `addr` as a URI authority, from the cache when it is there.
    fn authority(&self, addr: SocketAddr) -> Option<Authority> {
        let mut cache = self.authorities.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, a)) = cache.iter().find(|(k, _)| *k == addr) {
            return Some(a.clone());
        }
        let a = Authority::try_from(addr.to_string()).ok()?;
        if cache.len() >= AUTHORITY_CACHE {
            cache.clear();
        }
        cache.push((addr, a.clone()));
        Some(a)
    }
}

/// The URI a request for `uri` is sent to on the backend at `authority`:
/// `http://ADDR/path?query`, the path and query moved over, not copied (the pool's key is
/// the scheme and authority; the client's `Host` header is kept). `None` only for parts no
/// URI can hold, which hyper never hands over.
pub fn backend_uri(uri: Uri, authority: Authority) -> Option<Uri> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).ok()
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
        let uri = std::mem::take(req.uri_mut());
        match self
            .0
            .authority(backend.addr)
            .and_then(|a| backend_uri(uri, a))
        {
            Some(uri) => *req.uri_mut() = uri,
            None => {
                // Unreachable for a socket address and an origin-form path; answered as a
                // failed backend rather than a panic.
                return Box::pin(std::future::ready(Err(ProxyError::AllFailed { tries: 0 })));
            }
        }
        let sent = self.0.pool.request(req);
        Box::pin(async move {
            // A retired backend's --grace running out ends the wait for its answer (the
            // pooled connection is dropped with the request, never reused).
            let sent = tokio::select! {
                r = sent => r,
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
                Err(source) if source.is_connect() => {
                    backend.record_connect(false);
                    tracing::debug!(slot = backend.slot, addr = %backend.addr, error = ?source, "backend connect failed");
                    Err(ProxyError::Connect {
                        key: backend.key,
                        addr: backend.addr,
                        source,
                    })
                }
                Err(source) => Err(ProxyError::Backend {
                    key: backend.key,
                    addr: backend.addr,
                    source,
                }),
            }
        })
    }
}
