//! Failures as HTTP answers: every way a request can fail on its way to a backend maps to
//! one status and a short plain-text body, so a client never sees a bare reset for a
//! failure the proxy could name.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

/// Seconds a client is told to wait when no backend is in rotation: about the time a
/// worker takes to be replaced.
const RETRY_AFTER_SECS: &str = "1";

/// Why a request got no answer from a backend.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No backend was in rotation.
    #[error("no backend in rotation")]
    NoBackend,
    /// Every backend in rotation refused the connection or timed out connecting.
    #[error("{tries} backend(s) refused or timed out the connection")]
    AllFailed {
        /// How many were tried.
        tries: usize,
    },
    /// The backend failed (closed, reset) before sending a response head.
    #[error("backend {addr} failed before answering")]
    Backend {
        /// The backend's instance key, so a retry skips it.
        key: u64,
        /// Its address, for the log.
        addr: SocketAddr,
        /// What hyper said.
        #[source]
        source: hyper::Error,
    },
    /// The backend was retired (its address left DNS) and its `--grace` ran out before it
    /// sent a response head: the request is abandoned there, and replayed elsewhere if it
    /// may be (as after [`Self::Backend`]).
    #[error("backend {addr} retired before answering (its --grace is over)")]
    Retired {
        /// The backend's instance key, so a retry skips it.
        key: u64,
        /// Its address, for the log.
        addr: SocketAddr,
    },
    /// The client's request body was over `--max-body`.
    #[error("request body over --max-body")]
    BodyTooLarge,
    /// Reading the client's request body failed (it went away mid-upload).
    #[error("reading the request body from the client")]
    ClientBody,
    /// No response head within `--request-timeout`.
    #[error("no answer within --request-timeout")]
    Timeout,
    /// The request's `Host` fields are not exactly one valid host (RFC 9112 §3.2).
    #[error("{0}")]
    BadHost(super::headers::BadHost),
    /// The request-target's form does not fit its method (RFC 9112 §3.2.4).
    #[error("{0}")]
    BadTarget(super::headers::BadTarget),
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            Self::AllFailed { .. } | Self::Backend { .. } | Self::Retired { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ClientBody | Self::BadHost(_) | Self::BadTarget(_) => StatusCode::BAD_REQUEST,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The answer: status, a one-line plain-text body, `Retry-After` for a 503.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut resp = answer(self.status(), &self.to_string());
        if matches!(self, Self::NoBackend) {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        if matches!(
            self,
            Self::BodyTooLarge | Self::ClientBody | Self::BadHost(_) | Self::BadTarget(_)
        ) {
            // The rest of the body is unread: the connection cannot carry another request.
            // After a bad Host, nothing more from that client is trusted either.
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A plain-text answer with `status` and the line `text`.
pub fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!("{} {reason}: {text}\n", status.as_u16());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The raw bytes of a 408 answer, written straight to a client whose request head did not
/// arrive in time (hyper has given the connection up by then).
pub fn request_timeout_bytes() -> &'static [u8] {
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 48\r\nconnection: close\r\n\r\n408 Request Timeout: request head took too long\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_after() {
        let r = ProxyError::NoBackend.response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(
            ProxyError::AllFailed { tries: 2 }.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(ProxyError::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            ProxyError::BodyTooLarge.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let r = ProxyError::BadHost(super::super::headers::BadHost::Several).response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[CONNECTION], "close");
    }

    #[test]
    fn the_408_bytes_have_the_length_they_announce() {
        let raw = request_timeout_bytes();
        let text = std::str::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
