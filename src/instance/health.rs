//! Active and passive health of one admitted worker: the check ticks, TCP/HTTP probes on
//! helper tasks, IPC `ping`/`pong`, passive connect failures seen by the proxy, and the
//! `Ready` ⇄ `Down` transitions they cause. The rise/fall rules themselves are
//! [`crate::health::Tally`]'s.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use tokio::time::{interval_at, Interval, MissedTickBehavior};

use worker::protocol::MasterMessage;

use crate::health::{Check, Flip, Tally};

use super::run::{AbortOnDrop, End, Helper, Worker};
use crate::state::Reason;

/// One worker's checks.
pub(super) struct Health {
    /// The check it gets, once admitted.
    check: Option<Check>,
    tally: Tally,
    /// Check ticks; `None` until admitted.
    ticker: Option<Interval>,
    /// The last ping's sequence number, and when it was sent while unanswered.
    ping: (u64, Option<Instant>),
    /// The TCP or HTTP probe under way.
    probe: Option<AbortOnDrop>,
    /// A result waiting to be recorded once the current event is handled.
    result: Option<bool>,
    /// The backend's count of answered connections at the last recorded check.
    answered: u64,
}

impl Health {
    /// No checks yet (they start at admission).
    pub(super) fn new(tally: Tally) -> Self {
        Self {
            check: None,
            tally,
            ticker: None,
            ping: (0, None),
            probe: None,
            answered: 0,
            result: None,
        }
    }

    /// Starts checking with `check` every `interval`, the first one interval from now.
    pub(super) fn start(&mut self, check: Check, interval: Duration) {
        self.check = Some(check);
        let mut t = interval_at(tokio::time::Instant::now() + interval, interval);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.ticker = Some(t);
    }

    /// The next check tick, or never when checks have not started.
    pub(super) async fn tick(&mut self) {
        match &mut self.ticker {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Stops a probe under way.
    pub(super) fn cancel(&mut self) {
        self.probe = None;
    }
}

impl Worker {
    /// A check is due: passive failures first, then the active check.
    pub(super) async fn on_tick(&mut self) {
        let (slot, pid) = (self.slot, self.pid);
        let fall = self.ctx.config().health.fall;
        let (connects, responses) = self.rotation.passive_failures();
        if self.health.tally.is_up()
            && connects.max(responses) >= fall
            && self.health.tally.force_down() == Flip::Down
        {
            if connects >= fall {
                tracing::warn!(
                    slot,
                    pid,
                    connect_failures = connects,
                    "worker down: connects keep failing"
                );
                self.rotation.leave(Reason::ConnectsFailing, false);
            } else {
                tracing::warn!(
                    slot,
                    pid,
                    response_timeouts = responses,
                    "worker down: responses keep timing out"
                );
                self.rotation.leave(Reason::ResponsesTimingOut, false);
            }
        }
        let timeout = self.ctx.config().health.timeout;
        match (&self.health.check, self.admission.addr) {
            (Some(Check::Ipc), _) => {
                let ping = &mut self.health.ping;
                if ping.1.take().is_some() {
                    self.health.result = Some(false);
                }
                ping.0 += 1;
                ping.1 = Some(Instant::now());
                let line = MasterMessage::Ping { seq: ping.0 }.to_line();
                self.ipc.send_line(&line).await;
            }
            (Some(Check::Liveness), _) => {}
            (Some(check), Some(at)) if self.health.probe.is_none() => {
                let (tx, check) = (self.events_tx.clone(), check.clone());
                self.health.probe = Some(AbortOnDrop(tokio::spawn(async move {
                    let r = match check {
                        Check::Http(path) => proxy::health::http(at, &path, timeout).await,
                        _ => proxy::health::tcp(at, timeout).await,
                    };
                    let r = match r {
                        Err(e) if e.is_local_exhaustion() => None,
                        r => Some(r.map_err(|e| e.to_string())),
                    };
                    let _ = tx.send(Helper::Checked(r)).await;
                })));
            }
            // A probe still running at the next tick has taken a whole interval.
            (Some(_), Some(_)) => self.health.result = Some(false),
            _ => {}
        }
    }

    /// A TCP or HTTP check finished. `None`: the master could not run it (out of
    /// descriptors), which says nothing about the worker.
    pub(super) fn on_checked(&mut self, result: Option<Result<(), String>>) {
        self.health.probe = None;
        match result {
            Some(Err(why)) => {
                tracing::debug!(slot = self.slot, pid = self.pid, error = %why, "health check failed");
                self.health.result = Some(false);
            }
            Some(Ok(())) => self.health.result = Some(true),
            None => tracing::debug!(
                slot = self.slot,
                pid = self.pid,
                "health check skipped: the master is out of descriptors"
            ),
        }
    }

    /// `pong{seq}`: the answer to the last ping counts if it came within the timeout.
    pub(super) fn on_pong(&mut self, seq: u64) {
        if let (expected, Some(sent)) = self.health.ping {
            if seq == expected {
                self.health.ping.1 = None;
                self.health.result = Some(sent.elapsed() <= self.ctx.config().health.timeout);
            }
        }
    }

    /// Records the result the last event produced, if any: `Ready` ⇄ `Down` on a flip, and
    /// a worker that stays down is replaced.
    pub(super) fn record_check(&mut self) -> ControlFlow<End> {
        let Some(ok) = self.health.result.take() else {
            return ControlFlow::Continue(());
        };
        let (slot, pid) = (self.slot, self.pid);
        let health = &self.ctx.config().health;
        match self.health.tally.record(ok) {
            Flip::Down => {
                tracing::warn!(
                    slot,
                    pid,
                    fall = health.fall,
                    "worker down: health checks failing"
                );
                self.rotation.leave(Reason::ChecksFailing, false);
            }
            Flip::Up => {
                tracing::info!(
                    slot,
                    pid,
                    rise = health.rise,
                    "worker up: health checks passing"
                );
                if let Some(at) = self.admission.addr {
                    self.rotation.enter(at, Reason::ChecksPassing);
                }
            }
            Flip::None => {}
        }
        let answered = self.rotation.answered();
        let answering = answered != std::mem::replace(&mut self.health.answered, answered);
        if !self.health.tally.is_up() && self.health.tally.down_failures() >= health.fall {
            if answering {
                // It fails its checks but answers the clients it gets (in panic mode, all of
                // them): overloaded, not hung. Replacing it would turn a slowdown into an
                // outage (under a flood every worker fails its checks at once).
                tracing::debug!(
                    slot,
                    pid,
                    "worker failing checks but answering clients; kept"
                );
            } else if self.stop.drain.is_cancelled() {
                // The master is draining: nothing would be respawned, and killing the worker
                // now would cut the requests it is busy with (a single-threaded worker deep in
                // a slow request fails its checks). The stop sequence ends it in its turn.
                tracing::debug!(
                    slot,
                    pid,
                    "worker failing checks while the master drains; kept"
                );
            } else {
                tracing::warn!(slot, pid, "worker unresponsive; replacing it");
                return ControlFlow::Break(End::running(Reason::Unresponsive));
            }
        }
        ControlFlow::Continue(())
    }
}
