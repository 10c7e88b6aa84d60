//! A request body that can be sent again: the first send streams it from the client and
//! keeps what it read (up to a cap) so a retry on another backend replays the same bytes.
//!
//! Hand-written because no published crate does it: linkerd2-proxy's `ReplayBody`
//! (linkerd/http/retry) is the model but is not on crates.io, and tower's retry needs the
//! request to be cloneable. Clones share one state; whichever clone is being sent holds
//! it and gives it back when dropped, so a retry whose previous attempt is still being
//! torn down waits for it instead of racing it. The same wrapper enforces `--max-body`,
//! so a too-large body is told apart from a failing backend.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::HeaderMap;

/// Errors of a [`ReplayBody`] as the client library sees them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the request body could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent more than `--max-body`.
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    /// Reading from the client failed (it went away mid-body).
    #[error("reading the request body")]
    Client(#[source] hyper::Error),
}

/// The state shared by all clones of one request's body.
struct State {
    /// The client's body, until it has ended.
    inner: Option<Incoming>,
    /// Data frames read so far (empty once `overflowed`).
    buffered: Vec<Bytes>,
    /// Bytes in `buffered`.
    buffered_len: usize,
    /// Bytes read from the client in all.
    read: u64,
    /// More than the cap was read: this body can no longer be replayed.
    overflowed: bool,
    /// Trailers, once read.
    trailers: Option<HeaderMap>,
}

struct Slot {
    /// `None` while a clone is sending.
    state: Option<State>,
    /// A clone waiting for the state to come back.
    waiting: Option<Waker>,
}

struct Shared {
    slot: Mutex<Slot>,
    /// The replay cap.
    cap: usize,
    /// `--max-body`.
    max: Option<u64>,
    /// Set once reading the client's body failed or went over `max`: the failure is the
    /// client's, not the backend's, and nothing is retried.
    client_failed: AtomicBool,
    /// Set once the body went over `max`.
    too_large: AtomicBool,
    /// The body's size as announced at the start (exact for a `Content-Length` or an
    /// empty body), so every clone frames the request the same way.
    hint: SizeHint,
    /// Whether the body was empty from the start (a GET without a body).
    empty: bool,
}

/// One send of a request body. See the module doc.
pub struct ReplayBody {
    shared: Arc<Shared>,
    /// The shared state while this clone is sending.
    held: Option<State>,
    /// Buffered frames this clone has already sent.
    replayed: usize,
    /// This clone has sent its trailers (or the end).
    done: bool,
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("replayed", &self.replayed)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ReplayBody {
    /// Wraps the client's `body`, keeping up to `cap` bytes for replays and failing past
    /// `max` bytes.
    pub fn new(body: Incoming, cap: usize, max: Option<u64>) -> Self {
        let hint = body.size_hint();
        let empty = body.is_end_stream();
        let state = State {
            inner: (!empty).then_some(body),
            buffered: Vec::new(),
            buffered_len: 0,
            read: 0,
            overflowed: false,
            trailers: None,
        };
        Self {
            shared: Arc::new(Shared {
                slot: Mutex::new(Slot {
                    state: Some(state),
                    waiting: None,
                }),
                cap,
                max,
                client_failed: AtomicBool::new(false),
                too_large: AtomicBool::new(false),
                hint,
                empty,
            }),
            held: None,
            replayed: 0,
            done: empty,
        }
    }

    /// Whether a fresh clone would send the whole body again.
    pub fn replayable(&self) -> bool {
        if self.shared.client_failed.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(state) = &self.held {
            return !state.overflowed;
        }
        let slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        // Held by a clone being torn down: it cannot have overflowed unless it set the
        // flag in the state it will give back; assume replayable and let the retry wait.
        slot.state.as_ref().is_none_or(|s| !s.overflowed)
    }

    /// A new send of the same body, from its first byte.
    pub fn replay(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            held: None,
            replayed: 0,
            done: self.shared.empty,
        }
    }

    /// Whether reading the client's body failed (it went away, or went over
    /// `--max-body`): such a failure is not the backend's.
    pub fn client_failed(&self) -> bool {
        self.shared.client_failed.load(Ordering::Relaxed)
    }

    /// Whether the body went over `--max-body`.
    pub fn too_large(&self) -> bool {
        self.shared.too_large.load(Ordering::Relaxed)
    }

    fn fail(&self, e: BodyError) -> BoxError {
        self.shared.client_failed.store(true, Ordering::Relaxed);
        if matches!(e, BodyError::TooLarge(_)) {
            self.shared.too_large.store(true, Ordering::Relaxed);
        }
        Box::new(e)
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(state) = self.held.take() {
            let mut slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.state = Some(state);
            if let Some(w) = slot.waiting.take() {
                w.wake();
            }
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.held.is_none() {
            let mut slot = this.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
            match slot.state.take() {
                Some(state) => this.held = Some(state),
                None => {
                    slot.waiting = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let Some(state) = this.held.as_mut() else {
            return Poll::Pending;
        };
        if this.replayed < state.buffered.len() {
            let chunk = state.buffered[this.replayed].clone();
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(inner) = state.inner.as_mut() else {
            this.done = true;
            return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.inner = None;
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.inner = None;
                Poll::Ready(Some(Err(this.fail(BodyError::Client(e)))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            state.trailers = Some(t.clone());
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                };
                state.read += frame.len() as u64;
                if let Some(max) = this.shared.max.filter(|&max| state.read > max) {
                    state.inner = None;
                    return Poll::Ready(Some(Err(this.fail(BodyError::TooLarge(max)))));
                }
                if !state.overflowed {
                    if state.buffered_len + frame.len() <= this.shared.cap {
                        state.buffered_len += frame.len();
                        state.buffered.push(frame.clone());
                        this.replayed += 1;
                    } else {
                        state.overflowed = true;
                        state.buffered = Vec::new();
                        state.buffered_len = 0;
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.hint
    }
}
