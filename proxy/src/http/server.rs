//! The client side of the HTTP path: the accept loop (shared with the tcp path), TLS if
//! terminated, one hyper-util auto connection per client (HTTP/1.1, or HTTP/2 where ALPN
//! chose `h2`), and the per-request handler that rewrites the request, sends it through
//! the tower stack and turns the result into the client's response.
//!
//! Stopping: when `stop` is cancelled (a graceful stop, or an in-place upgrade's drain),
//! every connection is told to shut down gracefully (hyper closes an idle HTTP/1
//! connection at once, lets a busy one finish its response with `Connection: close`, and
//! sends HTTP/2 clients a GOAWAY); `conns.abort` ends whatever is left at the end of the
//! grace period. A connection that has not sent a byte yet is told only once its first
//! bytes arrive, or after [`FIRST_REQUEST_WAIT`]: hyper takes a connection with nothing
//! read for idle and closes it at once, and a client that has just connected (accepted
//! right before the stop) is sending its first request. Closed then, that request is lost
//! (the client gets a reset or a broken pipe, and no client retries a request on a fresh
//! connection), which an upgrade promises never to do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::retry::Retry;
use tower::timeout::Timeout;
use tower::ServiceExt;

use crate::server::{accept_loop, Connections};
use crate::tls::ClientStream;

use super::client::{Balance, Routed};
use super::cut::Cut;
use super::error::{self, ProxyError};
use super::headers::{self, Origin};
use super::metrics::{Finish, Tracked};
use super::pool::{Pool, Pooled};
use super::replay::ReplayBody;
use super::retry::Replay;
use super::upgrade;
use super::watch::{self, Clock, Expired, Watched};
use super::Http;

/// How long writing the 408 to a slow client may take before it is simply closed.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent HTTP/2 streams per client connection: as many requests in flight as a
/// browser opens, bounded so one connection cannot take every backend slot.
const H2_MAX_STREAMS: u32 = 256;
/// How long a stopping server waits for the first byte of a connection that has sent
/// nothing yet before it closes it. A client sends its request right after its connect
/// returns, so its bytes follow the handshake by about one round trip (and by a scheduling
/// delay on a loaded client): a second covers both with room. A connection that stays
/// silent (a browser's pre-connect) holds an upgrade's drain for this long at most.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// The body of every response to a client: a backend's (ended early if that backend is
/// retired and its `--grace` runs out), or one of the proxy's own.
pub type ProxyBody = Tracked<Either<Cut<Pooled<ReplayBody>>, Full<Bytes>>>;

/// The per-request tower stack: the whole exchange (retries included) under
/// `--request-timeout`, retries by [`Replay`], the backend pick and send by [`Balance`].
type Stack = Timeout<Retry<Replay, Balance>>;

/// What one proxy thread's connections share.
struct Thread {
    http: Arc<Http>,
    stack: Stack,
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
    stop: CancellationToken,
    conns: Connections,
}

/// Serves HTTP on `listener` until `stop` is cancelled, then shuts each connection down
/// gracefully; connection tasks go in `conns` (as in [`crate::serve`]). Several loops
/// (threads) may share one [`Http`]; each has its own pool of backend connections.
pub async fn serve(
    listener: std::net::TcpListener,
    http: Arc<Http>,
    stop: CancellationToken,
    conns: Connections,
) {
    let config = &http.config;
    let pool = Pool::new(
        config.pool_max_idle,
        config.pool_idle_timeout,
        http.proxy.forward.connect_timeout,
    );
    let balance = Balance::new(Arc::clone(&http), pool);
    let retry = Retry::new(Replay::new(config.max_replays, Arc::clone(&http)), balance);
    let stack = Timeout::new(retry, config.request_timeout);
    let mut h1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    h1.http1()
        .max_buf_size(config.max_head.max(8192))
        .header_read_timeout(None)
        .keep_alive(true);
    let mut h2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    h2.http2()
        .max_header_list_size(u32::try_from(config.max_head).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_STREAMS);
    let thread = Arc::new(Thread {
        http: Arc::clone(&http),
        stack,
        h1,
        h2,
        stop: stop.clone(),
        conns: conns.clone(),
    });
    // The client address is the socket's peer, or what a trusted load balancer's PROXY
    // header says (`--accept-proxy`).
    accept_loop(
        listener,
        &http.proxy,
        stop,
        &conns,
        move |tcp, from: crate::ClientAddr| {
            let thread = Arc::clone(&thread);
            async move { connection(thread, tcp, from.addr).await }
        },
    )
    .await;
}

/// Per-connection state the request handler needs.
struct Conn {
    thread: Arc<Thread>,
    origin: Origin,
    clock: Arc<Clock>,
}

async fn connection(thread: Arc<Thread>, tcp: TcpStream, peer: SocketAddr) {
    let config = &thread.http.config;
    let stream = match &thread.http.tls {
        None => ClientStream::Plain(tcp),
        // The handshake is part of the head: a client that stalls it is cut alike.
        Some(tls) => match tokio::time::timeout(config.header_timeout, tls.accept(tcp)).await {
            Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
            Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "tls handshake failed"),
            Err(_) => return tracing::debug!(%peer, "tls handshake timed out"),
        },
    };
    let h2 = stream.alpn() == Some(b"h2");
    let origin = Origin::new(
        peer,
        if thread.http.tls.is_some() {
            "https"
        } else {
            "http"
        },
        config.trusted_proxies.contains(peer.ip()),
    );
    let clock = Arc::new(Clock::new(!h2));
    let (io, rescue) = Watched::new(stream, Arc::clone(&clock));
    let conn_state = Arc::new(Conn {
        thread: Arc::clone(&thread),
        origin,
        clock: Arc::clone(&clock),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = Arc::clone(&conn_state);
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let builder = if h2 { &thread.h2 } else { &thread.h1 };
    let mut served = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
    // When the stop was seen: the graceful shutdown follows once the client has spoken (or
    // FIRST_REQUEST_WAIT later), see the module's doc.
    let mut stopping = thread.stop.is_cancelled().then(tokio::time::Instant::now);
    let mut draining = false;
    let expired = loop {
        let (said, until) = (&*clock, stopping.map(|t| t + FIRST_REQUEST_WAIT));
        let speak = async move {
            let Some(until) = until else {
                return std::future::pending().await;
            };
            tokio::select! {
                () = watch::spoken(said) => {}
                () = tokio::time::sleep_until(until) => {}
            }
        };
        tokio::select! {
            done = served.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                break None;
            }
            () = thread.stop.cancelled(), if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now());
            }
            () = speak, if stopping.is_some() && !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            e = watch::expired(&clock, config.header_timeout, config.idle_timeout) => break Some(e),
        }
    };
    drop(served);
    match expired {
        Some(Expired::Head) => {
            thread
                .http
                .stats
                .header_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, "request head not complete within --header-timeout, 408");
            let stream = rescue.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut s) = stream {
                let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, async {
                    s.write_all(error::request_timeout_bytes()).await?;
                    s.shutdown().await
                })
                .await;
            }
        }
        Some(Expired::Idle) => tracing::debug!(%peer, "idle keep-alive connection closed"),
        None => {}
    }
}

/// One request: rewrite, send through the stack, answer.
async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let http = &conn.thread.http;
    let config = &http.config;
    conn.clock.request_started();
    let mut finish = Finish {
        stats: Arc::clone(http),
        clock: Arc::clone(&conn.clock),
        started: Instant::now(),
        client: conn.origin.client,
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        status: StatusCode::OK,
        backend: None,
        _active: None,
    };
    if let Err(e) = headers::check_host(&req) {
        return failed(ProxyError::BadHost(e), finish);
    }
    if let Err(e) = headers::check_target(&req) {
        return failed(ProxyError::BadTarget(e), finish);
    }
    if let Some(max) = config.max_body {
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > max) {
            return failed(ProxyError::BodyTooLarge, finish);
        }
    }
    let client_upgrade = upgrade::requested(&req).then(|| hyper::upgrade::on(&mut req));
    headers::rewrite_request(&mut req, &conn.origin, client_upgrade.is_some());
    let (parts, body) = req.into_parts();
    let body = ReplayBody::new(body, config.replay_buffer, config.max_body);
    let probe = body.replay();
    let sent = conn
        .thread
        .stack
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let routed = match sent {
        Ok(routed) => routed,
        Err(e) => {
            let err = match e.downcast::<ProxyError>() {
                Ok(e) => *e,
                Err(_elapsed) => ProxyError::Timeout,
            };
            let err = if probe.too_large() {
                ProxyError::BodyTooLarge
            } else if probe.client_failed() {
                ProxyError::ClientBody
            } else {
                err
            };
            return failed(err, finish);
        }
    };
    let Routed {
        mut response,
        backend,
        active,
    } = routed;
    finish.backend = Some(backend.addr);
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    match (switching, client_upgrade) {
        (true, Some(client)) => {
            upgrade::splice(
                client,
                &mut response,
                &conn.thread.conns,
                (active, backend.closed_owned()),
                Arc::clone(http),
            );
        }
        (true, None) => {
            // A 101 nobody asked for cannot be passed on.
            let err = error::answer(
                StatusCode::BAD_GATEWAY,
                "backend switched protocols unasked",
            );
            finish.status = StatusCode::BAD_GATEWAY;
            return err.map(|b| Tracked::new(Either::Right(b), finish));
        }
        (false, _) => finish._active = Some(active),
    }
    headers::strip_hop_by_hop(response.headers_mut(), switching);
    finish.status = response.status();
    let closed = backend.closed_owned();
    response.map(|b| Tracked::new(Either::Left(Cut::new(b, closed)), finish))
}

/// The answer for a failed request, with its one log line.
fn failed(err: ProxyError, mut finish: Finish) -> Response<ProxyBody> {
    let resp = err.response();
    finish.status = resp.status();
    tracing::warn!(
        client = %finish.client,
        method = %finish.method,
        path = %finish.path,
        status = finish.status.as_u16(),
        error = %ErrorChain(&err),
        "request failed"
    );
    resp.map(|b| Tracked::new(Either::Right(b), finish))
}

/// An error with its sources, `a: b: c`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
