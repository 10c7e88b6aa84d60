//! The supervisor: keeps one worker alive in each of N slots, replaces them one slot at a
//! time on a rolling reload, and adds or removes slots when scaled.
//!
//! Each slot is one task that reads straight through (see `docs/LIFECYCLE.md`): start an
//! [`Instance`] → it runs until it ends → respawn after backoff. A reload asks each slot in
//! turn to start a second instance, wait until it is admitted, then retire the old one.
//! Scaling up starts slots N, N+1, …; scaling down retires the highest slots: each worker
//! leaves rotation, drains (up to `--grace`) and stops, and its slot ends without a respawn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::control::{ScaleRequest, Scaled};
use crate::instance::{Context, Inherited, Instance, StopTokens};

/// First respawn delay for a worker that died before becoming ready.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest respawn delay: a broken worker command is retried twice a minute, not spun.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long counts as a good start even if it never became ready, so a
/// rare crash after a long life restarts at once.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How often processes that workers left behind and that have exited are reaped: a zombie
/// holds only a pid meanwhile.
const ORPHAN_REAP_INTERVAL: Duration = Duration::from_secs(1);

/// A request to a slot to replace its worker; answered with why it could not.
type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// A running slot, as the supervisor steers it.
#[derive(Debug)]
struct SlotHandle {
    /// Asks it to replace its worker (a rolling reload's step).
    reload: mpsc::Sender<ReloadRequest>,
    /// Scaled away: retire the worker and end the slot.
    remove: CancellationToken,
}

/// Runs `ctx.desired()` slots until `stop.graceful` is cancelled and every worker has been
/// stopped and reaped. Each message on `reloads` asks for a rolling reload; requests that
/// arrive during a reload are coalesced into one more. Each message on `scales` changes the
/// number of slots, also during a reload. Must run on a thread that lives as long as the
/// master (see [`crate::child::spawn`]).
///
/// `adopted`: workers carried across an in-place upgrade; each takes its slot instead of a
/// new spawn (a slot without one spawns as usual).
pub async fn run(
    ctx: Arc<Context>,
    stop: StopTokens,
    mut reloads: mpsc::Receiver<()>,
    mut scales: mpsc::Receiver<ScaleRequest>,
    adopted: Vec<Inherited>,
) {
    let mut tasks = JoinSet::new();
    let mut slots: Vec<SlotHandle> = Vec::new();
    let mut adopted: Vec<Option<Inherited>> = {
        let mut by_slot: Vec<Option<Inherited>> = (0..ctx.desired()).map(|_| None).collect();
        for w in adopted {
            // Told apart from what workers leave behind before the orphan reaper first runs.
            ctx.orphans.started(w.record.pid);
            match by_slot.get_mut(w.record.slot) {
                Some(place @ None) => *place = Some(w),
                // Not a slot of this master: dropping it closes its channel, so it exits.
                _ => tracing::warn!(
                    slot = w.record.slot,
                    pid = w.record.pid,
                    "carried worker has no slot; its channel is closed"
                ),
            }
        }
        by_slot
    };
    for slot in 0..ctx.desired() {
        let first = adopted.get_mut(slot).and_then(Option::take);
        add_slot(&mut slots, &mut tasks, &ctx, &stop, first);
    }
    // Processes that workers left behind and that exit by themselves are reaped by pid (see
    // `orphans`); the ones still running are stopped when a worker ends and at the end.
    let mut reap = tokio::time::interval(ORPHAN_REAP_INTERVAL);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reloading: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
        None;
    loop {
        tokio::select! {
            _ = stop.graceful.cancelled() => break,
            _ = reap.tick() => {
                ctx.orphans.reap_exited();
            }
            request = reloads.recv(), if reloading.is_none() => {
                if request.is_none() {
                    break;
                }
                // Coalesce: everything already queued is served by this one reload.
                while reloads.try_recv().is_ok() {}
                crate::systemd::reloading();
                let steps: Vec<_> = slots.iter().map(|s| s.reload.clone()).collect();
                reloading = Some(Box::pin(rolling_reload(steps)));
            }
            () = async { reloading.as_mut().expect("guarded").await }, if reloading.is_some() => {
                reloading = None;
                // Done or aborted, the service serves again (with the old workers where the
                // reload stopped).
                crate::systemd::ready(ctx.in_rotation(), ctx.listen);
            }
            Some(request) = scales.recv() => {
                let answer = scale(&request, &mut slots, &mut tasks, &ctx, &stop);
                if let Some(reply) = request.reply {
                    let _ = reply.send(answer);
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    // Every worker is reaped: whatever is still re-parented to the master goes now.
    let patience = if stop.force.is_cancelled() {
        Duration::ZERO
    } else {
        crate::orphans::LEFTOVER_STOP_TIMEOUT
    };
    let stopped = ctx.orphans.stop_leftovers(None, patience).await;
    if stopped > 0 {
        tracing::info!(
            processes = stopped,
            "stopped processes that workers left behind"
        );
    }
}

/// Starts slot number `slots.len()`, with its `first` worker adopted if given.
fn add_slot(
    slots: &mut Vec<SlotHandle>,
    tasks: &mut JoinSet<()>,
    ctx: &Arc<Context>,
    stop: &StopTokens,
    first: Option<Inherited>,
) {
    let (reload, rx) = mpsc::channel::<ReloadRequest>(1);
    let remove = CancellationToken::new();
    let slot = slots.len();
    if first.is_none() {
        ctx.registry.new_slot(slot);
    }
    tasks.spawn(run_slot(
        slot,
        Arc::clone(ctx),
        stop.clone(),
        rx,
        remove.clone(),
        first,
    ));
    slots.push(SlotHandle { reload, remove });
}

/// Carries out one scale request: adds slots, or removes the highest ones (each retires its
/// worker: out of rotation, drained, stopped). Never fewer than one slot while there are no
/// remote upstreams: there would be nothing to serve.
fn scale(
    request: &ScaleRequest,
    slots: &mut Vec<SlotHandle>,
    tasks: &mut JoinSet<()>,
    ctx: &Arc<Context>,
    stop: &StopTokens,
) -> Result<Scaled, String> {
    let from = slots.len();
    let min = usize::from(ctx.config().upstream.upstreams.is_empty());
    let to = request.to.target(from, min).inspect_err(|why| {
        tracing::warn!(requested_by = request.from, reason = %why, "scale refused");
    })?;
    if to != from {
        tracing::info!(from, to, requested_by = request.from, "scaling workers");
    }
    ctx.set_desired(to);
    while slots.len() < to {
        add_slot(slots, tasks, ctx, stop, None);
    }
    while slots.len() > to {
        if let Some(gone) = slots.pop() {
            gone.remove.cancel();
        }
    }
    Ok(Scaled { from, to })
}

/// Replaces every slot's worker, one slot at a time; stops at the first slot whose new
/// worker does not become ready (its old worker keeps serving).
async fn rolling_reload(slots: Vec<mpsc::Sender<ReloadRequest>>) {
    let started = Instant::now();
    tracing::info!(workers = slots.len(), "rolling reload started");
    for (slot, tx) in slots.iter().enumerate() {
        let (reply, answer) = oneshot::channel();
        if tx.send(reply).await.is_err() {
            // Scaled away meanwhile: nothing to replace there.
            continue;
        }
        match answer.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                tracing::error!(slot, reason = %why, "rolling reload aborted; the remaining old workers keep serving");
                return;
            }
            // Scaled away while replacing.
            Err(_) => continue,
        }
    }
    tracing::info!(elapsed = ?started.elapsed(), "rolling reload done");
}

/// One slot: a worker, and its replacement whenever it ends, until the master stops.
async fn run_slot(
    slot: usize,
    ctx: Arc<Context>,
    stop: StopTokens,
    mut reloads: mpsc::Receiver<ReloadRequest>,
    remove: CancellationToken,
    mut first: Option<Inherited>,
) {
    let mut backoff = Backoff::default();
    'respawn: while !stop.graceful.is_cancelled()
        && !remove.is_cancelled()
        && !stop.drain.is_cancelled()
    {
        let started = Instant::now();
        let mut current = match first.take() {
            Some(inherited) => Instance::adopt(inherited, Arc::clone(&ctx), stop.clone()),
            None => Instance::start(slot, Arc::clone(&ctx), stop.clone()),
        };
        let ending = loop {
            tokio::select! {
                ending = current.finished() => break ending,
                () = remove.cancelled() => {
                    // Scaled away: out of rotation, drained up to --grace, stopped.
                    current.retire();
                    let ending = current.finished().await;
                    tracing::info!(slot, reason = %ending.reason, "slot removed by scaling");
                    return;
                }
                Some(reply) = reloads.recv() => {
                    let mut next = Instance::start(slot, Arc::clone(&ctx), stop.clone());
                    if next.wait_ready().await {
                        let mut old = std::mem::replace(&mut current, next);
                        old.retire();
                        // The reload moves to the next slot only once this one's old worker
                        // is gone: never more than N + 1 workers alive.
                        old.finished().await;
                        let _ = reply.send(Ok(()));
                    } else {
                        let ending = next.finished().await;
                        let _ = reply.send(Err(format!("new worker for slot {slot} did not become ready: {}", ending.reason)));
                    }
                }
            }
        };
        if stop.graceful.is_cancelled() || stop.drain.is_cancelled() {
            break 'respawn;
        }
        let good_start = ending.was_ready || started.elapsed() >= STABLE_AFTER;
        let delay = backoff.next(good_start);
        if !delay.is_zero() {
            if ending.daemonized {
                tracing::warn!(slot, delay = ?delay, failures = backoff.failures, "worker daemonized; respawning after backoff");
            } else {
                tracing::warn!(slot, delay = ?delay, failures = backoff.failures, reason = %ending.reason, "worker failed before becoming ready; respawning after backoff");
            }
            if !ctx.all_were_ready() && ctx.in_rotation() == 0 {
                // Nothing has ever served: say plainly why, once per failure.
                let last = ending
                    .last_stderr
                    .as_deref()
                    .unwrap_or("(nothing on stderr)");
                tracing::error!(slot, reason = %ending.reason, last_stderr = ?last, "no worker has become ready yet");
            }
            tokio::select! {
                _ = stop.graceful.cancelled() => break 'respawn,
                () = remove.cancelled() => break 'respawn,
                _ = stop.drain.cancelled() => break 'respawn,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Exponential backoff with jitter for workers that die before becoming ready.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self, good_start: bool) -> Duration {
        if good_start {
            self.failures = 0;
            return Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        let exp = BACKOFF_MIN.saturating_mul(1u32 << (self.failures - 1).min(20));
        let base = exp.min(BACKOFF_MAX);
        // Up to +25% jitter, so slots that fail together do not retry in lockstep.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::default();
        let first = b.next(false);
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN.mul_f64(1.25));
        let second = b.next(false);
        assert!(second >= BACKOFF_MIN * 2);
        for _ in 0..40 {
            assert!(b.next(false) <= BACKOFF_MAX.mul_f64(1.25));
        }
        assert_eq!(b.next(true), Duration::ZERO);
        assert!(b.next(false) <= BACKOFF_MIN.mul_f64(1.25));
    }
}
