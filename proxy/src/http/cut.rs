//! A response body that ends when its backend is closed: a remote backend whose address
//! left DNS gets `--grace` for what is in flight, then [`Backend::close_connections`] ends
//! it. On the tcp path that closes the copy loops; here it must reach the responses still
//! streaming from that backend, or a slow download (or a backend that stalls mid-body)
//! would keep the retired address in use long after the drain said it was over.
//!
//! Ending with an error, not with a clean end of stream, is what tells hyper the response
//! is incomplete: it closes the client's connection instead of letting the client wait for
//! bytes that will never come or take a short body for a whole one.
//!
//! [`Backend::close_connections`]: crate::Backend::close_connections

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio_util::sync::WaitForCancellationFutureOwned;

/// Why a [`Cut`] body ended early.
#[derive(Debug, thiserror::Error)]
#[error("backend retired (its --grace is over) while its response was streaming")]
pub struct Retired;

/// `inner`, until `closed` resolves; then an error frame.
#[derive(Debug)]
pub struct Cut<B> {
    inner: B,
    /// `None` for a local worker's response (it is stopped instead; nothing to watch), and
    /// once the body is done.
    closed: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<B> Cut<B> {
    /// Watches `closed` (from [`crate::Backend::closed_owned`]) while `inner` streams.
    pub fn new(inner: B, closed: Option<WaitForCancellationFutureOwned>) -> Self {
        Self {
            inner,
            closed: closed.map(Box::pin),
        }
    }
}

impl<B> Body for Cut<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(closed) = &mut this.closed {
            if closed.as_mut().poll(cx).is_ready() {
                this.closed = None;
                return Poll::Ready(Some(Err(Box::new(Retired))));
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.closed = None;
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use tokio_util::sync::CancellationToken;

    /// A backend's body that sends one chunk and then stalls.
    struct Stalls(Option<Bytes>);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.get_mut().0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_ends_with_an_error_when_its_backend_is_closed() {
        let token = CancellationToken::new();
        let stalls = Stalls(Some(Bytes::from_static(b"first")));
        let mut body = Cut::new(stalls, Some(token.clone().cancelled_owned()));
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first")));
        let closer = tokio::spawn(async move { token.cancel() });
        let cut = body.frame().await.expect("a frame").expect_err("an error");
        assert!(cut.to_string().contains("retired"), "{cut}");
        closer.await.unwrap();
    }

    #[tokio::test]
    async fn a_body_streams_to_its_end_while_its_backend_is_not_closed() {
        let token = CancellationToken::new();
        let whole = Full::new(Bytes::from_static(b"all"));
        let body = Cut::new(whole, Some(token.clone().cancelled_owned()));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "all");
        let local = Cut::new(Full::new(Bytes::from_static(b"worker")), None);
        assert_eq!(local.collect().await.unwrap().to_bytes(), "worker");
    }
}
