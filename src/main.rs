//! The `balancer` binary: the master process, and (with the hidden `worker` subcommand) the
//! built-in worker it spawns.
//!
//! The master runs the data path (`proxy`) on one thread per CPU, each a current-thread
//! runtime with its own `SO_REUSEPORT` listener. The supervisor and signal handling run on the main thread's current-thread
//! runtime: every worker is forked from the main thread, which lives as long as the master,
//! so `PR_SET_PDEATHSIG` stays armed for the workers' whole lives.

mod accept;
mod admin;
mod bind;
mod child;
mod cli;
mod client;
mod config;
mod config_file;
mod control;
mod endpoint;
mod health;
mod instance;
mod orphans;
mod output;
mod ownership;
mod privilege;
mod protocol;
mod signals;
mod state;
mod status;
mod supervisor;
mod systemd;
mod upgrade;
mod upstream;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use bind::Bound;
use cli::{Cli, Sub};
use config::Config;
use instance::StopTokens;
use proxy::{Backends, Connections, ForwardConfig, Proxy};
use signals::{Intent, Signals};

/// Scale requests queued for the supervisor (signals and admin requests); more are dropped
/// with a warning. A reload in progress does not hold them up.
const SCALE_QUEUE: usize = 16;
/// After the grace period, how long aborted connections get to be torn down.
const ABORT_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match config_file::parse(&args) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("balancer: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(cli.verbose, cli.quiet, cli.log_format);
    let result = match cli.subcommand {
        Some(Sub::Worker) => worker::builtin::run().map_err(anyhow::Error::from),
        Some(Sub::ExecWithListenPid { ref command }) => {
            Err(anyhow::Error::from(child::exec_with_listen_pid(command))
                .context(format!("starting {:?}", command.first())))
        }
        Some(Sub::Health(ref args)) => client::health(args),
        Some(Sub::Status(ref args)) => client::status(args),
        Some(Sub::Reload(ref args)) => client::reload(args),
        Some(Sub::Scale(ref args)) => client::scale(args),
        Some(Sub::Top(ref args)) => client::top(args),
        Some(Sub::Upgrade(ref args)) => client::upgrade(args),
        None if cli.check => Config::try_from(&cli).map(|_| println!("configuration ok")),
        None => run_master(&cli, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: u8, format: cli::LogFormat) {
    let default = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let filter = EnvFilter::try_from_env("BALANCER_LOG").unwrap_or_else(|_| {
        // hickory logs every odd DNS packet at warn; the upstream discovery logs each
        // change of a name's state once, which is what an operator needs.
        EnvFilter::new(format!(
            "{default},hickory_proto=error,hickory_net=error,hickory_resolver=error"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        cli::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line, the event's fields at the top level beside `timestamp`,
        // `level` and `message`: the same fields as the text lines.
        cli::LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

fn run_master(cli: &Cli, args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    // First, before anything opens a file or starts a thread: a master started by an
    // in-place upgrade takes over what the previous image passed on; a socket-activated
    // master serves on the listener systemd passed (fd 3); the watchdog variables are taken.
    let mut handed = upgrade::handover::take()?;
    let activated = match handed {
        Some(_) => None,
        None => systemd::inherited_listener()?,
    };
    let socket_activated = activated.is_some();
    let watchdog = systemd::watchdog_interval();
    let config = Arc::new(Config::try_from(cli)?);
    // Before any worker exists: whatever a worker starts and leaves behind comes back to the
    // master to be stopped and reaped (see `orphans`).
    if let Err(e) = orphans::become_subreaper() {
        tracing::warn!(error = %e, "could not become a child subreaper; processes that workers leave behind may outlive the master");
    }
    let threads = config
        .proxy_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bound = match (&mut handed, activated) {
        (Some(taken), _) => upgrade::bound(taken, &config)?,
        (None, Some(listener)) => systemd::bound(listener, config.mode, threads)?,
        (None, None) => {
            Bound::new(&config, threads).with_context(|| format!("binding {}", config.listen))?
        }
    };
    let local = bound.local;
    let threads = bound.proxy_listeners.len().max(1);

    let (proxy, max_conns) = data_path(&config, threads);
    let backends = Arc::clone(&proxy.backends);
    let data = Arc::new(protocol::DataPath::new(&config.data, Arc::clone(&proxy))?);
    let conns = Connections::default();

    let supervisor_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor runtime")?;
    supervisor_runtime.block_on(async {
        let mut signals = Signals::install().context("installing signal handlers")?;
        upgrade::signals_ready(handed.as_ref().map_or(&[][..], |t| &t.state.pending_signals));
        let mut proxy_threads = accept::ProxyThreads::new(Arc::clone(&data), conns.clone());
        // With local workers, accept only once a backend can take a connection: until then
        // the listener stays bound (the port is taken) and clients wait in its backlog
        // instead of being closed for want of a backend. That covers the connection that
        // woke a socket-activated service and those queued during an upgrade's exec (the
        // adopted workers enter rotation on the supervisor's tasks, a moment later). The
        // first backend may as well be a remote `--upstream`; and if none is in rotation
        // after one `--ready-timeout`, the master accepts anyway (`serve_until`), so clients
        // get the no-backend answer rather than a wait in the backlog with no end. With no
        // local worker (`--cpus 0`, only `--upstream`), there is nothing to wait for.
        let mut unserved = if config.workers > 0 {
            Some(bound.proxy_listeners)
        } else {
            proxy_threads.start(bound.proxy_listeners).context("starting the proxy threads")?;
            None
        };
        tracing::info!(addr = %local, workers = config.workers, upstreams = config.upstream.upstreams.len(), mode = %config.mode, protocol = %config.data.protocol, tls = config.data.tls.is_some(), max_conns, socket_activated, upgraded = handed.is_some(), "listening");
        if !socket_activated && handed.is_none() {
            log_listen_name(&config, local);
        }

        let stop = StopTokens::default();
        let registry = Arc::new(status::Registry::new(config.workers));
        // Upstreams (#11): remote backends in the same rotation.
        let upstream_table = Arc::new(upstream::Table::default());
        let upstream_health = Arc::new(upstream::LiveHealth::new(&config.health));
        let upstream_grace = Arc::new(upstream::LiveGrace::new(config.grace));
        let upstream_task = start_upstreams(
            &config,
            &backends,
            &upstream_table,
            (&upstream_health, &upstream_grace),
            &stop,
        )?;
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let (scale, scales) = tokio::sync::mpsc::channel(SCALE_QUEUE);
        let (upgrade_tx, mut upgrades) = tokio::sync::mpsc::channel(1);
        let ctx = Arc::new(instance::Context::new(
            Arc::clone(&config),
            Arc::clone(&proxy),
            conns.clone(),
            local,
            bound.shared_listener,
            Arc::clone(&registry),
        ));
        let adopted = handed.map(|t| upgrade::restore(t, &ctx)).unwrap_or_default();
        let mut upgrader = upgrade::Upgrader::new(args.clone(), Arc::clone(&ctx))
            .context("finding the master's own binary")?;
        if let Some(addr) = &config.admin {
            let listener = match adopted.admin {
                Some((fd, path)) => admin::Listener::inherit(fd, path)?,
                None => admin::Listener::bind(addr)?,
            };
            upgrader.carry_admin(listener.carry().context("keeping the admin listener")?);
            tracing::info!(addr = %listener.local(), "admin endpoint listening");
            let view = admin::View {
                config: Arc::clone(&config),
                ctx: Arc::clone(&ctx),
                listen: local,
                proxy: Arc::clone(&proxy),
                conns: conns.clone(),
                registry: Arc::clone(&registry),
                reload: reload.clone(),
                scale: scale.clone(),
                upgrade: upgrade_tx,
                token: config.admin_token.clone(),
                upstreams: Arc::clone(&upstream_table),
                http: data.http().cloned(),
            };
            tokio::spawn(admin::serve(listener, view, stop.graceful.clone()));
        }
        // Everything that needs root is bound; no worker exists yet (#14).
        privilege::drop_to(config.privilege.as_ref(), config.admin.as_ref())?;
        let controls = control::Controls {
            args,
            has_file: cli.config.is_some(),
            ctx: Arc::clone(&ctx),
            upstream_health,
            upstream_grace,
            reload,
            scale,
        };
        let mut supervisor = tokio::spawn(supervisor::run(ctx, stop.clone(), reloads, scales, adopted.workers));

        systemd_started(watchdog, &config, local);
        let on_signal = |intent| match intent {
            Intent::Graceful | Intent::Upgrade => {}
            Intent::Reload => {
                data.reload_tls();
                controls.on_hangup();
            }
            Intent::ScaleUp => controls.request_scale(control::ScaleTo::Up(1), "SIGTTIN"),
            Intent::ScaleDown => controls.request_scale(control::ScaleTo::Down(1), "SIGTTOU"),
        };
        let accept_by = tokio::time::Instant::now() + config.ready_timeout;
        let first = FirstBackend { registry: &registry, backends: &backends, accept_by };
        loop {
            let wake = serve_until(&mut signals, &first, &mut unserved, &mut proxy_threads, &mut upgrades, on_signal).await?;
            let Wake::Upgrade(reply) = wake else { break };
            let serving = unserved.is_none();
            let why = upgrader.upgrade(&mut proxy_threads, &conns, &mut signals, serving, reply).await;
            tracing::error!("{why}");
        }
        // The grace in force now: a SIGHUP may have re-read it from `--config`.
        let grace = controls.ctx.config().grace;
        drain_and_stop(grace, &conns, &mut proxy_threads, &stop, &mut signals, &mut supervisor).await;
        let _ = upstream_task.await;
        proxy_threads.join();
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The data path's shared state (an empty backend set, the forwarding settings) and its
/// connection cap, settled against the open-file limit for `threads` proxy threads.
fn data_path(config: &Config, threads: usize) -> (Arc<Proxy>, usize) {
    // The admin endpoint's connections (and the one it refuses at a time) are fds the data
    // path must not count on.
    let admin_fds = config
        .admin
        .as_ref()
        .map_or(0, |_| admin::MAX_CONNS as u64 + 2);
    let max_conns = max_conns(config.max_conns, config.workers, threads, admin_fds);
    let proxy = Proxy::new(
        Arc::new(Backends::new(config.policy)),
        ForwardConfig {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            response_timeout: config.response_timeout,
            send_proxy: config.send_proxy,
            on_backend_eof: if config.half_close {
                proxy::BackendEof::PassOn
            } else {
                proxy::BackendEof::Close
            },
            tls_handshake_timeout: config.data.tls_handshake_timeout,
            quiesce: Arc::default(),
        },
        max_conns,
    )
    .with_accept_proxy(config.accept_proxy.clone());
    (Arc::new(proxy), max_conns)
}

/// Starts resolving and checking the `--upstream` backends, in the rotation `backends`.
fn start_upstreams(
    config: &Config,
    backends: &Arc<Backends>,
    table: &Arc<upstream::Table>,
    (health, grace): (&Arc<upstream::LiveHealth>, &Arc<upstream::LiveGrace>),
    stop: &StopTokens,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let upstreams = upstream::Upstreams::new(config.upstream.clone())?;
    Ok(tokio::spawn(upstreams.run(
        Arc::clone(backends),
        Arc::clone(health),
        Arc::clone(grace),
        Arc::clone(table),
        stop.graceful.clone(),
    )))
}

/// Under systemd: the watchdog pings start, and with no worker to wait for, the service is
/// ready once listening.
fn systemd_started(watchdog: Option<Duration>, config: &Config, local: std::net::SocketAddr) {
    if let Some(interval) = watchdog {
        tokio::spawn(systemd::watchdog(interval));
    }
    if config.workers == 0 {
        systemd::ready(0, local);
    }
}

/// Why the master stopped serving as usual.
enum Wake {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR2 (no one to answer) or `POST /upgrade`.
    Upgrade(Option<upgrade::Request>),
}

/// What the master waits for before it accepts (with local workers): a backend in rotation,
/// or the end of the first `--ready-timeout` without one.
struct FirstBackend<'a> {
    /// Local workers: in shared and reuseport modes they serve without being in `backends`.
    registry: &'a status::Registry,
    /// Every backend in rotation, local or remote (`--upstream`).
    backends: &'a proxy::Backends,
    /// The start plus one `--ready-timeout`: a worker that was going to be ready would be
    /// by then (it is killed past it), so clients stop waiting in the backlog and get what
    /// they get with no backend (tcp: closed; http: 503 with Retry-After), as a load
    /// balancer in front of a dead pool answers.
    accept_by: tokio::time::Instant,
}

/// Why the master starts accepting: logged once the proxy threads run, so the line means
/// what it says (tests and operators read it as "the data path is up").
#[derive(Debug, Clone, Copy)]
enum AcceptReason {
    /// A local worker is in rotation.
    Worker,
    /// A remote `--upstream` is, and no local worker yet.
    Upstream,
    /// The first `--ready-timeout` passed with no backend in rotation.
    Timeout,
}

impl AcceptReason {
    fn log(self) {
        match self {
            Self::Worker => tracing::info!("a worker is ready: accepting"),
            Self::Upstream => tracing::info!("an upstream is in rotation: accepting"),
            Self::Timeout => tracing::warn!(
                "no backend in rotation within --ready-timeout: accepting anyway (clients get the no-backend answer until one is)"
            ),
        }
    }
}

impl FirstBackend<'_> {
    /// Resolves once the master should accept, with why.
    async fn wait(&self) -> AcceptReason {
        tokio::select! {
            biased;
            () = self.registry.first_ready() => AcceptReason::Worker,
            () = self.backends.in_rotation() => {
                // A local worker may be in the set a moment before the registry has it.
                if self.backends.snapshot().iter().any(|b| b.upstream.is_none()) {
                    AcceptReason::Worker
                } else {
                    AcceptReason::Upstream
                }
            }
            () = tokio::time::sleep_until(self.accept_by) => AcceptReason::Timeout,
        }
    }
}

/// Serves until SIGTERM, SIGINT or an upgrade request, handing every other signal to
/// `on_signal`; the proxy threads start on the `unserved` listeners once `first` says so.
async fn serve_until(
    signals: &mut Signals,
    first: &FirstBackend<'_>,
    unserved: &mut Option<Vec<std::net::TcpListener>>,
    proxy_threads: &mut accept::ProxyThreads,
    upgrades: &mut tokio::sync::mpsc::Receiver<upgrade::Request>,
    mut on_signal: impl FnMut(Intent),
) -> anyhow::Result<Wake> {
    loop {
        let intent = tokio::select! {
            intent = signals.next() => intent,
            Some(reply) = upgrades.recv() => return Ok(Wake::Upgrade(Some(reply))),
            reason = first.wait(), if unserved.is_some() => {
                if let Some(listeners) = unserved.take() {
                    proxy_threads.start(listeners).context("starting the proxy threads")?;
                }
                reason.log();
                continue;
            }
        };
        match intent {
            Intent::Graceful => return Ok(Wake::Stop),
            Intent::Upgrade => return Ok(Wake::Upgrade(None)),
            other => on_signal(other),
        }
    }
}

/// The master's stop: stop accepting and drain connections (up to `grace`, the `--grace` in
/// force), then stop and reap the workers (in order, unless a second stop signal says
/// otherwise).
async fn drain_and_stop(
    grace: Duration,
    conns: &Connections,
    proxy_threads: &mut accept::ProxyThreads,
    stop: &StopTokens,
    signals: &mut Signals,
    supervisor: &mut tokio::task::JoinHandle<()>,
) {
    // 1. Stop accepting; let open connections finish within the grace period.
    systemd::stopping();
    let open = conns.tracker.len();
    tracing::info!(open_connections = open, grace = ?grace, "stopping: draining connections");
    proxy_threads.stop_accepting();
    // Workers drain too, from now: only they can tell an idle keep-alive connection from a
    // busy one, and close it.
    stop.drain.cancel();
    conns.tracker.close();
    let mut forced = false;
    tokio::select! {
        done = tokio::time::timeout(grace, conns.tracker.wait()) => {
            if done.is_err() {
                tracing::warn!(open_connections = conns.tracker.len(), "grace period over; closing open connections");
            }
        }
        _ = next_stop_signal(signals) => {
            tracing::warn!("second stop signal: stopping at once");
            forced = true;
        }
    }
    conns.abort.cancel();
    let _ = tokio::time::timeout(ABORT_TIMEOUT, conns.tracker.wait()).await;

    // 2. Stop the workers (in order, unless told twice) and reap them all.
    if forced {
        stop.force.cancel();
    }
    stop.graceful.cancel();
    tokio::select! {
        _ = &mut *supervisor => {}
        _ = next_stop_signal(signals), if !forced => {
            tracing::warn!("second stop signal: killing workers");
            stop.force.cancel();
            let _ = supervisor.await;
        }
    }
}

/// Says what a `--listen` host name resolved to, and which of its addresses is bound.
fn log_listen_name(config: &Config, local: std::net::SocketAddr) {
    let Some(resolved) = &config.listen_name else {
        return;
    };
    let all: Vec<String> = resolved.addrs.iter().map(ToString::to_string).collect();
    let name = resolved.name.as_str();
    if resolved.addrs.len() > 1 {
        let others: Vec<String> = (resolved.addrs.iter())
            .filter(|a| **a != config.listen)
            .map(ToString::to_string)
            .collect();
        tracing::warn!(name, addresses = %all.join(","), listening = %local, not_bound = %others.join(","),
            "--listen resolved to several addresses; only one is bound (give --listen an address to choose)");
    } else {
        tracing::info!(name, addresses = %all.join(","), listening = %local, "--listen resolved");
    }
}

/// Resolves on the next SIGTERM or SIGINT (SIGHUP, SIGTTIN, SIGTTOU and SIGUSR2 are
/// ignored while stopping).
async fn next_stop_signal(signals: &mut Signals) {
    while signals.next().await != Intent::Graceful {}
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and settles the connection cap: the
/// one asked for (with a warning if it cannot fit), or as many as the limit allows. Each
/// proxied connection costs two fds; `kept` more are kept back for other uses (the admin
/// endpoint).
fn max_conns(asked: Option<usize>, workers: usize, threads: usize, kept: u64) -> usize {
    let limit = raise_fd_limit();
    // Kept back: what is open now, per worker its channel and two output pipes with the
    // copies kept for an upgrade (and one spare for a replacement), per proxy thread its
    // listener, its kept copy, epoll and wake-up fds, and slack; with a large limit, at
    // least FD_RESERVE.
    let open_now = std::fs::read_dir("/proc/self/fd").map_or(8, |d| d.count()) as u64;
    let needed = open_now + 6 * workers as u64 + 4 * threads as u64 + 16 + kept;
    let reserve = if limit >= 16 * FD_RESERVE {
        needed.max(FD_RESERVE)
    } else {
        needed
    };
    let fits = usize::try_from(limit.saturating_sub(reserve) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if asked.is_none() && fits < FEW_CONNS {
        tracing::warn!(
            open_file_limit = limit,
            max_conns = fits,
            "the open-file limit allows few connections; raise it (ulimit -n) or set --max-conns"
        );
    }
    match asked {
        Some(n) if n > fits => {
            tracing::warn!(
                max_conns = n,
                open_file_limit = limit,
                "--max-conns cannot fit the open-file limit; accept will back off when fds run out"
            );
            n
        }
        Some(n) => n,
        None => fits.min(MAX_CONNS_DEFAULT_CAP),
    }
}

/// Below this many connections, a derived `--max-conns` is worth a warning.
const FEW_CONNS: usize = 64;
/// Upper bound of the derived `--max-conns` default.
const MAX_CONNS_DEFAULT_CAP: usize = 100_000;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-file limit");
            1024
        }
    };
    limit
}

/// Fds the master needs besides proxied connections: the listener, the workers' channels
/// and pipes, and slack.
const FD_RESERVE: u64 = 256;
