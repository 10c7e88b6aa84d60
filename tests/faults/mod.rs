//! Fault suite (issue 3): the real binary under load while workers, clients and the IPC
//! channel misbehave. The promise under test: while at least one worker is healthy, no new
//! client connection fails.
//!
//! Each scenario runs `balancer` on a loopback port, drives it with the [`load`] client,
//! breaks something (kills, stops, reloads, crashing or one-shot workers, a low fd limit,
//! idle clients, abusive IPC, a stop with requests in flight), counts every client-side
//! failure by kind, and prints one `faults: scenario=...` summary line; those lines make the
//! table in `tests/faults/RESULTS.md` (`tests/faults/results.py` builds it).
//!
//! Tests that show a product bug are `#[ignore]`d with the bug in the reason; run them with
//! `cargo nextest run --test tests faults --run-ignored all`.
//!
//! Time is read from the test's own clock (`Instant`) and, where the product's timing is the
//! point (backoff), from the log's timestamps. Nothing waits with a bare sleep: conditions
//! are polled under deadlines; sleeps only pace load and kill loops.

mod load;
pub(crate) mod procfs;
mod python;
pub(crate) mod rlimit;

mod hostile;
mod ipc;
mod kills;
mod limits;
mod reloads;
mod respawns;
mod shutdown;
mod streams;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;
use load::{Attempt, Kinds, Load, Outcome, Spec};
use procfs::*;

/// How long workers may take from spawn to rotation on a busy 2-core machine running other
/// tests at once (the built-in worker is a debug build; a python worker starts in ~50 ms).
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing left to drain may take.
const EXIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Reading the master: its log, its admin endpoint.

/// Waits until `n` workers are in rotation at once (by the log) and the master accepts.
/// The master starts its proxy threads (their runtimes, epoll fds and listener copies) on
/// its main loop once the first worker is ready, a moment after that worker's `worker
/// ready`: a descriptor count taken before then is short of them (as in
/// [`wait_all_ready`]).
fn wait_in_rotation(b: &Balancer, n: usize, timeout: Duration) {
    let ok = wait_until(timeout, || {
        rotation(&b.lines())
            .keys()
            .filter(|&&p| pid_alive(p))
            .count()
            >= n
    });
    assert!(
        ok,
        "{n} workers never in rotation within {timeout:?}; log:\n{}",
        b.dump()
    );
    b.expect_line(0, "the master accepting", timeout, |l| {
        is_event(l, "a worker is ready: accepting")
            || is_event(l, "an upstream is in rotation: accepting")
    });
}

/// The workers in rotation according to the log, `pid -> slot`: `worker ready` puts one in,
/// `worker out of rotation` takes it out.
fn rotation(lines: &[String]) -> BTreeMap<u32, u32> {
    let mut set = BTreeMap::new();
    for l in lines {
        if is_event(l, "worker ready") {
            if let (Some(pid), Some(slot)) = (field_u32(l, "pid"), field_u32(l, "slot")) {
                set.insert(pid, slot);
            }
        } else if is_event(l, "worker out of rotation") {
            if let Some(pid) = field_u32(l, "pid") {
                set.remove(&pid);
            }
        }
    }
    set
}

/// The log events with `message`.
fn events<'a>(lines: &'a [String], message: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    lines.iter().filter(move |l| is_event(l, message))
}

/// The address of `--admin 127.0.0.1:0`, from its log line.
fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
}

/// The admin endpoint's Prometheus counters and gauges, `name -> value` (labels kept in
/// the name: `balancer_workers{state="ready"}`).
fn metrics(admin: SocketAddr) -> BTreeMap<String, u64> {
    let (status, body) = get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One counter of [`metrics`], 0 when absent.
fn metric(m: &BTreeMap<String, u64>, name: &str) -> u64 {
    m.get(name).copied().unwrap_or(0)
}

/// The time of a log line, seconds since the Unix epoch (`2026-11-27T10:57:35.642447Z`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split(' ').next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s = t.next()?.parse::<f64>().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// The `status=` of a `worker exited` or `worker stopped` line (`exit code 0`,
/// `signal 9 (SIGKILL)`).
fn exit_status(line: &str) -> &str {
    let Some((_, rest)) = line.split_once(" status=") else {
        return "?";
    };
    rest.split(" last_stderr=").next().unwrap_or(rest)
}

/// Prints the one summary line of a scenario (collected into `RESULTS.md`).
fn summary(scenario: &str, fields: &[(&str, String)]) {
    let mut line = format!("faults: scenario={scenario}");
    for (k, v) in fields {
        line.push_str(&format!(" {k}={v}"));
    }
    eprintln!("{line}");
}

/// Sends `n` requests one after the other; returns them.
fn sequential(addr: SocketAddr, n: usize, timeout: Duration) -> load::Report {
    load::Report {
        attempts: (0..n)
            .map(|_| load::request(addr, load::REQUEST, timeout))
            .collect(),
    }
}
