//! The HTTP path (`--protocol http`): the request, not the connection, is the unit that is
//! balanced.
//!
//! A hyper server in front ([`server`]) speaks HTTP/1.1 to clients (and HTTP/2 where TLS
//! negotiated `h2`); each request goes through a small stack of tower layers — a timeout
//! (`--request-timeout`), a retry policy ([`retry`]) — around [`client::Balance`], which
//! picks a backend per request from the shared [`Backends`](crate::Backends) set and sends
//! the request over the thread's [`pool`] of keep-alive connections. [`headers`] rewrites the
//! forwarded and hop-by-hop headers, [`error`] turns every failure into an HTTP answer,
//! [`upgrade`] passes `Upgrade` exchanges through, [`replay`] keeps a request body
//! replayable for retries, [`cut`] ends a retired backend's responses at its `--grace`,
//! [`watch`] cuts slow and idle clients, and [`metrics`] counts.
//!
//! Like the tcp path it takes an already-bound listener, a cancellation token and the
//! backend set, so it is tested with plain sockets and no master.

pub mod client;
pub mod cut;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod replay;
pub mod retry;
pub mod server;
pub mod upgrade;
mod watch;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use headers::TrustedProxies;
pub use metrics::HttpStats;
pub use server::serve;

use crate::server::Proxy;
use crate::tls::Tls;

/// How long a backend may take to answer before the client gets a 504. nginx's
/// `proxy_read_timeout` default: long enough for slow reports, short enough that a hung
/// backend does not hold clients forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a whole request head (slowloris protection; 408).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (431 beyond it): as large as any real browser sends
/// with big cookies, small enough that a connection's read buffer stays bounded.
pub const MAX_HEAD: usize = 64 * 1024;
/// Idle keep-alive connections to one backend kept per proxy thread. Enough for the
/// concurrency of a busy worker; more would only hold the worker's descriptors.
pub const POOL_MAX_IDLE: usize = 64;
/// How long an idle pooled connection to a backend is kept (shorter than the usual
/// keep-alive timeout of servers, so the proxy closes first and never races a close).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Times an idempotent request is sent again after a backend closed before answering.
pub const MAX_REPLAYS: usize = 2;
/// The request body kept in memory so a request can be replayed; a longer body is sent
/// once, streamed.
pub const REPLAY_BUFFER: usize = 64 * 1024;

/// Knobs of the HTTP path, fixed at start-up.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// A backend slower than this to send its response head gets the client a 504.
    pub request_timeout: Duration,
    /// The whole request head must arrive within this (408 and close otherwise).
    pub header_timeout: Duration,
    /// An idle keep-alive client connection is closed after this (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Largest request head (431 beyond it).
    pub max_head: usize,
    /// Largest request body (`None`: unbounded); 413 beyond it.
    pub max_body: Option<u64>,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are kept and appended to.
    pub trusted_proxies: TrustedProxies,
    /// One `access` log line per request.
    pub access_log: bool,
    /// See [`POOL_MAX_IDLE`].
    pub pool_max_idle: usize,
    /// See [`POOL_IDLE_TIMEOUT`].
    pub pool_idle_timeout: Duration,
    /// See [`MAX_REPLAYS`].
    pub max_replays: usize,
    /// See [`REPLAY_BUFFER`].
    pub replay_buffer: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: REQUEST_TIMEOUT,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: Some(Duration::from_secs(60)),
            max_head: MAX_HEAD,
            max_body: None,
            trusted_proxies: TrustedProxies::default(),
            access_log: false,
            pool_max_idle: POOL_MAX_IDLE,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            max_replays: MAX_REPLAYS,
            replay_buffer: REPLAY_BUFFER,
        }
    }
}

/// The shared state of the HTTP path: the data path's [`Proxy`] (backends, connection
/// permits, connect timeout, counters), the HTTP knobs, TLS if terminated, and the request
/// counters.
#[derive(Debug)]
pub struct Http {
    /// Backends, permits and the connect settings (`forward.connect_timeout`).
    pub proxy: Arc<Proxy>,
    /// HTTP knobs.
    pub config: HttpConfig,
    /// TLS termination (certificate reloadable on SIGHUP), if configured.
    pub tls: Option<Arc<Tls>>,
    /// Request counters and the latency histogram.
    pub stats: HttpStats,
}

impl Http {
    /// The HTTP path over `proxy`'s backends.
    pub fn new(proxy: Arc<Proxy>, config: HttpConfig, tls: Option<Arc<Tls>>) -> Self {
        Self {
            proxy,
            config,
            tls,
            stats: HttpStats::default(),
        }
    }
}
