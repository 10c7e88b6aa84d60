//! One source of remote backends: an `--upstream` IP literal (one fixed address) or a DNS
//! name followed over time (every A/AAAA record a backend). As in pingora-load-balancing's
//! `Backends::update`, each lookup yields a set; the difference with the last good set starts
//! new backends (they join once a check passes) and retires vanished ones (out of rotation at
//! once, their connections finishing within `--grace`). A failed or empty lookup changes
//! nothing (HAProxy's `hold valid`): the last good set keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::dns::{self, Dns, MIN_INTERVAL};
use super::remote::Remote;
use super::spec::{Host, UpstreamSpec};
use super::table::Resolution;
use super::Context;

/// Follows one `--upstream` until the master stops; returns once every backend it started
/// has left rotation.
pub async fn follow(ctx: Arc<Context>, spec: UpstreamSpec, dns: Option<Dns>) {
    let source = Arc::clone(&spec.label);
    match (&spec.host, dns) {
        (Host::Ip(ip), _) => {
            ctx.table.resolution(&source, Resolution::Fixed);
            let remote = Remote::start(&ctx, &source, SocketAddr::new(*ip, spec.port));
            ctx.stop.cancelled().await;
            remote.finished().await;
        }
        (Host::Name(name), Some(dns)) => {
            let mut members = Members::new(Arc::clone(&ctx), source, spec.port);
            resolve_loop(&ctx, &dns, name, &mut members).await;
            members.finish().await;
        }
        (Host::Name(name), None) => {
            // Config validation builds a resolver whenever a name is given.
            tracing::error!(upstream = %source, name, "no DNS resolver for an upstream name");
        }
    }
}

/// Looks `name` up at once and then again and again, until the master stops.
async fn resolve_loop(ctx: &Context, dns: &Dns, name: &str, members: &mut Members) {
    let mut state = Resolution::Pending;
    ctx.table.resolution(&members.source, state.clone());
    loop {
        let found = tokio::select! {
            _ = ctx.stop.cancelled() => return,
            found = dns.lookup(name) => found,
        };
        let (next, wait) = match found {
            Ok(answer) => {
                members.apply(&answer.addrs);
                (
                    Resolution::Resolved(answer.addrs.len()),
                    dns::next_lookup(ctx.resolve_interval, Some(answer.ttl)),
                )
            }
            // Never resolved yet: the application may be starting; look again soon.
            Err(e) if members.is_empty() => (Resolution::Failing(e.to_string()), MIN_INTERVAL),
            Err(e) => (Resolution::Failing(e.to_string()), ctx.resolve_interval),
        };
        log_change(&members.source, name, &state, &next, members.len());
        ctx.table.resolution(&members.source, next.clone());
        state = next;
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One log line per change of state: a first answer, a name that stops resolving (and how),
/// one that resolves again. The same failure again, or another answer of the same size, is
/// not a change (changes of the set itself are logged by [`Members::apply`]).
fn log_change(source: &str, name: &str, was: &Resolution, now: &Resolution, kept: usize) {
    match (was, now) {
        (Resolution::Resolved(_), Resolution::Resolved(_)) => {}
        (Resolution::Failing(a), Resolution::Failing(b)) if a == b => {}
        (_, Resolution::Resolved(n)) => {
            tracing::info!(
                upstream = source,
                name,
                addresses = n,
                "upstream name resolved"
            )
        }
        (Resolution::Pending, Resolution::Failing(e)) => {
            tracing::warn!(upstream = source, name, error = %e, "upstream name does not resolve yet")
        }
        (_, Resolution::Failing(e)) => {
            tracing::warn!(upstream = source, name, error = %e, kept_addresses = kept, "upstream name lookup failing")
        }
        _ => {}
    }
}

/// The backends one name currently has, by address.
struct Members {
    ctx: Arc<Context>,
    source: Arc<str>,
    port: u16,
    live: BTreeMap<IpAddr, Remote>,
    /// Retired backends still finishing their connections.
    leaving: Vec<Remote>,
}

impl Members {
    fn new(ctx: Arc<Context>, source: Arc<str>, port: u16) -> Self {
        Self {
            ctx,
            source,
            port,
            live: BTreeMap::new(),
            leaving: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }

    fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Makes the members the addresses of a good (non-empty) answer.
    fn apply(&mut self, addrs: &BTreeSet<IpAddr>) {
        let gone: Vec<IpAddr> = self
            .live
            .keys()
            .filter(|ip| !addrs.contains(ip))
            .copied()
            .collect();
        let new: Vec<IpAddr> = addrs
            .iter()
            .filter(|ip| !self.live.contains_key(ip))
            .copied()
            .collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        if !self.live.is_empty() {
            tracing::info!(upstream = %self.source, added = ?new, removed = ?gone, "upstream records changed");
        }
        for ip in gone {
            if let Some(remote) = self.live.remove(&ip) {
                remote.retire();
                self.leaving.push(remote);
            }
        }
        for ip in new {
            let addr = SocketAddr::new(ip, self.port);
            self.live
                .insert(ip, Remote::start(&self.ctx, &self.source, addr));
        }
        // Forget the retired ones that are done.
        let (done, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(Remote::is_finished);
        drop(done);
        self.leaving = still;
    }

    /// Waits for every backend of this name to be gone (the master is stopping).
    async fn finish(self) {
        for remote in self.live.into_values().chain(self.leaving) {
            remote.finished().await;
        }
    }
}
