//! Remote backends: the `--upstream` addresses and names balancer did not spawn.
//!
//! One source, many backends: a local slot and an upstream name are both sources of
//! addresses, and `proxy::Backends` is the one rotation; it never knows which kind an entry
//! is. The master owns discovery ([`discovery`], with [`dns`]) and the health decisions of
//! each remote backend ([`remote`], with the workers' [`Tally`](crate::health::Tally)).
//! [`table`] is what `/status` and `/metrics` show.

pub mod discovery;
pub mod dns;
pub mod remote;
pub mod spec;
pub mod table;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use proxy::Backends;

use crate::health::{Check, HealthConfig};

pub use spec::{Host, UpstreamSpec};
pub use table::Table;

/// Set in every remote backend's key: workers' keys count up from 1 and never reach it, so
/// the two kinds of entry never collide in the one rotation.
const REMOTE_KEY: u64 = 1 << 63;

/// Settings for remote backends, from the validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Every `--upstream`.
    pub upstreams: Vec<UpstreamSpec>,
    /// `--resolver` servers (empty: /etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
    /// `--resolve-interval`.
    pub resolve_interval: Duration,
}

/// What every remote backend's task shares.
#[derive(Debug)]
pub struct Context {
    /// The rotation.
    pub backends: Arc<Backends>,
    /// Active-check settings (the workers' own), as in force now.
    pub health: Arc<LiveHealth>,
    /// How long a retired backend's connections may take to finish: `--grace` as in force
    /// when it is retired (a SIGHUP may have re-read it), not as it was at start.
    pub grace: Arc<LiveGrace>,
    /// Time between two lookups of a name (sooner when the TTL is shorter).
    pub resolve_interval: Duration,
    /// Status and metrics.
    pub table: Arc<Table>,
    /// Cancelled when the master stops: every backend leaves rotation.
    pub stop: CancellationToken,
    keys: AtomicU64,
    indexes: AtomicUsize,
}

impl Context {
    fn next_key(&self) -> u64 {
        REMOTE_KEY | self.keys.fetch_add(1, Ordering::Relaxed)
    }

    fn next_index(&self) -> usize {
        self.indexes.fetch_add(1, Ordering::Relaxed)
    }
}

/// The remote backends' active-check settings, replaced when SIGHUP re-reads `--config`:
/// each backend reads them before every check, so changed `--health-*` settings apply to
/// the running backends without a restart (the workers get theirs through the reload).
#[derive(Debug)]
pub struct LiveHealth(arc_swap::ArcSwap<Checks>);

/// One version of [`LiveHealth`].
#[derive(Debug)]
pub struct Checks {
    /// Interval, timeout, rise and fall.
    pub health: HealthConfig,
    /// The check every remote backend gets (`--health-check`, with `auto` and `ipc` meaning
    /// TCP: a remote backend has no IPC channel).
    pub check: Check,
}

impl LiveHealth {
    /// The settings at start.
    pub fn new(health: &HealthConfig) -> Self {
        Self(arc_swap::ArcSwap::from_pointee(Checks::from(health)))
    }

    /// Puts `health` in force from each backend's next check.
    pub fn set(&self, health: &HealthConfig) {
        self.0.store(Arc::new(Checks::from(health)));
    }

    /// The settings in force.
    pub fn load(&self) -> Arc<Checks> {
        self.0.load_full()
    }
}

/// `--grace` as in force now, for remote backends retired later: the master's stop reads
/// its own from the configuration in force, and a retired upstream must not keep the
/// value the master started with.
#[derive(Debug)]
pub struct LiveGrace(AtomicU64);

impl LiveGrace {
    /// The grace at start.
    pub fn new(grace: Duration) -> Self {
        Self(AtomicU64::new(grace_nanos(grace)))
    }

    /// Puts `grace` in force for backends retired from now on.
    pub fn set(&self, grace: Duration) {
        self.0.store(grace_nanos(grace), Ordering::Relaxed);
    }

    /// The grace in force.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// `grace` in nanoseconds, saturated (u64 nanoseconds is 584 years).
fn grace_nanos(grace: Duration) -> u64 {
    u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX)
}

impl From<&HealthConfig> for Checks {
    fn from(health: &HealthConfig) -> Self {
        Self {
            check: health.kind.resolve(false, false, true),
            health: health.clone(),
        }
    }
}

/// The remote side of the master, ready to run.
#[derive(Debug)]
pub struct Upstreams {
    settings: Settings,
    dns: Option<dns::Dns>,
}

impl Upstreams {
    /// Sets up the resolver when any upstream is a name. Call on the runtime it will run on.
    pub fn new(settings: Settings) -> Result<Self, dns::SetupError> {
        let names = settings
            .upstreams
            .iter()
            .any(|u| matches!(u.host, Host::Name(_)));
        let dns = if names {
            let dns = dns::Dns::new(&settings.resolvers)?;
            tracing::info!(servers = ?dns.servers, interval = ?settings.resolve_interval, "resolving upstream names");
            Some(dns)
        } else {
            None
        };
        Ok(Self { settings, dns })
    }

    /// Follows every upstream until `stop` is cancelled, then takes their backends out of
    /// rotation.
    pub async fn run(
        self,
        backends: Arc<Backends>,
        health: Arc<LiveHealth>,
        grace: Arc<LiveGrace>,
        table: Arc<Table>,
        stop: CancellationToken,
    ) {
        let ctx = Arc::new(Context {
            backends,
            health,
            grace,
            resolve_interval: self.settings.resolve_interval,
            table,
            stop,
            keys: AtomicU64::new(1),
            indexes: AtomicUsize::new(0),
        });
        let mut sources = JoinSet::new();
        for spec in self.settings.upstreams {
            sources.spawn(discovery::follow(Arc::clone(&ctx), spec, self.dns.clone()));
        }
        while sources.join_next().await.is_some() {}
    }
}
