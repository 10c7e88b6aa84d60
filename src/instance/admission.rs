//! Admission: what must hold before a worker enters rotation ([`Gate`]), the probe that
//! checks it, and the transitions around it: `ready` → admitting → `Ready`, or the ready
//! timeout.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use tokio::time::Instant as Deadline;

use worker::protocol::Mode;

use crate::cli::ReadyArg;
use crate::config::WorkerProgram;
use crate::health::{Check, CheckKind};
use crate::ownership;

use super::handoff::{self, Delivery};
use super::run::{AbortOnDrop, End, Helper, Worker};
use crate::state::Reason;

/// The least time an admission gets, even late in the ready timeout: a worker may announce
/// just before its `listen()` completes.
const ADMIT_MIN: Duration = Duration::from_secs(2);
/// Pause between admission probes.
const ADMIT_RETRY: Duration = Duration::from_millis(20);
/// Timeout of one admission connect on loopback.
const ADMIT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Where one worker's admission stands.
pub(super) struct Admission {
    /// The probe under way, if any.
    task: Option<AbortOnDrop>,
    /// The port of the `ready` whose admission is under way.
    probing: Option<u16>,
    /// The address it was admitted with; `None` until then.
    pub(super) addr: Option<SocketAddr>,
    /// The `--ready-timeout` deadline.
    pub(super) ready_by: Deadline,
    /// The port chosen for it under `--ready port`.
    assigned_port: Option<u16>,
}

impl Admission {
    /// Nothing admitted yet; `ready_by` is the ready deadline.
    pub(super) fn new(ready_by: Deadline, assigned_port: Option<u16>) -> Self {
        Self {
            task: None,
            probing: None,
            addr: None,
            ready_by,
            assigned_port,
        }
    }

    /// Whether the worker was ever admitted.
    pub(super) fn admitted(&self) -> bool {
        self.addr.is_some()
    }

    /// Stops a probe under way.
    pub(super) fn cancel(&mut self) {
        self.task = None;
    }

    /// Stops the probe of a `ready` that named `port`, if one is under way; whether there
    /// was one.
    pub(super) fn cancel_probe_of(&mut self, port: u16) -> bool {
        if self.task.is_some() && self.probing == Some(port) {
            self.task = None;
            self.probing = None;
            return true;
        }
        false
    }
}

impl Worker {
    /// Starts admitting at once where nothing will be announced: the assigned port under
    /// `--ready port` (proxy), a socket on the client port (reuseport), or nothing at all
    /// under `--ready spawn`.
    pub(super) fn admit_unannounced(&mut self) {
        let config = self.ctx.config();
        let gate = match (config.mode, config.ready, self.admission.assigned_port) {
            // With an HTTP check, the port must pass it once before the first client: a
            // worker that accepts and never answers is not admitted, and fails its start at
            // the ready timeout (with backoff) instead of taking clients.
            (Mode::Proxy, ReadyArg::Port, Some(port)) => {
                Some(Gate::Probe(port, http_check(&config)))
            }
            (Mode::ReusePort, ReadyArg::Port, _) => Some(Gate::Listens),
            (_, ReadyArg::Spawn, _) => Some(Gate::Trust),
            _ => None,
        };
        if let Some(gate) = gate {
            self.admit(gate, config.ready_timeout);
        }
    }

    /// Whether an announcement may start an admission now: not admitted, none under way,
    /// not retired.
    pub(super) fn may_admit(&self) -> bool {
        self.admission.addr.is_none()
            && self.admission.task.is_none()
            && self.drain_deadline.is_none()
    }

    /// Starts admitting with `gate` and the rest of the ready timeout as patience.
    /// Admission keeps trying until the ready deadline: one passing glitch must not leave a
    /// worker that announces only once idle until its ready timeout.
    pub(super) fn admit_announced(&mut self, gate: Gate) {
        let patience = self
            .admission
            .ready_by
            .saturating_duration_since(Deadline::now())
            .max(ADMIT_MIN);
        self.admit(gate, patience);
    }

    fn admit(&mut self, gate: Gate, patience: Duration) {
        let (tx, timeout, listen) = (
            self.events_tx.clone(),
            self.ctx.config().health.timeout,
            self.ctx.listen,
        );
        let pid = self.pid;
        self.admission.task = Some(AbortOnDrop(tokio::spawn(async move {
            let r = probe(pid, gate, listen, timeout, patience).await;
            let _ = tx.send(Helper::Admitted(r)).await;
        })));
    }

    /// `ready{port}`: starts admitting the port, unless it is a duplicate.
    pub(super) fn on_ready(&mut self, port: Option<u16>, features: &[String]) {
        self.spoke_ipc = true;
        self.supports_ping |= features.iter().any(|f| f == "ping");
        if port.is_some() && port == self.node.balanced_port {
            // A cluster worker announcing the port its own `listen()` asked for: that is the
            // server balancer serves by hand-off (the worker never binds the port itself),
            // admitted on its `listening`.
            tracing::debug!(
                slot = self.slot,
                pid = self.pid,
                ?port,
                "ready names the worker's cluster server; admitted on its listening"
            );
            return;
        }
        // A second `ready` while the first is being probed replaces it if it names another
        // port (a worker correcting itself); the same port again, or any `ready` once
        // admitted, is a duplicate.
        let probing_it = self.admission.task.is_some() && self.admission.probing == port;
        if self.admission.addr.is_some() || self.drain_deadline.is_some() || probing_it {
            tracing::debug!(
                slot = self.slot,
                pid = self.pid,
                ?port,
                "duplicate ready ignored"
            );
            return;
        }
        self.admission.probing = port;
        let config = self.ctx.config();
        let builtin = config.program == WorkerProgram::Builtin;
        let gate = gate_for_ready(
            config.mode,
            port,
            self.ctx.listen.port(),
            &config.health.kind,
            builtin,
            self.supports_ping,
        );
        match gate {
            Ok(gate) => {
                if config.mode == Mode::Handoff {
                    self.delivery = Some(Delivery::new(handoff::Format::Balancer));
                }
                self.admit_announced(gate);
            }
            Err(why) => self
                .strikes
                .add(self.slot, self.pid, &format!("ready: {why}")),
        }
    }

    /// The probe finished: into rotation (`Ready`), or one strike.
    pub(super) fn on_admitted(&mut self, result: Result<SocketAddr, String>) {
        self.admission.task = None;
        let at = match result {
            Ok(at) => at,
            Err(why) => {
                let what = format!("announced port not admitted: {why}");
                self.strikes.add(self.slot, self.pid, &what);
                return;
            }
        };
        self.on_admitted_as(at, Reason::Admitted);
        self.record_carried(at);
    }

    /// Admitted at `at` (by the probe, or carried across an upgrade): checks start and it
    /// enters rotation.
    pub(super) fn on_admitted_as(&mut self, at: SocketAddr, why: Reason) {
        self.admission.addr = Some(at);
        if self.delivery.is_some() {
            self.rotation.handoff = Some(self.handoff_tx.clone());
        }
        let config = self.ctx.config();
        let builtin = config.program == WorkerProgram::Builtin;
        // A hand-off worker is admitted with the client address, which is the master's own:
        // only IPC or liveness checks reach the worker itself.
        let own_address = config.mode == Mode::Proxy && self.delivery.is_none();
        let check = config
            .health
            .kind
            .resolve(builtin, self.supports_ping, own_address);
        self.health.start(check, config.health.interval);
        self.rotation.enter(at, why);
    }

    /// Not admitted within `--ready-timeout`: replaced.
    pub(super) fn on_ready_timeout(&mut self) -> ControlFlow<End> {
        let timeout = self.ctx.config().ready_timeout;
        tracing::warn!(slot = self.slot, pid = self.pid, timeout = ?timeout, "worker did not become ready within --ready-timeout; replacing it");
        ControlFlow::Break(End::running(Reason::ReadyTimeout(timeout)))
    }
}

/// What must hold before a worker enters rotation.
#[derive(Debug, Clone)]
pub(super) enum Gate {
    /// Proxy mode: the port is a listening socket held by the worker (or a descendant),
    /// accepts the master's TCP connect and, with an HTTP check, passes it once.
    Probe(u16, Option<String>),
    /// Reuseport mode: the worker holds a socket listening on the client port.
    Listens,
    /// Nothing to check: shared mode, where a worker that is not yet accepting takes no
    /// connections, or `--ready spawn`.
    Trust,
}

/// The HTTP path a `--ready port` worker must answer before admission, when its checks are
/// HTTP.
fn http_check(config: &crate::config::Config) -> Option<String> {
    let builtin = config.program == WorkerProgram::Builtin;
    match config.health.kind.resolve(builtin, false, true) {
        Check::Http(path) => Some(path),
        _ => None,
    }
}

/// The gate for a `ready` message, or why the message cannot be admitted.
fn gate_for_ready(
    mode: Mode,
    port: Option<u16>,
    listen_port: u16,
    kind: &CheckKind,
    builtin: bool,
    supports_ping: bool,
) -> Result<Gate, String> {
    match (mode, port) {
        (Mode::Proxy, None) => Err("no port (proxy mode needs the worker's own port)".into()),
        (Mode::Proxy, Some(0)) => Err("port 0".into()),
        (Mode::Proxy, Some(p)) if p == listen_port => Err("the master's own listening port".into()),
        (Mode::Proxy, Some(p)) => {
            let http = match kind.resolve(builtin, supports_ping, true) {
                Check::Http(path) => Some(path),
                _ => None,
            };
            Ok(Gate::Probe(p, http))
        }
        (Mode::ReusePort, Some(p)) if p != listen_port => Err(format!(
            "port {p}, but reuseport workers listen on {listen_port}"
        )),
        (Mode::ReusePort, _) => Ok(Gate::Listens),
        (Mode::Shared, _) => Ok(Gate::Trust),
        (Mode::Handoff, _) => Ok(Gate::Trust),
    }
}

/// Waits until `gate` holds (retrying for up to `patience`, since a worker may announce just
/// before its `listen()` completes) and returns the address it is admitted with.
async fn probe(
    pid: u32,
    gate: Gate,
    listen: SocketAddr,
    timeout: Duration,
    patience: Duration,
) -> Result<SocketAddr, String> {
    let started = Instant::now();
    // A port the worker does not even hold is given up on soon (and logged); one it holds
    // but that fails the probe gets the whole patience, since that may be a passing glitch.
    let mut held = false;
    let mut last;
    loop {
        match &gate {
            Gate::Trust => return Ok(listen),
            Gate::Listens => {
                if owns(pid, listen.port()).await {
                    return Ok(listen);
                }
                last = format!("not listening on port {}", listen.port());
            }
            Gate::Probe(port, http) => {
                let port = *port;
                if owns(pid, port).await {
                    held = true;
                    last = String::new();
                    for addr in [
                        SocketAddr::from(([127, 0, 0, 1], port)),
                        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                    ] {
                        let probed = match proxy::health::tcp(addr, ADMIT_CONNECT_TIMEOUT).await {
                            Ok(()) => match http {
                                Some(path) => proxy::health::http(addr, path, timeout).await,
                                None => Ok(()),
                            },
                            Err(e) => Err(e),
                        };
                        match probed {
                            Ok(()) => return Ok(addr),
                            Err(e) => {
                                if !last.is_empty() {
                                    last.push_str("; ");
                                }
                                last.push_str(&format!("{addr}: {e}"));
                            }
                        }
                    }
                } else {
                    last = format!("port {port} is not a listening socket of this worker");
                }
            }
        }
        let limit = if held || matches!(gate, Gate::Listens) {
            patience
        } else {
            patience.min(ADMIT_MIN)
        };
        if started.elapsed() >= limit {
            return Err(format!("{last} (gave up after {limit:?})"));
        }
        tokio::time::sleep(ADMIT_RETRY).await;
    }
}

/// [`ownership::owns_listening_port`] off the supervisor's thread: it reads `/proc`, which
/// can be slow on a loaded machine, and the supervisor must keep noticing exits meanwhile.
async fn owns(pid: u32, port: u16) -> bool {
    tokio::task::spawn_blocking(move || ownership::owns_listening_port(pid, port))
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_messages_by_mode() {
        let gate = |mode, port| gate_for_ready(mode, port, 80, &CheckKind::Auto, true, true);
        assert!(gate(Mode::Proxy, None).is_err());
        assert!(gate(Mode::Proxy, Some(0)).is_err());
        assert!(
            gate(Mode::Proxy, Some(80)).is_err(),
            "the master's own port"
        );
        assert!(matches!(
            gate(Mode::Proxy, Some(8080)),
            Ok(Gate::Probe(8080, Some(_)))
        ));
        assert!(matches!(gate(Mode::ReusePort, Some(80)), Ok(Gate::Listens)));
        assert!(matches!(gate(Mode::ReusePort, None), Ok(Gate::Listens)));
        assert!(gate(Mode::ReusePort, Some(8080)).is_err());
        assert!(matches!(gate(Mode::Shared, Some(1)), Ok(Gate::Trust)));
    }
}
