//! The new image's side: the listeners and workers a previous image passed on, put where a
//! fresh start would have bound and spawned them.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use anyhow::bail;

use crate::bind::Bound;
use crate::config::Config;
use crate::instance::{Context, Inherited};

use super::handover::Taken;

/// What the supervisor and the admin endpoint take over.
#[derive(Debug, Default)]
pub struct Adopted {
    /// The admin listener and a Unix socket's path.
    pub admin: Option<(OwnedFd, Option<PathBuf>)>,
    /// The workers, each for its slot.
    pub workers: Vec<Inherited>,
}

/// The client listeners the previous image passed on, in place of binding. A `--mode` or
/// `--listen` that changed cannot be applied to sockets that are already bound: the
/// pre-flight refuses such an upgrade, and this refuses the race where the file changed
/// after it.
pub fn bound(taken: &mut Taken, config: &Config) -> anyhow::Result<Bound> {
    let state = &taken.state;
    if state.mode != config.mode.as_str() {
        bail!(
            "the previous master image ran --mode {} and this configuration says {}; --mode changes need a restart",
            state.mode,
            config.mode
        );
    }
    if config.listen.port() != 0 && config.listen != state.listen {
        bail!(
            "the previous master image listened on {} and this configuration says {}; --listen changes need a restart",
            state.listen,
            config.listen
        );
    }
    Ok(Bound {
        local: state.listen,
        proxy_listeners: std::mem::take(&mut taken.proxy_listeners),
        shared_listener: taken.shared_listener.take().map(std::sync::Arc::new),
    })
}

/// Puts the previous image's counts and histories in force and returns what is adopted.
pub fn restore(taken: Taken, ctx: &Context) -> Adopted {
    let Taken {
        state,
        admin,
        workers,
        ..
    } = taken;
    ctx.registry.restore_slots(state.slots);
    ctx.registry.set_upgrades(state.upgrades + 1);
    ctx.set_desired(state.desired);
    if let Some(max) = workers.iter().map(|w| w.record.key).max() {
        ctx.keys_above(max);
    }
    tracing::info!(
        upgrades = state.upgrades + 1,
        workers = workers.len(),
        desired = state.desired,
        "upgraded in place: adopting the previous image's listeners and workers"
    );
    Adopted { admin, workers }
}
