//! The master under systemd: socket activation (serving on the listening socket the service
//! manager passed instead of binding `--listen`) and the service notifications of
//! `sd_notify(3)` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`).
//!
//! The descriptors are taken with [`worker::activation::listen_fds`], which checks
//! `LISTEN_PID`, marks them close-on-exec and removes the variables so workers do not see
//! them. Notifications go through the sd-notify crate; without `NOTIFY_SOCKET` each one is a
//! no-op, so the master calls them unconditionally.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use sd_notify::NotifyState;
use socket2::{Socket, Type};
use worker::protocol::Mode;

use crate::bind::Bound;

/// Takes the listening socket passed by socket activation, if this process was
/// socket-activated. Call it first thing in the master, before any file is opened (which
/// could otherwise take fd 3) and before threads start (the environment is changed).
pub fn inherited_listener() -> anyhow::Result<Option<std::net::TcpListener>> {
    let mut fds =
        worker::activation::listen_fds().context("reading the socket-activation variables")?;
    let Some(fd) = fds.pop() else { return Ok(None) };
    if !fds.is_empty() {
        bail!(
            "socket activation passed {} sockets; balancer serves one (one ListenStream= in the .socket unit)",
            fds.len() + 1
        );
    }
    let socket = Socket::from(fd);
    let kind = socket
        .r#type()
        .context("reading the inherited socket's type")?;
    let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
    let listening = socket.is_listener().unwrap_or(false);
    let Some(addr) = addr.filter(|_| kind == Type::STREAM && listening) else {
        bail!("the socket passed by socket activation is not a listening TCP socket (ListenStream=IP:PORT)");
    };
    socket
        .set_nonblocking(true)
        .with_context(|| format!("making the inherited listener {addr} non-blocking"))?;
    // Accepted sockets inherit it, as with the sockets balancer binds itself.
    socket
        .set_tcp_nodelay(true)
        .with_context(|| format!("setting TCP_NODELAY on the inherited listener {addr}"))?;
    Ok(Some(socket.into()))
}

/// The inherited listener in the shape `mode` needs. Proxy and handoff modes give each proxy
/// thread its own descriptor for the same socket (the manager bound one socket, and cannot
/// be asked for one per thread); the threads then take turns at its accept queue.
pub fn bound(listener: std::net::TcpListener, mode: Mode, threads: usize) -> anyhow::Result<Bound> {
    let local: SocketAddr = listener
        .local_addr()
        .context("reading the inherited listener's address")?;
    Ok(match mode {
        Mode::Proxy | Mode::Handoff => {
            let mut all = Vec::with_capacity(threads);
            for _ in 1..threads {
                all.push(
                    listener
                        .try_clone()
                        .context("duplicating the inherited listener")?,
                );
            }
            all.push(listener);
            Bound {
                local,
                proxy_listeners: all,
                shared_listener: None,
            }
        }
        Mode::Shared => Bound {
            local,
            proxy_listeners: Vec::new(),
            shared_listener: Some(Arc::new(listener)),
        },
        Mode::ReusePort => {
            bail!("socket activation cannot serve --mode reuseport (each worker binds the address itself); use proxy, handoff or shared")
        }
    })
}

/// `READY=1`: start-up (or a reload) is finished and the service serves. The STATUS line is
/// what `systemctl status` shows.
pub fn ready(workers: usize, listen: SocketAddr) {
    let status = format!("serving {listen} with {workers} workers");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, which `Type=notify-reload` needs (systemd 253 and
/// later) to tell this reload from an earlier one. Followed by [`ready`] when it is over.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("rolling reload"),
    ];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::warn!(error = %e, "reading the monotonic clock for MONOTONIC_USEC"),
    }
    send(&states);
}

/// `STOPPING=1`: a graceful stop has begun (draining, then stopping the workers).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining connections"),
    ]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid), and clears the
/// variables so workers do not inherit them. Call it before threads start.
pub fn watchdog_interval() -> Option<Duration> {
    // SAFETY: called from the master's main thread before the proxy threads, the runtimes or
    // any worker start, so no other thread reads or writes the environment meanwhile.
    unsafe { sd_notify::watchdog_enabled_and_unset_env() }
}

/// Sends `WATCHDOG=1` at half the interval for as long as the runtime it is spawned on
/// runs: the supervisor's, so a supervisor thread that stops making progress stops the pings
/// and systemd restarts the service. It keeps pinging through a stop (draining can take
/// `--grace`), and ends with the runtime, just before the master exits.
pub async fn watchdog(interval: Duration) {
    tracing::info!(interval = ?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

/// Sends `states` to `NOTIFY_SOCKET` (nothing without it). A failed notification is logged
/// and otherwise ignored: the service manager judges by what arrives, and the master keeps
/// serving either way.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
