//! `balancer upgrade`: asks the master to upgrade in place (`POST /upgrade`, as SIGUSR2)
//! and waits until it has: the exec cuts the connection that asked, so success is read from
//! `/status` afterwards, where `upgrades` has moved on and `pid` is still the same.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::Endpoint;

/// How long the upgrade may take: the pre-flight (`--check`, at most 10 s), the drain (at
/// most 10 s) and the new image's start, with room to spare.
const UPGRADE_WAIT: Duration = Duration::from_secs(60);
/// Pause between `/status` reads while waiting.
const POLL: Duration = Duration::from_millis(100);

/// What `/status` says about the master itself.
struct Master {
    pid: u64,
    upgrades: u64,
}

/// Asks for the upgrade, waits for it, and says what happened.
pub fn upgrade(endpoint: &Endpoint) -> anyhow::Result<String> {
    let before = master(endpoint)?;
    match endpoint.call(hyper::Method::POST, "/upgrade") {
        Ok(reply) => {
            endpoint.expect_ok("/upgrade", reply)?;
        }
        // The exec may cut the connection before the answer is read; `/status` tells.
        Err(e) => tracing::debug!(error = %e, "no answer to POST /upgrade; reading /status"),
    }
    let deadline = Instant::now() + UPGRADE_WAIT;
    loop {
        if let Ok(now) = master(endpoint) {
            if now.upgrades > before.upgrades {
                if now.pid != before.pid {
                    bail!(
                        "the master at that address is a new process (pid {} was {})",
                        now.pid,
                        before.pid
                    );
                }
                return Ok(format!(
                    "upgraded in place (pid {}, upgrade {})\n",
                    now.pid, now.upgrades
                ));
            }
        }
        if Instant::now() >= deadline {
            bail!("the master did not finish upgrading within {UPGRADE_WAIT:?} (see its log)");
        }
        std::thread::sleep(POLL);
    }
}

fn master(endpoint: &Endpoint) -> anyhow::Result<Master> {
    let body = endpoint.get_ok("/status")?;
    let v: serde_json::Value = serde_json::from_str(&body).context("reading /status")?;
    let field = |name: &str| v.get(name).and_then(serde_json::Value::as_u64);
    match (field("pid"), field("upgrades")) {
        (Some(pid), Some(upgrades)) => Ok(Master { pid, upgrades }),
        _ => bail!("/status has no pid or upgrades: the master predates in-place upgrades"),
    }
}
