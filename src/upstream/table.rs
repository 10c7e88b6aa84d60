//! What the master knows about its remote backends and upstream names right now, for
//! `/status` and `/metrics`: updated on every change of state (never per connection); the
//! open-connection counts are read from the backend entries themselves.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use proxy::Backend;

use crate::health::Check;

/// Where a remote backend is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Known, not yet passed a check: not in rotation.
    Checking,
    /// In rotation.
    Up,
    /// Failed its checks (or its connects): out of rotation, still checked.
    Down,
    /// Its address left DNS: out of rotation, open connections finishing.
    Draining,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 4] = [State::Checking, State::Up, State::Down, State::Draining];
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Checking => "checking",
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
        })
    }
}

/// How an upstream name resolves right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// An IP literal: never resolved.
    Fixed,
    /// Not resolved yet (start-up).
    Pending,
    /// The last lookup found these many addresses.
    Resolved(usize),
    /// The last lookup failed; the last good set (if any) is kept.
    Failing(String),
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed => f.write_str("fixed"),
            Self::Pending => f.write_str("pending"),
            Self::Resolved(_) => f.write_str("resolved"),
            Self::Failing(_) => f.write_str("failing"),
        }
    }
}

struct Row {
    name: String,
    backend: Arc<Backend>,
    check: String,
    state: State,
    reason: String,
    passed: u64,
    failed: u64,
    last_error: Option<String>,
}

#[derive(Default)]
struct Inner {
    rows: BTreeMap<u64, Row>,
    sources: BTreeMap<Arc<str>, Resolution>,
    /// Per source, how many backends it has had (names them `source#1`, `source#2`, … as
    /// HAProxy's `server-template` does).
    counts: BTreeMap<Arc<str>, usize>,
}

/// Remote backends and upstream names, for the admin endpoint.
#[derive(Default)]
pub struct Table(Mutex<Inner>);

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("backends", &self.lock().rows.len())
            .finish()
    }
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any `--upstream` is followed: the pool is then backends, not only workers.
    pub fn any(&self) -> bool {
        !self.lock().sources.is_empty()
    }

    /// A new remote backend; returns the name it is shown and logged with.
    pub fn added(&self, backend: &Arc<Backend>, check: &Check) -> String {
        let mut inner = self.lock();
        let source = backend.upstream.clone().unwrap_or_default();
        let n = inner.counts.entry(Arc::clone(&source)).or_default();
        *n += 1;
        let name = format!("{source}#{n}");
        let check = match check {
            Check::Http(path) => format!("http {path}"),
            _ => "tcp".to_owned(),
        };
        inner.rows.insert(
            backend.key,
            Row {
                name: name.clone(),
                backend: Arc::clone(backend),
                check,
                state: State::Checking,
                reason: "new address".into(),
                passed: 0,
                failed: 0,
                last_error: None,
            },
        );
        name
    }

    /// Backend `key` moved to `state` for `reason`.
    pub fn set(&self, key: u64, state: State, reason: &str) {
        if let Some(row) = self.lock().rows.get_mut(&key) {
            row.state = state;
            reason.clone_into(&mut row.reason);
        }
    }

    /// Backend `key` was checked: `error` is `None` when the check passed.
    pub fn checked(&self, key: u64, error: Option<&str>) {
        if let Some(row) = self.lock().rows.get_mut(&key) {
            match error {
                None => row.passed += 1,
                Some(e) => {
                    row.failed += 1;
                    row.last_error = Some(e.to_owned());
                }
            }
        }
    }

    /// Backend `key` is gone (retired and drained, or the master stopping).
    pub fn gone(&self, key: u64) {
        self.lock().rows.remove(&key);
    }

    /// How `source` resolves now.
    pub fn resolution(&self, source: &Arc<str>, now: Resolution) {
        self.lock().sources.insert(Arc::clone(source), now);
    }

    /// Remote backends by state.
    pub fn count(&self, state: State) -> usize {
        self.lock()
            .rows
            .values()
            .filter(|r| r.state == state)
            .count()
    }

    /// The `upstreams` part of `/status`: each name's resolution, each backend's state.
    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let sources: Vec<_> = inner
            .sources
            .iter()
            .map(|(source, r)| {
                let (addresses, error) = match r {
                    Resolution::Resolved(n) => (Some(*n), None),
                    Resolution::Failing(e) => (None, Some(e.as_str())),
                    _ => (None, None),
                };
                serde_json::json!({
                    "upstream": &**source,
                    "resolution": r.to_string(),
                    "addresses": addresses,
                    "error": error,
                })
            })
            .collect();
        let backends: Vec<_> = inner
            .rows
            .values()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "addr": r.backend.addr.to_string(),
                    "source": r.backend.upstream.as_deref(),
                    "state": r.state.to_string(),
                    "reason": r.reason,
                    "check": r.check,
                    "checks_passed": r.passed,
                    "checks_failed": r.failed,
                    "last_check_error": r.last_error,
                    "connections": r.backend.active(),
                })
            })
            .collect();
        serde_json::json!({ "names": sources, "backends": backends })
    }

    /// Prometheus lines for remote backends.
    pub fn write_metrics(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP balancer_upstream_backends Remote backends by state.\n# TYPE balancer_upstream_backends gauge");
        for state in State::ALL {
            let _ = writeln!(
                out,
                "balancer_upstream_backends{{state=\"{state}\"}} {}",
                self.count(state)
            );
        }
        let inner = self.lock();
        let _ = writeln!(out, "# HELP balancer_upstream_backend_up Whether a remote backend is in rotation.\n# TYPE balancer_upstream_backend_up gauge");
        for r in inner.rows.values() {
            let _ = writeln!(
                out,
                "balancer_upstream_backend_up{{{}}} {}",
                labels(&r.name, r.backend.addr, r.backend.upstream.as_deref()),
                u8::from(r.state == State::Up)
            );
        }
        let _ = writeln!(out, "# HELP balancer_upstream_backend_connections Connections open to a remote backend.\n# TYPE balancer_upstream_backend_connections gauge");
        for r in inner.rows.values() {
            let _ = writeln!(
                out,
                "balancer_upstream_backend_connections{{{}}} {}",
                labels(&r.name, r.backend.addr, r.backend.upstream.as_deref()),
                r.backend.active()
            );
        }
        let _ = writeln!(out, "# HELP balancer_upstream_resolved Whether an upstream name's last lookup succeeded.\n# TYPE balancer_upstream_resolved gauge");
        for (source, r) in &inner.sources {
            let _ = writeln!(
                out,
                "balancer_upstream_resolved{{upstream=\"{}\"}} {}",
                escape(source),
                u8::from(matches!(r, Resolution::Resolved(_) | Resolution::Fixed))
            );
        }
    }
}

fn labels(name: &str, addr: SocketAddr, source: Option<&str>) -> String {
    format!(
        "name=\"{}\",addr=\"{addr}\",upstream=\"{}\"",
        escape(name),
        escape(source.unwrap_or(""))
    )
}

/// Prometheus label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_backends_life() {
        let table = Table::default();
        let source: Arc<str> = "app:8080".into();
        let b = Arc::new(Backend::remote(
            1,
            0,
            Arc::clone(&source),
            "127.0.0.2:8080".parse().unwrap(),
        ));
        assert_eq!(table.added(&b, &Check::Tcp), "app:8080#1");
        table.resolution(&source, Resolution::Resolved(1));
        table.checked(1, Some("connect failed"));
        table.checked(1, None);
        table.set(1, State::Up, "first check passed");
        let v = table.status_json();
        let row = &v["backends"][0];
        assert_eq!(row["state"], "up");
        assert_eq!(row["source"], "app:8080");
        assert_eq!(
            (row["checks_passed"].as_u64(), row["checks_failed"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(v["names"][0]["resolution"], "resolved");
        let mut m = String::new();
        table.write_metrics(&mut m);
        assert!(
            m.contains("balancer_upstream_backends{state=\"up\"} 1"),
            "{m}"
        );
        assert!(m.contains("balancer_upstream_backend_up{name=\"app:8080#1\",addr=\"127.0.0.2:8080\",upstream=\"app:8080\"} 1"), "{m}");
        assert!(
            m.contains("balancer_upstream_resolved{upstream=\"app:8080\"} 1"),
            "{m}"
        );
        table.gone(1);
        assert_eq!(table.count(State::Up), 0);
    }
}
