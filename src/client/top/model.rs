//! What `balancer top` shows, computed from successive polls of the master: the last
//! `/status`, and per-second rates from the differences between counters. Pure data, so the
//! arithmetic is tested without a terminal or a master.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use crate::client::status::Status;

/// Rates kept per series: wider than any terminal's sparkline, small enough not to matter.
pub const HISTORY: usize = 512;

/// One poll's answer.
#[derive(Debug)]
pub struct Sample {
    /// When it was taken (rates divide by the time between two samples, not by the nominal
    /// refresh interval, which a slow answer stretches).
    pub at: Instant,
    /// The `/status` document.
    pub status: Status,
    /// HTTP responses sent since the master started, from `/metrics` (`--protocol http`).
    pub requests: Option<u64>,
}

/// What the rates count: connections in tcp mode, requests in http mode (where a worker's
/// `total` counts requests too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Client connections accepted.
    Connections,
    /// HTTP responses sent.
    Requests,
}

impl Unit {
    /// The column and title label: `conn/s` or `req/s`.
    pub fn per_second(self) -> &'static str {
        match self {
            Self::Connections => "conn/s",
            Self::Requests => "req/s",
        }
    }
}

/// A series of per-second rates, newest first (so a sparkline drawn right to left shows the
/// newest at its right edge and as many of the latest as fit).
#[derive(Debug, Default, Clone)]
pub struct Series(VecDeque<u64>);

impl Series {
    fn push(&mut self, rate: u64) {
        self.0.push_front(rate);
        self.0.truncate(HISTORY);
    }

    /// The rates, newest first.
    pub fn newest_first(&self) -> Vec<u64> {
        self.0.iter().copied().collect()
    }

    /// The newest rate, if any poll has given one yet.
    pub fn now(&self) -> Option<u64> {
        self.0.front().copied()
    }

    /// The highest of the first `n` rates (those a sparkline `n` cells wide shows).
    pub fn max_of(&self, n: usize) -> u64 {
        self.0.iter().take(n).copied().max().unwrap_or(0)
    }
}

/// Everything the view draws.
#[derive(Debug, Default)]
pub struct Model {
    /// The last answer (kept while the master is unreachable, so the view still shows
    /// what was last known).
    last: Option<Sample>,
    /// Why the last poll failed; cleared by the next answer.
    error: Option<String>,
    /// The total rate.
    total: Series,
    /// Rates by slot: a slot's line goes on across its worker's replacements.
    slots: BTreeMap<u64, Series>,
}

impl Model {
    /// An answer came: the rates since the previous one are appended.
    pub fn observe(&mut self, sample: Sample) {
        self.error = None;
        if let Some(prev) = &self.last {
            let secs = sample.at.saturating_duration_since(prev.at).as_secs_f64();
            // Two answers within a millisecond (a redraw racing a poll) say nothing new.
            if secs >= 0.001 {
                let rate = |delta: u64| (delta as f64 / secs).round() as u64;
                let unit = unit_of(&sample.status);
                let (before, after) = (total_of(prev, unit), total_of(&sample, unit));
                // A counter that went back (a restarted master) gives no rate, not a spike.
                if let (Some(b), Some(a)) = (before, after) {
                    self.total.push(rate(a.saturating_sub(b)));
                }
                let present: Vec<u64> = sample.status.workers.iter().map(|w| w.slot).collect();
                self.slots.retain(|slot, _| present.contains(slot));
                for (slot, delta) in worker_deltas(&prev.status, &sample.status) {
                    self.slots.entry(slot).or_default().push(rate(delta));
                }
            }
        }
        self.last = Some(sample);
    }

    /// A poll failed with `error` (one line).
    pub fn unreachable(&mut self, error: String) {
        self.error = Some(error);
    }

    /// The last answer, if there has been one.
    pub fn status(&self) -> Option<&Status> {
        self.last.as_ref().map(|s| &s.status)
    }

    /// Why the master is unreachable now, if it is.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// What the rates count.
    pub fn unit(&self) -> Unit {
        self.status().map_or(Unit::Connections, unit_of)
    }

    /// The total rate.
    pub fn total(&self) -> &Series {
        &self.total
    }

    /// Slot `slot`'s rate (empty until two polls have seen it).
    pub fn slot(&self, slot: u64) -> Option<&Series> {
        self.slots.get(&slot)
    }
}

fn unit_of(status: &Status) -> Unit {
    if status.protocol.as_deref() == Some("http") {
        Unit::Requests
    } else {
        Unit::Connections
    }
}

/// The counter the total rate is the derivative of.
fn total_of(sample: &Sample, unit: Unit) -> Option<u64> {
    match unit {
        Unit::Requests => sample.requests,
        Unit::Connections => sample.status.connections.as_ref().map(|c| c.accepted),
    }
}

/// Each slot's growth in `total` between two documents. A worker in rotation in both, as the
/// same instance, grew by the difference. A new instance (a replacement), or one that has
/// just entered rotation, counts from zero (the master makes a new backend, with new
/// counters, at each admission), so all of its total is new. A worker out of rotation
/// (`connections: null`) served nothing new through the master.
fn worker_deltas(prev: &Status, now: &Status) -> Vec<(u64, u64)> {
    now.workers
        .iter()
        .map(|w| {
            let total = w.connections.as_ref().map_or(0, |c| c.total);
            let before = prev
                .workers
                .iter()
                .find(|p| p.slot == w.slot && p.instance == w.instance && p.pid == w.pid)
                .and_then(|p| p.connections.as_ref())
                .map_or(0, |c| c.total);
            (w.slot, total.saturating_sub(before))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn status(accepted: u64, workers: &[(u64, u64, u64, Option<u64>)]) -> Status {
        let workers: Vec<String> = workers
            .iter()
            .map(|&(slot, pid, instance, total)| {
                let conns = total.map_or_else(
                    || "null".to_owned(),
                    |t| format!(r#"{{"active":0,"total":{t}}}"#),
                );
                format!(
                    r#"{{"slot":{slot},"pid":{pid},"instance":{instance},"state":"ready","connections":{conns}}}"#
                )
            })
            .collect();
        Status::parse(&format!(
            r#"{{"listen":"127.0.0.1:1","mode":"proxy","protocol":"tcp",
            "connections":{{"open":0,"accepted":{accepted}}},"workers":[{}]}}"#,
            workers.join(",")
        ))
        .unwrap()
    }

    fn sample(at: Instant, status: Status) -> Sample {
        Sample {
            at,
            status,
            requests: None,
        }
    }

    #[test]
    fn rates_are_differences_over_the_time_between_polls() {
        let t0 = Instant::now();
        let mut m = Model::default();
        m.observe(sample(
            t0,
            status(100, &[(0, 10, 1, Some(40)), (1, 11, 2, Some(60))]),
        ));
        assert_eq!(m.total().now(), None, "one poll gives no rate");
        assert!(m.slot(0).is_none());

        // 2 s later: 30 more accepted, 10 by slot 0 and 20 by slot 1.
        let t1 = t0 + Duration::from_secs(2);
        m.observe(sample(
            t1,
            status(130, &[(0, 10, 1, Some(50)), (1, 11, 2, Some(80))]),
        ));
        assert_eq!(m.total().now(), Some(15));
        assert_eq!(m.slot(0).and_then(Series::now), Some(5));
        assert_eq!(m.slot(1).and_then(Series::now), Some(10));
        assert_eq!(m.unit(), Unit::Connections);

        // Slot 1's worker was replaced (new pid and instance, its total from zero), slot 0
        // left rotation: slot 1's rate is all of the new total, slot 0's is 0.
        let t2 = t1 + Duration::from_secs(1);
        m.observe(sample(
            t2,
            status(137, &[(0, 10, 1, None), (1, 12, 3, Some(7))]),
        ));
        assert_eq!(m.total().now(), Some(7));
        assert_eq!(m.slot(0).and_then(Series::now), Some(0));
        assert_eq!(m.slot(1).and_then(Series::now), Some(7));
        assert_eq!(m.slot(1).unwrap().newest_first(), [7, 10]);

        // A restarted master (counters back near zero) gives 0, not a wrapped spike; a slot
        // scaled away loses its line.
        let t3 = t2 + Duration::from_secs(1);
        m.observe(sample(t3, status(3, &[(0, 20, 1, Some(1))])));
        assert_eq!(m.total().newest_first(), [0, 7, 15]);
        assert!(m.slot(1).is_none());
        assert_eq!(m.total().max_of(2), 7);
    }

    #[test]
    fn an_unreachable_master_keeps_the_last_answer_and_the_next_answer_clears_the_error() {
        let t0 = Instant::now();
        let mut m = Model::default();
        m.observe(sample(t0, status(5, &[(0, 10, 1, Some(5))])));
        m.unreachable("no master at /tmp/x (connection refused)".into());
        assert_eq!(m.error(), Some("no master at /tmp/x (connection refused)"));
        assert_eq!(m.status().map(|s| s.workers.len()), Some(1));
        m.observe(sample(
            t0 + Duration::from_secs(3),
            status(11, &[(0, 10, 1, Some(11))]),
        ));
        assert_eq!(m.error(), None);
        assert_eq!(
            m.total().now(),
            Some(2),
            "6 over the 3 s since the last answer"
        );
    }

    #[test]
    fn http_mode_counts_requests_from_metrics() {
        let t0 = Instant::now();
        let http = |accepted| {
            let mut s = status(accepted, &[]);
            s.protocol = Some("http".into());
            s
        };
        let mut m = Model::default();
        m.observe(Sample {
            at: t0,
            status: http(1),
            requests: Some(100),
        });
        m.observe(Sample {
            at: t0 + Duration::from_millis(500),
            status: http(1),
            requests: Some(150),
        });
        assert_eq!(m.unit(), Unit::Requests);
        assert_eq!(m.unit().per_second(), "req/s");
        assert_eq!(m.total().now(), Some(100), "50 requests in half a second");
    }

    #[test]
    fn history_is_bounded() {
        let t0 = Instant::now();
        let mut m = Model::default();
        for i in 0..(HISTORY as u64 + 10) {
            m.observe(sample(t0 + Duration::from_secs(i), status(i, &[])));
        }
        assert_eq!(m.total().newest_first().len(), HISTORY);
    }
}
