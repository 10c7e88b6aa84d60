//! Health probes as plain functions: the supervisor decides when to run them and what a
//! result means; these only answer "did this address answer, in time?".

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed (refused, unreachable).
    #[error("connect failed")]
    Connect(#[source] io::Error),
    /// The connection failed while sending the request or reading the answer.
    #[error("exchange failed")]
    Io(#[source] io::Error),
    /// The answer was not an HTTP status line with a 2xx status.
    #[error("unhealthy answer: {0}")]
    Status(String),
}

impl ProbeError {
    /// Whether the probe failed for want of the prober's own resources (no free file
    /// descriptor or socket buffer): it says nothing about the backend.
    pub fn is_local_exhaustion(&self) -> bool {
        match self {
            Self::Connect(e) | Self::Io(e) => crate::is_out_of_resources(e),
            _ => false,
        }
    }
}

/// Succeeds if `addr` accepts a TCP connection within `timeout`.
///
/// This proves a socket is listening, not that the process behind it is alive: the kernel
/// completes handshakes for a stopped process. Use [`http`] to prove liveness.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
        .map_err(ProbeError::Connect)?;
    Ok(())
}

/// Longest status line [`http`] reads; a backend that sends more without a newline fails.
const MAX_STATUS_LINE: usize = 1024;

/// Succeeds if `GET path` on `addr` answers with a 2xx status line within `timeout`.
pub async fn http(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    http_as(addr, &addr.to_string(), path, timeout).await
}

/// [`http`] with `host` as the `Host` header: a remote backend found through a DNS name
/// may serve that name only (virtual hosting), not its bare address.
pub async fn http_as(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout, http_exchange(addr, host, path))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn http_exchange(addr: SocketAddr, host: &str, path: &str) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: balancer-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut head = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    let line = loop {
        let n = stream.read(&mut chunk).await.map_err(ProbeError::Io)?;
        if n == 0 {
            return Err(ProbeError::Status(
                "connection closed before a status line".into(),
            ));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.iter().position(|&b| b == b'\n') {
            break String::from_utf8_lossy(&head[..end]).trim_end().to_owned();
        }
        if head.len() > MAX_STATUS_LINE {
            return Err(ProbeError::Status("status line too long".into()));
        }
    };
    let mut parts = line.split_whitespace();
    let ok = parts.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && parts
            .next()
            .is_some_and(|code| code.len() == 3 && code.starts_with('2'));
    if ok {
        Ok(())
    } else {
        Err(ProbeError::Status(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn answer_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(reply).await;
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_only() {
        let t = Duration::from_secs(2);
        let ok = answer_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert!(http(ok, "/healthz", t).await.is_ok());
        let bad = answer_once(b"HTTP/1.1 503 Busy\r\n\r\n").await;
        assert!(matches!(
            http(bad, "/healthz", t).await,
            Err(ProbeError::Status(_))
        ));
        let junk = answer_once(b"hello\n").await;
        assert!(matches!(
            http(junk, "/", t).await,
            Err(ProbeError::Status(_))
        ));
    }

    #[tokio::test]
    async fn http_probe_sends_the_host_it_is_given() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let t = Duration::from_secs(2);
        assert!(http_as(addr, "app.internal:8080", "/h", t).await.is_ok());
        let request = seen.await.unwrap();
        assert!(
            request.contains("\r\nHost: app.internal:8080\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn probes_fail_on_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let t = Duration::from_secs(2);
        assert!(matches!(tcp(addr, t).await, Err(ProbeError::Connect(_))));
        assert!(http(addr, "/", t).await.is_err());
    }

    #[tokio::test]
    async fn http_probe_times_out_on_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_millis(200);
        // The listener is never accepted from: the handshake completes, nothing answers.
        assert!(matches!(
            http(addr, "/", t).await,
            Err(ProbeError::Timeout(_))
        ));
        drop(listener);
    }
}
