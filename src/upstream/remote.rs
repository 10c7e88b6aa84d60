//! One remote backend's life, from the moment its address is known until it is retired:
//! first check, rotation, active and passive health, and the drain when its address leaves
//! DNS. A remote backend is never restarted or replaced (it is not ours): a failing one only
//! leaves rotation, and comes back after `rise` passing checks.
//!
//! The decisions are the workers': the same [`Tally`] (`rise`/`fall`, one log line per flip),
//! the same checks (`--health-check tcp|http`) and the same passive rule (`fall` failed
//! connects in a row take it out between checks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use proxy::Backend;

use crate::health::{Check, Flip, Tally};

use super::table::State;
use super::Context;

/// How often a retired backend's open connections are counted while they finish.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// A running remote backend, driven by its own task.
#[derive(Debug)]
pub struct Remote {
    retire: CancellationToken,
    task: JoinHandle<()>,
}

impl Remote {
    /// Starts checking `addr` (found through `source`); it joins rotation once a check
    /// passes.
    pub fn start(ctx: &Arc<Context>, source: &Arc<str>, addr: SocketAddr) -> Self {
        let backend = Arc::new(Backend::remote(
            ctx.next_key(),
            ctx.next_index(),
            Arc::clone(source),
            addr,
        ));
        let retire = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(ctx), backend, retire.clone()));
        Self { retire, task }
    }

    /// Takes it out of rotation at once; its open connections get up to `--grace`.
    pub fn retire(&self) {
        self.retire.cancel();
    }

    /// Whether its task is done.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until its task is done (retired and drained, or the master stopping).
    pub async fn finished(self) {
        let _ = self.task.await;
    }
}

/// Where a remote backend is, and its tally once it has passed a first check.
struct Life {
    state: State,
    tally: Option<Tally>,
}

/// What a check result, or the passive rule, changed.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Into rotation, for this reason.
    Enter(&'static str),
    /// Out of rotation, for this reason.
    Leave(&'static str),
    /// The first failed check of a backend never seen up (logged once).
    NotYet,
    None,
}

impl Life {
    fn new() -> Self {
        Self {
            state: State::Checking,
            tally: None,
        }
    }

    /// One active check's result.
    fn on_check(&mut self, ok: bool, rise: u32, fall: u32, failed_before: bool) -> Change {
        match (&mut self.tally, ok) {
            (None, true) => {
                self.tally = Some(Tally::new(rise, fall));
                self.state = State::Up;
                Change::Enter("first check passed")
            }
            (None, false) if !failed_before => Change::NotYet,
            (None, false) => Change::None,
            // The thresholds in force now: a SIGHUP may have changed them.
            (Some(t), ok) => {
                t.set_limits(rise, fall);
                match t.record(ok) {
                    Flip::Down => {
                        self.state = State::Down;
                        Change::Leave("health checks failing")
                    }
                    Flip::Up => {
                        self.state = State::Up;
                        Change::Enter("health checks passing")
                    }
                    Flip::None => Change::None,
                }
            }
        }
    }

    /// Passive health: `connects` failed in a row, `responses` connections in a row left
    /// unanswered for `--response-timeout`.
    fn on_passive(&mut self, connects: u32, responses: u32, fall: u32) -> Change {
        let why = if connects >= fall {
            "connects failing"
        } else if responses >= fall {
            "responses missing"
        } else {
            return Change::None;
        };
        let Some(t) = &mut self.tally else {
            return Change::None;
        };
        if t.force_down() == Flip::Down {
            self.state = State::Down;
            Change::Leave(why)
        } else {
            Change::None
        }
    }
}

async fn run(ctx: Arc<Context>, backend: Arc<Backend>, retire: CancellationToken) {
    let mut checks = ctx.health.load();
    let name = ctx.table.added(&backend, &checks.check);
    let (key, addr) = (backend.key, backend.addr);
    let source = backend.upstream.clone().unwrap_or_default();
    // The HTTP check's Host: the upstream as given (`app:8080`, or the literal address).
    let host = source.to_string();
    let mut life = Life::new();
    let mut failed_before = false;
    // The first tick is at once: a new address is checked as soon as it is known.
    let mut ticker = interval(checks.health.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // A SIGHUP may have changed the settings: a new interval starts from now.
        let now = ctx.health.load();
        if now.health.interval != checks.health.interval {
            let period = now.health.interval;
            ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        checks = now;
        let health = &checks.health;
        let checked = async {
            ticker.tick().await;
            probe(&checks.check, addr, &host, health.timeout).await
        };
        let result = tokio::select! {
            _ = ctx.stop.cancelled() => {
                ctx.backends.remove(key);
                break;
            }
            _ = retire.cancelled() => {
                drain(&ctx, &backend, &name).await;
                break;
            }
            r = checked => r,
        };
        let passive = life.on_passive(
            backend.connect_failures(),
            backend.response_failures(),
            health.fall,
        );
        apply(&ctx, &backend, &name, &source, &life, passive);
        let Some(result) = result else {
            tracing::debug!(backend = %name, "health check skipped: the master is out of descriptors");
            continue;
        };
        if let Err(why) = &result {
            tracing::debug!(backend = %name, %addr, error = %why, "health check failed");
        }
        ctx.table
            .checked(key, result.as_ref().err().map(String::as_str));
        let change = life.on_check(result.is_ok(), health.rise, health.fall, failed_before);
        failed_before |= result.is_err();
        if change == Change::NotYet {
            tracing::warn!(backend = %name, %addr, source = %source, error = %result.as_ref().err().map_or("", String::as_str), "upstream backend not in rotation yet");
        }
        apply(&ctx, &backend, &name, &source, &life, change);
    }
    ctx.table.gone(key);
}

/// Carries out a change: the backend set, the status table and the one log line.
fn apply(
    ctx: &Context,
    backend: &Arc<Backend>,
    name: &str,
    source: &str,
    life: &Life,
    change: Change,
) {
    let addr = backend.addr;
    match change {
        Change::Enter(why) => {
            ctx.backends.put(Arc::clone(backend));
            ctx.table.set(backend.key, life.state, why);
            tracing::info!(backend = %name, %addr, source, reason = why, in_rotation = ctx.backends.len(), "upstream backend up");
        }
        Change::Leave(why) => {
            ctx.backends.mark_down(backend.key);
            ctx.table.set(backend.key, life.state, why);
            // Kept aside, as a worker is: if every backend is down, all of them get
            // connections (panic mode, logged by the backend set).
            tracing::warn!(backend = %name, %addr, source, reason = why, in_rotation = ctx.backends.len(), "upstream backend down");
        }
        Change::NotYet => ctx.table.set(backend.key, life.state, "first check failed"),
        Change::None => {}
    }
}

/// Out of rotation at once; open connections get up to `--grace`, then are closed.
async fn drain(ctx: &Context, backend: &Arc<Backend>, name: &str) {
    ctx.backends.remove(backend.key);
    ctx.table
        .set(backend.key, State::Draining, "address left DNS");
    let open = backend.active();
    tracing::info!(backend = %name, addr = %backend.addr, open_connections = open, reason = "address left DNS", "upstream backend retired");
    // The grace in force at the retirement (a SIGHUP may have re-read --grace).
    let grace = ctx.grace.get();
    let deadline = tokio::time::Instant::now() + grace;
    while backend.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL) => {}
            _ = ctx.stop.cancelled() => return,
        }
    }
    let open = backend.active();
    if open > 0 {
        tracing::warn!(backend = %name, open_connections = open, grace = ?grace, "grace period over; closing the retired backend's connections");
        backend.close_connections();
    }
}

/// Runs one active check. `None`: the master could not run it (out of descriptors), which
/// says nothing about the backend.
async fn probe(
    check: &Check,
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
) -> Option<Result<(), String>> {
    let r = match check {
        Check::Http(path) => proxy::health::http_as(addr, host, path, timeout).await,
        _ => proxy::health::tcp(addr, timeout).await,
    };
    match r {
        Err(e) if e.is_local_exhaustion() => None,
        r => Some(r.map_err(|e| format!("{e:#}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_on_the_first_pass_then_flips_by_rise_and_fall() {
        let mut life = Life::new();
        assert_eq!(life.on_check(false, 2, 2, false), Change::NotYet);
        assert_eq!(life.on_check(false, 2, 2, true), Change::None);
        // Passive failures mean nothing before it ever joined.
        assert_eq!(life.on_passive(9, 9, 2), Change::None);
        assert_eq!(
            life.on_check(true, 2, 2, true),
            Change::Enter("first check passed")
        );
        assert_eq!(life.state, State::Up);
        assert_eq!(life.on_check(false, 2, 2, true), Change::None);
        assert_eq!(
            life.on_check(false, 2, 2, true),
            Change::Leave("health checks failing")
        );
        assert_eq!(life.state, State::Down);
        assert_eq!(life.on_check(true, 2, 2, true), Change::None);
        assert_eq!(
            life.on_check(true, 2, 2, true),
            Change::Enter("health checks passing")
        );
        assert_eq!(life.on_passive(1, 1, 2), Change::None);
        assert_eq!(life.on_passive(2, 0, 2), Change::Leave("connects failing"));
        // Already down: no second flip.
        assert_eq!(life.on_passive(5, 5, 2), Change::None);
        assert_eq!(life.on_check(true, 2, 2, true), Change::None);
        assert_eq!(
            life.on_check(true, 2, 2, true),
            Change::Enter("health checks passing")
        );
        assert_eq!(life.on_passive(0, 2, 2), Change::Leave("responses missing"));
    }
}
