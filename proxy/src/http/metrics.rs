//! What the HTTP path counts and logs per request: requests by status class, a latency
//! histogram (rendered for `/metrics`), and the `--access-log` line. Both are recorded
//! when the response body is finished or dropped ([`Tracked`]), so the duration and byte
//! count cover the whole response, and a request counts as in flight on its backend
//! until then (least-conn counts requests, not connections).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, StatusCode};

use crate::backends::ActiveGuard;

use super::watch::Clock;

/// Upper bounds (seconds) of the latency histogram's buckets, the usual Prometheus
/// defaults: from a loopback hit (1 ms) to a slow report (10 s).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Request counters. Relaxed atomics, as in [`crate::Stats`].
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Responses by status class: index 0 is 1xx … 4 is 5xx.
    pub by_class: [AtomicU64; 5],
    /// Requests sent again to another backend (refused connects, early closes).
    pub retries: AtomicU64,
    /// Upgraded connections (WebSocket and friends) passed through.
    pub upgrades: AtomicU64,
    /// Clients cut at `--header-timeout` (408).
    pub header_timeouts: AtomicU64,
    /// Histogram counts per bucket of [`LATENCY_BUCKETS`], plus one for +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all latencies, in microseconds.
    latency_sum_us: AtomicU64,
}

impl HttpStats {
    /// Counts one finished response.
    pub fn record(&self, status: StatusCode, took: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Appends the request metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP balancer_http_requests_total HTTP responses sent, by status class."
        );
        let _ = writeln!(out, "# TYPE balancer_http_requests_total counter");
        for (i, n) in self.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "balancer_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                n.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "balancer_http_retries_total",
                "Requests sent again to another backend.",
                &self.retries,
            ),
            (
                "balancer_http_upgrades_total",
                "Upgraded connections passed through.",
                &self.upgrades,
            ),
            (
                "balancer_http_header_timeouts_total",
                "Clients cut at --header-timeout (408).",
                &self.header_timeouts,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let name = "balancer_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from request head to the end of the response.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, n) in self.latency.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// What the access log says about one request, filled in as the request goes.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) stats: Arc<super::Http>,
    pub(crate) clock: Arc<Clock>,
    pub(crate) started: Instant,
    pub(crate) client: SocketAddr,
    pub(crate) method: Method,
    /// Shares the request's bytes: no copy per request unless a line is logged.
    pub(crate) path: PathAndQuery,
    pub(crate) status: StatusCode,
    pub(crate) backend: Option<SocketAddr>,
    /// Holds one request in flight on the backend until the response is done.
    pub(crate) _active: Option<ActiveGuard>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.clock.request_done();
    }
}

/// A response body that records the request when it ends or is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    bytes: u64,
    finish: Option<Finish>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, finish: Finish) -> Self {
        Self {
            inner,
            bytes: 0,
            finish: Some(finish),
        }
    }

    fn done(&mut self) {
        let Some(f) = self.finish.take() else { return };
        let took = f.started.elapsed();
        f.stats.stats.record(f.status, took);
        if f.stats.config.access_log {
            tracing::info!(
                target: "balancer::access",
                client = %f.client,
                method = %f.method,
                path = %f.path,
                status = f.status.as_u16(),
                bytes = self.bytes,
                duration_ms = took.as_secs_f64() * 1e3,
                backend = %f.backend.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                "access"
            );
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.done(),
            _ => {}
        }
        polled
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

    #[test]
    fn histogram_is_cumulative_and_classes_count() {
        let s = HttpStats::default();
        s.record(StatusCode::OK, Duration::from_micros(500));
        s.record(StatusCode::BAD_GATEWAY, Duration::from_millis(30));
        s.record(StatusCode::OK, Duration::from_secs(60));
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("balancer_http_requests_total{class=\"2xx\"} 2"));
        assert!(out.contains("balancer_http_requests_total{class=\"5xx\"} 1"));
        assert!(out.contains("_bucket{le=\"0.001\"} 1\n"));
        assert!(out.contains("_bucket{le=\"0.05\"} 2\n"));
        assert!(out.contains("_bucket{le=\"10\"} 2\n"));
        assert!(out.contains("_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("_count 3\n"));
    }
}
