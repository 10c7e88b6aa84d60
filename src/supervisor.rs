//! The supervisor: keeps one worker alive in each of N slots.
//!
//! Each slot is one task that reads straight through a worker's life (see
//! `docs/LIFECYCLE.md`): spawn → read the IPC channel → `ready{port}` → admission probe →
//! into rotation → exit or EOF → out of rotation → respawn after backoff. Exits are noticed
//! by awaiting the child, never by polling, and a worker enters rotation only after its
//! explicit `ready` and a successful probe (fail closed).

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use proxy::Backends;
use worker::codec::LineDecoder;
use worker::protocol::{MasterMessage, WorkerMessage, MAX_LINE};

use crate::child::{self, Spawned};
use crate::cli::WorkerOutput;
use crate::config::Config;
use crate::output::{self, LastLine};
use crate::ownership;

/// First respawn delay for a worker that died before becoming ready.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest respawn delay: a broken worker command is retried twice a minute, not spun.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long counts as a good start even if it never became ready, so a
/// rare crash after a long life restarts at once.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long after `ready` the announced port may take to accept the master's probe: a
/// worker may announce just before its `listen()` completes.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between admission probes.
const ADMIT_RETRY: Duration = Duration::from_millis(20);
/// Timeout of one admission connect on loopback.
const ADMIT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a stopping worker gets after SIGTERM before SIGKILL.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How the supervisor is told to stop.
#[derive(Debug, Clone, Default)]
pub struct StopTokens {
    /// Stop every worker in order (shutdown message, SIGTERM, SIGKILL after a timeout).
    pub graceful: CancellationToken,
    /// Skip the waiting: SIGKILL whatever is still running.
    pub force: CancellationToken,
}

/// State shared by all slots.
#[derive(Debug)]
struct Shared {
    config: Arc<Config>,
    backends: Arc<Backends>,
    /// The master's own listening port: a worker announcing it is lying.
    listen_port: u16,
    /// Source of unique backend keys (one per worker instance).
    next_key: AtomicU64,
    /// Workers in rotation right now.
    in_rotation: AtomicUsize,
    /// Whether "all workers ready" has been logged at info level already.
    announced_all_ready: AtomicBool,
}

/// Runs `config.workers` slots until `stop.graceful` is cancelled and every worker has been
/// stopped and reaped. Must run on a thread that lives as long as the master (see
/// [`child::spawn`]).
pub async fn run(config: Arc<Config>, backends: Arc<Backends>, listen_port: u16, stop: StopTokens) {
    let shared = Arc::new(Shared {
        listen_port,
        backends,
        next_key: AtomicU64::new(1),
        in_rotation: AtomicUsize::new(0),
        announced_all_ready: AtomicBool::new(false),
        config,
    });
    let mut slots = JoinSet::new();
    for slot in 0..shared.config.workers {
        slots.spawn(run_slot(slot, Arc::clone(&shared), stop.clone()));
    }
    while slots.join_next().await.is_some() {}
}

/// One slot: a worker, and its replacement whenever it ends, until the master stops.
async fn run_slot(slot: usize, shared: Arc<Shared>, stop: StopTokens) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let ending = run_worker(slot, &shared, &stop).await;
        if stop.graceful.is_cancelled() {
            return;
        }
        let good_start = ending.was_ready || started.elapsed() >= STABLE_AFTER;
        let delay = backoff.next(good_start);
        if !delay.is_zero() {
            tracing::warn!(slot, delay = ?delay, failures = backoff.failures, reason = %ending.reason, "worker failed before becoming ready; respawning after backoff");
            tokio::select! {
                _ = stop.graceful.cancelled() => return,
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

/// How one worker's life ended.
#[derive(Debug)]
struct Ending {
    /// Whether it was ever in rotation.
    was_ready: bool,
    /// Why it ended, for the backoff log line.
    reason: String,
}

/// Events that the worker's helper tasks report to its slot task.
#[derive(Debug)]
enum Event {
    /// The admission probe of an announced port finished.
    Admitted(Result<SocketAddr, String>),
}

/// A helper task that is aborted when its worker's life ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Spawned, not yet announced (or announced and being probed).
    Starting,
    /// In rotation.
    Ready,
}

/// Spawns a worker for `slot` and runs it until it exits, its channel closes, it misses its
/// ready deadline, or the master stops.
async fn run_worker(slot: usize, shared: &Arc<Shared>, stop: &StopTokens) -> Ending {
    let config = &shared.config;
    let Spawned {
        mut child,
        pid,
        ipc,
    } = match child::spawn(&config.program, slot, config.worker_output) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(slot, error = %e, "could not start worker");
            return Ending {
                was_ready: false,
                reason: format!("spawn failed: {e}"),
            };
        }
    };
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    tracing::info!(slot, pid, "worker spawned");

    let last_stderr: LastLine = LastLine::default();
    if config.worker_output == WorkerOutput::Prefix {
        if let Some(out) = child.stdout.take() {
            tokio::spawn(output::relay(out, slot, pid, "stdout", None));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(output::relay(
                err,
                slot,
                pid,
                "stderr",
                Some(Arc::clone(&last_stderr)),
            ));
        }
    }

    let (read, mut write) = ipc.into_split();
    let mut lines = FramedRead::new(read, LineDecoder::new(MAX_LINE));
    let (events_tx, mut events) = mpsc::channel::<Event>(4);
    let mut admission: Option<AbortOnDrop> = None;
    let mut state = State::Starting;
    let mut announced: Option<u16> = None;
    let mut was_ready = false;
    let ready_deadline = tokio::time::sleep(config.ready_timeout);
    tokio::pin!(ready_deadline);

    let leave_rotation = |state: &mut State, why: &str| {
        if *state == State::Ready && shared.backends.remove(key).is_some() {
            let left = shared.in_rotation.fetch_sub(1, Ordering::Relaxed) - 1;
            tracing::info!(
                slot,
                pid,
                reason = why,
                in_rotation = left,
                "worker out of rotation"
            );
            if left == 0 && !stop.graceful.is_cancelled() {
                tracing::warn!(
                    "no worker in rotation: new connections will be refused until one is ready"
                );
            }
        }
        *state = State::Starting;
    };

    // Why the loop ended, and whether the worker still needs stopping.
    let (reason, status) = loop {
        tokio::select! {
            status = child.wait() => {
                leave_rotation(&mut state, "exited");
                break ("exited".to_owned(), Some(status));
            }
            line = lines.next() => match line {
                Some(Ok(Ok(text))) => match WorkerMessage::parse(&text) {
                    Ok(WorkerMessage::Ready { port: None, .. }) => tracing::warn!(slot, pid, "worker sent ready without a port; ignored"),
                    Ok(WorkerMessage::Ready { port: Some(port), .. }) => {
                        if let Some(why) = reject_port(port, shared.listen_port) {
                            tracing::warn!(slot, pid, port, "worker announced a port it cannot have: {why}; ignored");
                        } else if state == State::Ready || admission.is_some() {
                            tracing::debug!(slot, pid, port, previous = ?announced, "duplicate ready ignored");
                        } else {
                            announced = Some(port);
                            let tx = events_tx.clone();
                            admission = Some(AbortOnDrop(tokio::spawn(async move {
                                let _ = tx.send(Event::Admitted(admit(pid, port).await)).await;
                            })));
                        }
                    }
                    Ok(WorkerMessage::Pong { seq }) => tracing::trace!(slot, pid, seq, "pong"),
                    Ok(WorkerMessage::Unknown) => tracing::debug!(slot, pid, line = %truncate(&text), "unknown ipc message ignored"),
                    Ok(WorkerMessage::Accepted { .. } | WorkerMessage::Rejected { .. }) => tracing::debug!(slot, pid, line = %truncate(&text), "handoff answer ignored in proxy mode"),
                    Err(e) => tracing::warn!(slot, pid, error = %e, "malformed ipc message ignored"),
                },
                Some(Ok(Err(e))) => tracing::warn!(slot, pid, error = %e, "bad ipc line ignored"),
                Some(Err(_)) | None => {
                    leave_rotation(&mut state, "ipc channel closed");
                    tracing::warn!(slot, pid, "worker closed its ipc channel; stopping it");
                    break ("ipc channel closed".to_owned(), None);
                }
            },
            Some(event) = events.recv() => match event {
                Event::Admitted(Ok(addr)) => {
                    admission = None;
                    shared.backends.insert(key, slot, addr);
                    state = State::Ready;
                    was_ready = true;
                    let now = shared.in_rotation.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(slot, pid, %addr, in_rotation = now, "worker ready");
                    if now == config.workers {
                        if shared.announced_all_ready.swap(true, Ordering::Relaxed) {
                            tracing::debug!(workers = now, "all workers ready");
                        } else {
                            tracing::info!(workers = now, "all workers ready");
                        }
                    }
                }
                Event::Admitted(Err(why)) => {
                    admission = None;
                    tracing::warn!(slot, pid, port = ?announced, "announced port not admitted: {why}");
                }
            },
            _ = &mut ready_deadline, if state == State::Starting => {
                tracing::warn!(slot, pid, timeout = ?config.ready_timeout, "worker did not become ready within --ready-timeout; replacing it");
                break (format!("no ready within {:?}", config.ready_timeout), None);
            }
            _ = stop.graceful.cancelled() => {
                leave_rotation(&mut state, "master stopping");
                // Best effort: a worker that reads its channel drains and exits by itself.
                send(&mut write, &MasterMessage::Shutdown).await;
                break ("master stopping".to_owned(), None);
            }
        }
    };
    drop(admission);
    let status = match status {
        Some(Ok(status)) => status,
        Some(Err(_)) | None => terminate(&mut child, pid, stop).await,
    };
    let expected = stop.graceful.is_cancelled();
    log_exit(slot, pid, status, expected, &last_stderr);
    Ending {
        was_ready,
        reason: format!("{reason} ({})", describe(status)),
    }
}

/// Why an announced port can never be admitted, or `None` if it may be probed.
fn reject_port(port: u16, listen_port: u16) -> Option<&'static str> {
    if port == 0 {
        Some("port 0")
    } else if port == listen_port {
        Some("the master's own listening port")
    } else {
        None
    }
}

/// Admission of an announced port: it must be a listening socket held by the worker (or one
/// of its descendants) and accept a TCP connection from the master. Retried briefly, since a
/// worker may announce just before its `listen()` completes.
async fn admit(pid: u32, port: u16) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + ADMIT_TIMEOUT;
    let candidates = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    let mut last = String::from("no listening socket on that port");
    loop {
        if ownership::owns_listening_port(pid, port) {
            for addr in candidates {
                match proxy::health::tcp(addr, ADMIT_CONNECT_TIMEOUT).await {
                    Ok(()) => return Ok(addr),
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
        } else {
            last = format!("port {port} is not a listening socket of this worker");
        }
        if Instant::now() >= deadline {
            return Err(format!("{last} (gave up after {ADMIT_TIMEOUT:?})"));
        }
        tokio::time::sleep(ADMIT_RETRY).await;
    }
}

/// Stops a worker that is still running: SIGTERM to its process group, SIGKILL after
/// [`WORKER_STOP_TIMEOUT`] (at once if `stop.force` fires), then reaps it.
async fn terminate(child: &mut tokio::process::Child, pid: u32, stop: &StopTokens) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    if !stop.force.is_cancelled() {
        child::signal(pid, Signal::SIGTERM);
        tokio::select! {
            status = child.wait() => if let Ok(status) = status { return status },
            _ = tokio::time::sleep(WORKER_STOP_TIMEOUT) => {
                tracing::warn!(pid, timeout = ?WORKER_STOP_TIMEOUT, "worker ignored SIGTERM; sending SIGKILL");
            }
            _ = stop.force.cancelled() => {}
        }
    }
    // Still unreaped here, so the pid is still ours to signal.
    if matches!(child.try_wait(), Ok(None)) {
        child::signal(pid, Signal::SIGKILL);
    }
    loop {
        match child.wait().await {
            Ok(status) => return status,
            // wait() fails only on an interrupted syscall; try again.
            Err(e) => tracing::debug!(pid, error = %e, "waiting for worker"),
        }
    }
}

fn log_exit(slot: usize, pid: u32, status: ExitStatus, expected: bool, last_stderr: &LastLine) {
    let status = describe(status);
    if expected {
        tracing::info!(slot, pid, %status, "worker stopped");
    } else {
        let last = last_stderr.lock().ok().and_then(|l| l.clone());
        match last {
            Some(line) => tracing::warn!(slot, pid, %status, last_stderr = %line, "worker exited"),
            None => tracing::warn!(slot, pid, %status, "worker exited"),
        }
    }
}

/// `exit code 3` or `signal 9 (SIGKILL)`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(name) => format!("signal {sig} ({name})"),
            Err(_) => format!("signal {sig}"),
        },
        (None, None) => status.to_string(),
    }
}

/// Writes one message to a worker. Errors are ignored: a worker that cannot be written to is
/// gone or going, and its exit is handled where it is awaited.
async fn send(write: &mut OwnedWriteHalf, msg: &MasterMessage) {
    if let Err(e) = write.write_all(msg.to_line().as_bytes()).await {
        tracing::debug!(error = %e, "ipc send failed");
    }
}

/// The first 200 characters of an IPC line, for logs.
fn truncate(line: &str) -> &str {
    match line.char_indices().nth(200) {
        Some((i, _)) => &line[..i],
        None => line,
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

    #[test]
    fn ports_that_cannot_be_admitted() {
        assert!(reject_port(0, 80).is_some());
        assert!(reject_port(80, 80).is_some());
        assert!(reject_port(8080, 80).is_none());
    }
}
