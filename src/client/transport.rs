//! One HTTP/1.1 exchange with an admin endpoint over TCP or a Unix socket, with hyper's
//! client connection (no pool: each subcommand makes one or a few requests) on a
//! current-thread runtime of its own, under one deadline for connect, request and body.

use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::endpoint::AdminAddr;

/// Largest answer read: `/status` of a thousand workers is a few hundred KiB.
const MAX_BODY: usize = 16 << 20;

/// What the master answered.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: StatusCode,
    /// The body, as text.
    pub body: String,
}

/// Sends `method path` to `addr` (with `token` as a Bearer token) and reads the answer.
pub fn call(
    addr: &AdminAddr,
    token: Option<&str>,
    method: Method,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    runtime.block_on(async {
        let exchange = async {
            match addr {
                AdminAddr::Tcp(a) => {
                    let stream = tokio::net::TcpStream::connect(a)
                        .await
                        .map_err(|e| connect_error(addr, &e))?;
                    exchange(stream, &a.to_string(), token, method, path).await
                }
                AdminAddr::Unix(p) => {
                    let stream = tokio::net::UnixStream::connect(p)
                        .await
                        .map_err(|e| connect_error(addr, &e))?;
                    exchange(stream, &host_of(p), token, method, path).await
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| anyhow::bail!("no answer from {addr} within {timeout:?}"))
    })
}

/// The `Host` header for a Unix socket: any name will do; the socket's file name helps logs.
fn host_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        })
        .unwrap_or("localhost")
        .to_owned()
}

/// The one line an operator needs when connecting failed.
fn connect_error(addr: &AdminAddr, e: &io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("no master at {addr} (connection refused)")
        }
        io::ErrorKind::NotFound => anyhow::anyhow!("no master at {addr} (no such socket)"),
        io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied connecting to {addr}")
        }
        _ => anyhow::anyhow!("connecting to {addr}: {e}"),
    }
}

async fn exchange<S>(
    stream: S,
    host: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
) -> anyhow::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("starting HTTP on the admin connection")?;
    tokio::spawn(async move {
        // Its error, if any, is the request's error below.
        let _ = conn.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(t) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("the admin endpoint closed the connection without an answer")?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
