//! Changing a running master: scaling the worker count (SIGTTIN/SIGTTOU, `POST /scale`,
//! `balancer scale`) and re-reading `--config` on SIGHUP. The supervisor carries out the
//! requests; this module says what they mean.

use std::ffi::OsString;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, MAX_WORKERS};
use crate::instance::Context;

/// A change of the worker count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    /// To exactly this many.
    Exactly(usize),
    /// This many more.
    Up(usize),
    /// This many fewer.
    Down(usize),
}

impl ScaleTo {
    /// `N`, `+K` or `-K`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let number = |s: &str| {
            s.parse::<usize>()
                .map_err(|_| format!("{raw:?}: expected N, +K or -K (e.g. 4, +1, -2)"))
        };
        if let Some(k) = raw.strip_prefix('+') {
            Ok(Self::Up(number(k)?))
        } else if let Some(k) = raw.strip_prefix('-') {
            Ok(Self::Down(number(k)?))
        } else {
            Ok(Self::Exactly(number(raw)?))
        }
    }

    /// The count this asks for from `current`, held to `min..=MAX_WORKERS`; `Err` says why
    /// it cannot be met at all.
    pub fn target(self, current: usize, min: usize) -> Result<usize, String> {
        let wanted = match self {
            Self::Exactly(n) => n,
            Self::Up(k) => current.saturating_add(k),
            Self::Down(k) => current.saturating_sub(k),
        };
        if wanted < min {
            return Err(format!(
                "cannot scale to {wanted}: at least {min} worker{} must run (no remote upstreams)",
                if min == 1 { "" } else { "s" }
            ));
        }
        if wanted > MAX_WORKERS {
            return Err(format!(
                "cannot scale to {wanted}: at most {MAX_WORKERS} workers"
            ));
        }
        Ok(wanted)
    }
}

/// What a scale request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaled {
    /// The desired count before.
    pub from: usize,
    /// The desired count now.
    pub to: usize,
}

/// A scale request to the supervisor, with where to say what came of it.
#[derive(Debug)]
pub struct ScaleRequest {
    /// The change.
    pub to: ScaleTo,
    /// Who asked (for the log: `SIGTTIN`, `admin`).
    pub from: &'static str,
    /// The answer, for a caller that waits for one.
    pub reply: Option<oneshot::Sender<Result<Scaled, String>>>,
}

/// A configuration re-read on SIGHUP, ready to be put in force.
#[derive(Debug)]
pub struct Reread {
    /// The new configuration, with the restart-only settings kept as they run.
    pub config: Arc<Config>,
    /// Restart-only settings the file changed, left as they are (for the log line).
    pub kept: Vec<&'static str>,
}

/// Re-reads the command line and its `--config` file as at start (`args`), validates the
/// result, and keeps what cannot change without a restart from `running`. `Err` is the one
/// line saying why the file was refused.
pub fn reread(args: &[OsString], running: &Config) -> Result<Reread, String> {
    let cli = crate::config_file::parse(args).map_err(|e| format!("{e:#}"))?;
    let mut new = Config::try_from(&cli).map_err(|e| format!("{e:#}"))?;
    let mut kept = Vec::new();
    let mut keep = |name: &'static str, changed: bool| {
        if changed {
            kept.push(name);
        }
    };
    // The listener, the data path and the admin endpoint are built once at start.
    keep("listen", new.listen != running.listen);
    keep("mode", new.mode != running.mode);
    keep("admin", new.admin != running.admin);
    keep("admin-token", new.admin_token != running.admin_token);
    keep("max-conns", new.max_conns != running.max_conns);
    keep("proxy-threads", new.proxy_threads != running.proxy_threads);
    keep(
        "connect-timeout",
        new.connect_timeout != running.connect_timeout,
    );
    keep("idle-timeout", new.idle_timeout != running.idle_timeout);
    keep(
        "response-timeout",
        new.response_timeout != running.response_timeout,
    );
    keep(
        "tls-handshake-timeout",
        new.data.tls_handshake_timeout != running.data.tls_handshake_timeout,
    );
    keep("user", new.privilege != running.privilege);
    keep("half-close", new.half_close != running.half_close);
    // The proxy threads run their engine's loop from start to stop (an in-place upgrade
    // starts them anew, with the file as it is then).
    keep("engine", new.data.engine != running.data.engine);
    // Remote backends are discovered by tasks started once (their health settings are live).
    keep(
        "upstream",
        new.upstream.upstreams != running.upstream.upstreams,
    );
    keep(
        "resolver",
        new.upstream.resolvers != running.upstream.resolvers,
    );
    keep(
        "resolve-interval",
        new.upstream.resolve_interval != running.upstream.resolve_interval,
    );
    new.listen = running.listen;
    new.mode = running.mode;
    new.admin = running.admin.clone();
    new.admin_token = running.admin_token.clone();
    new.max_conns = running.max_conns;
    new.proxy_threads = running.proxy_threads;
    new.connect_timeout = running.connect_timeout;
    new.idle_timeout = running.idle_timeout;
    new.response_timeout = running.response_timeout;
    new.data.tls_handshake_timeout = running.data.tls_handshake_timeout;
    new.half_close = running.half_close;
    new.data.engine = running.data.engine;
    new.upstream = running.upstream.clone();
    new.privilege = running.privilege.clone();
    Ok(Reread {
        config: Arc::new(new),
        kept,
    })
}

/// What the master's signal loop needs to carry out reloads and scaling.
#[derive(Debug)]
pub struct Controls {
    /// The command line as started, to re-read `--config` with.
    pub args: Vec<OsString>,
    /// Whether there is a `--config` file to re-read.
    pub has_file: bool,
    /// Where the configuration in force lives.
    pub ctx: Arc<Context>,
    /// The remote backends' health settings in force.
    pub upstream_health: Arc<crate::upstream::LiveHealth>,
    /// The `--grace` remote backends retired from now on get.
    pub upstream_grace: Arc<crate::upstream::LiveGrace>,
    /// Asks the supervisor for a rolling reload (full: one is pending).
    pub reload: mpsc::Sender<()>,
    /// Asks the supervisor to change the worker count.
    pub scale: mpsc::Sender<ScaleRequest>,
}

impl Controls {
    /// SIGHUP: re-read the file (if any) and put it in force, then a rolling reload. A file
    /// that no longer parses or validates is refused with one log line, and nothing changes.
    pub fn on_hangup(&self) {
        if self.has_file {
            let running = self.ctx.config().clone();
            match reread(&self.args, &running) {
                Err(why) => {
                    tracing::error!(error = %why, "SIGHUP: configuration refused; the running one stays");
                    return;
                }
                Ok(Reread { config, kept }) => {
                    if !kept.is_empty() {
                        tracing::warn!(settings = %kept.join(", "), "SIGHUP: these settings change only with a restart; kept as they run");
                    }
                    let workers = config.workers;
                    self.apply_live(&running, &config);
                    self.ctx.set_config(config);
                    tracing::info!("SIGHUP: configuration re-read");
                    if workers != running.workers {
                        self.request_scale(ScaleTo::Exactly(workers), "config file");
                    }
                }
            }
        }
        // A full queue means a reload is already pending: this one coalesces.
        if self.reload.try_send(()).is_ok() {
            tracing::info!("SIGHUP: rolling reload requested");
        } else {
            tracing::info!("SIGHUP: a reload is already pending; coalesced");
        }
    }

    /// What takes effect at once rather than through the reload: the selection policy
    /// (the next connection is picked by the new one), the remote backends' health
    /// settings (from each one's next check) and the grace of remote backends retired
    /// from now on. The workers' health settings need nothing
    /// here: each replacement started by the reload reads the new configuration.
    fn apply_live(&self, running: &Config, new: &Config) {
        if new.policy != running.policy {
            self.ctx.proxy.backends.set_policy(new.policy);
            tracing::info!(from = ?running.policy, to = ?new.policy, "SIGHUP: balance changed");
        }
        if new.health != running.health {
            self.upstream_health.set(&new.health);
        }
        if new.grace != running.grace {
            self.upstream_grace.set(new.grace);
        }
    }

    /// Asks for a change of the worker count, without waiting for the answer (the
    /// supervisor logs it).
    pub fn request_scale(&self, to: ScaleTo, from: &'static str) {
        let request = ScaleRequest {
            to,
            from,
            reply: None,
        };
        if self.scale.try_send(request).is_err() {
            tracing::warn!(
                requested_by = from,
                "scale request dropped: too many pending"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_forms_and_bounds() {
        assert_eq!(ScaleTo::parse("4"), Ok(ScaleTo::Exactly(4)));
        assert_eq!(ScaleTo::parse("+2"), Ok(ScaleTo::Up(2)));
        assert_eq!(ScaleTo::parse(" -1 "), Ok(ScaleTo::Down(1)));
        assert!(ScaleTo::parse("two").is_err() && ScaleTo::parse("+").is_err());
        assert!(ScaleTo::parse("--1").is_err());
        assert_eq!(ScaleTo::Up(2).target(3, 1), Ok(5));
        assert_eq!(ScaleTo::Down(1).target(3, 1), Ok(2));
        assert!(ScaleTo::Down(3).target(3, 1).is_err());
        assert!(ScaleTo::Exactly(0).target(3, 1).is_err());
        assert_eq!(ScaleTo::Exactly(0).target(3, 0), Ok(0));
        assert!(ScaleTo::Up(usize::MAX).target(3, 1).is_err());
    }
}
