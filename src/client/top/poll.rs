//! Asking the master, once per refresh, on a thread of its own: a master that answers
//! slowly (up to `--timeout`) or not at all must not freeze the keys, so the view never
//! waits on the network.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::model::Sample;
use crate::client::status::Status;
use crate::client::Endpoint;

/// One poll's outcome: an answer, or the one line that says why there was none.
pub type Outcome = Result<Sample, String>;

/// `/status`, and in http mode the request count from `/metrics`.
pub fn fetch(endpoint: &Endpoint) -> anyhow::Result<Sample> {
    let at = Instant::now();
    let status = Status::parse(&endpoint.get_ok("/status")?)?;
    let requests = if status.protocol.as_deref() == Some("http") {
        let metrics = endpoint.get_ok("/metrics")?;
        Some(requests_total(&metrics).context("/metrics has no balancer_http_requests_total")?)
    } else {
        None
    };
    Ok(Sample {
        at,
        status,
        requests,
    })
}

/// Polls `endpoint` every `interval` on a new thread, until the receiver is dropped. The
/// interval runs from the start of one poll to the start of the next, so a slow answer does
/// not push every later refresh back.
pub fn spawn(endpoint: Endpoint, interval: Duration) -> anyhow::Result<mpsc::Receiver<Outcome>> {
    let (tx, rx) = mpsc::sync_channel(1);
    thread::Builder::new()
        .name("top-poll".into())
        .spawn(move || loop {
            let started = Instant::now();
            let outcome = fetch(&endpoint).map_err(|e| format!("{e:#}"));
            if tx.send(outcome).is_err() {
                return;
            }
            thread::sleep(interval.saturating_sub(started.elapsed()));
        })
        .context("starting the polling thread")?;
    Ok(rx)
}

/// The sum of `balancer_http_requests_total` over its status classes, from Prometheus text.
fn requests_total(metrics: &str) -> Option<u64> {
    let mut found = false;
    let mut sum = 0u64;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("balancer_http_requests_total") else {
            continue;
        };
        // `{class="2xx"} 17` or ` 17`; anything else (a longer metric name) is not ours.
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map(|(_, v)| v),
            None => rest.starts_with(' ').then_some(rest),
        };
        if let Some(n) = value.and_then(|v| v.trim().parse::<u64>().ok()) {
            sum = sum.saturating_add(n);
            found = true;
        }
    }
    found.then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::requests_total;

    #[test]
    fn sums_requests_over_status_classes() {
        let text = "# HELP balancer_http_requests_total HTTP responses sent, by status class.\n\
            # TYPE balancer_http_requests_total counter\n\
            balancer_http_requests_total{class=\"1xx\"} 0\n\
            balancer_http_requests_total{class=\"2xx\"} 40\n\
            balancer_http_requests_total{class=\"5xx\"} 2\n\
            balancer_http_requests_total_other 100\n\
            balancer_connections_accepted_total 9\n";
        assert_eq!(requests_total(text), Some(42));
        assert_eq!(
            requests_total("balancer_connections_accepted_total 9\n"),
            None
        );
    }
}
