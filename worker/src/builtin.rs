//! The built-in demo worker: a single-threaded hyper HTTP/1.1 server.
//!
//! It is single-threaded on purpose: it reproduces the problem balancer exists for, a server
//! whose one thread is blocked by a long computation (`GET /sum`), and lets the master show
//! that other workers keep answering meanwhile.
//!
//! Routes: `GET /` (who answered), `GET /sum?n=N` (CPU-bound, runs in the request path),
//! `GET /healthz` (`ok`).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::channel::{Channel, ChannelError, StopReason};

/// Default `n` for `/sum`: about half a second of one core on this project's machines, the
/// classic "long computation" that blocks a single-threaded server.
pub const DEFAULT_SUM_N: u64 = 800_000_000;
/// Largest `n` accepted by `/sum`, so one request cannot occupy a worker for hours.
pub const MAX_SUM_N: u64 = 20_000_000_000;
/// How long open connections may take to finish after a shutdown request. The master has its
/// own, longer deadline; this one only keeps a worker from hanging on a stuck client.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the built-in worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// The IPC channel could not be opened or used.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Binding or inspecting the loopback listener failed.
    #[error("binding 127.0.0.1:0")]
    Bind(#[source] std::io::Error),
    /// Installing the SIGTERM handler failed.
    #[error("installing the SIGTERM handler")]
    Signal(#[source] std::io::Error),
}

/// Runs the built-in worker until the master asks it to stop, the channel closes, or SIGTERM.
/// Builds its own current-thread runtime: one thread, like a Node.js server.
pub fn run() -> Result<(), BuiltinError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BuiltinError::Bind)?;
    runtime.block_on(serve())
}

async fn serve() -> Result<(), BuiltinError> {
    let mut channel = Channel::from_env()?;
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(BuiltinError::Bind)?;
    let port = listener.local_addr().map_err(BuiltinError::Bind)?.port();
    let mut sigterm = signal(SignalKind::terminate()).map_err(BuiltinError::Signal)?;
    channel.ready(port).await?;

    let graceful = GracefulShutdown::new();
    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            reason = channel.stopped() => break reason,
            _ = sigterm.recv() => break StopReason::Shutdown,
        }
    };
    drop(listener);
    if reason == StopReason::Shutdown {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    }
    Ok(())
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        res
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/" => text(
            StatusCode::OK,
            format!("child worker run, at pid: {}\n", std::process::id()),
        ),
        "/healthz" => text(StatusCode::OK, "ok".into()),
        "/sum" => match sum_n(req.uri().query()) {
            Ok(n) => text(StatusCode::OK, format!("{}\n", sum(n))),
            Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

/// Reads `n` from a query string such as `n=1000`; absent means [`DEFAULT_SUM_N`].
fn sum_n(query: Option<&str>) -> Result<u64, String> {
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("n="))
    else {
        return Ok(DEFAULT_SUM_N);
    };
    match raw.parse::<u64>() {
        Ok(n) if n <= MAX_SUM_N => Ok(n),
        _ => Err(format!("n must be a whole number from 0 to {MAX_SUM_N}")),
    }
}

/// The deliberately slow computation: a wrapping sum of squares that the optimiser may not
/// fold away (`black_box`), so its cost grows linearly with `n`.
pub fn sum(n: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..n {
        let i = std::hint::black_box(i);
        acc = acc.wrapping_add(i.wrapping_mul(i));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_is_sum_of_squares() {
        assert_eq!(sum(0), 0);
        assert_eq!(sum(4), 1 + 4 + 9);
    }

    #[test]
    fn sum_query() {
        assert_eq!(sum_n(None), Ok(DEFAULT_SUM_N));
        assert_eq!(sum_n(Some("x=1&n=12")), Ok(12));
        assert!(sum_n(Some("n=-1")).is_err());
        assert!(sum_n(Some("n=99999999999999")).is_err());
    }
}
