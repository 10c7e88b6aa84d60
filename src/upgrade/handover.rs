//! The state one master image hands to the next at an in-place upgrade: a JSON document in
//! a memfd whose number is in [`ENV_STATE_FD`] (einhorn's `--with-state-fd`, sozu's
//! `--upgrade-fd`). It names every descriptor that stays open across the exec (the client
//! listeners, the admin listener, each worker's channel and output pipes) and what the next
//! image cannot learn from them (slots, keys, counts, uptimes).
//!
//! A state the new image cannot read is fatal, one line, non-zero exit: by then the old
//! image is gone, the descriptors it names cannot be told from others, and starting fresh
//! would bind beside sockets still held open and leave the workers' channels unread. The
//! pre-flight (`NEWBIN --check`) makes this unlikely; [`VERSION`] makes it explicit.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::instance::{CarriedWorker, Inherited};
use crate::status::SlotStats;

/// The environment variable with the state's descriptor number.
pub const ENV_STATE_FD: &str = "BALANCER_UPGRADE_FD";
/// The layout of [`Handover`]; a new image refuses any other.
pub const VERSION: u32 = 1;
/// A state larger than this is not one balancer wrote (a few hundred bytes per worker).
const MAX_STATE: u64 = 16 << 20;

/// What the old image passes on.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    /// [`VERSION`].
    pub version: u32,
    /// `--mode` as the old image ran it.
    pub mode: String,
    /// The client address, with the real port.
    pub listen: SocketAddr,
    /// One client listener per proxy thread (proxy mode).
    pub proxy_fds: Vec<RawFd>,
    /// The listener the workers accept on (shared mode).
    pub shared_fd: Option<RawFd>,
    /// The admin listener, and a Unix socket's path.
    pub admin: Option<(RawFd, Option<PathBuf>)>,
    /// How many slots the supervisor keeps.
    pub desired: usize,
    /// Every slot's history (spawns, last exit).
    pub slots: Vec<SlotStats>,
    /// The workers carried over.
    pub workers: Vec<CarriedWorker>,
    /// Upgrades before this one.
    pub upgrades: u64,
    /// Signals that arrived while the exec was being prepared, to be raised again.
    pub pending_signals: Vec<i32>,
}

impl Handover {
    /// Every descriptor that must stay open across the exec.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut all = self.proxy_fds.clone();
        all.extend(self.shared_fd);
        all.extend(self.admin.as_ref().map(|(fd, _)| *fd));
        for w in &self.workers {
            all.extend(w.fds());
        }
        all
    }

    /// Writes the state to a new memfd (not close-on-exec) and returns it, rewound.
    pub fn to_memfd(&self) -> std::io::Result<std::fs::File> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        // SAFETY: the name is a NUL-terminated literal; flags 0 (no MFD_CLOEXEC: the fd must
        // survive the exec).
        let fd = unsafe { libc::memfd_create(c"balancer-upgrade".as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd the kernel just returned; nothing else owns it.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(&json)?;
        file.rewind()?;
        Ok(file)
    }
}

/// What the new image takes over, each descriptor owned and close-on-exec again.
#[derive(Debug)]
pub struct Taken {
    /// The state as written.
    pub state: Handover,
    /// The client listeners, in thread order.
    pub proxy_listeners: Vec<std::net::TcpListener>,
    /// The shared listener (shared mode).
    pub shared_listener: Option<std::net::TcpListener>,
    /// The admin listener and a Unix socket's path.
    pub admin: Option<(OwnedFd, Option<PathBuf>)>,
    /// The workers, with their channels and pipes.
    pub workers: Vec<Inherited>,
}

/// The state a previous master image passed on, if this process was started by an in-place
/// upgrade. Call it first in the master, before any thread starts (it edits the
/// environment, so workers never see the variable) and before anything opens a file.
pub fn take() -> anyhow::Result<Option<Taken>> {
    let Some(raw) = std::env::var_os(ENV_STATE_FD) else {
        return Ok(None);
    };
    std::env::remove_var(ENV_STATE_FD);
    let state = read(&raw).context("reading the state of the previous master image")?;
    let taken = own(state).context("taking over the previous master image's descriptors")?;
    Ok(Some(taken))
}

fn read(raw: &OsString) -> anyhow::Result<Handover> {
    let Some(fd) = raw.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
        bail!("{ENV_STATE_FD}={raw:?} is not a descriptor number");
    };
    if fd < 3 || !is_open(fd) {
        bail!("{ENV_STATE_FD}={fd} is not an open descriptor");
    }
    // SAFETY: the previous image left this fd open for exactly this; it is owned here from
    // now on (and closed after reading).
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    file.take(MAX_STATE)
        .read_to_string(&mut text)
        .context("reading the state descriptor")?;
    let state: Handover = serde_json::from_str(&text).context("parsing the state")?;
    if state.version != VERSION {
        bail!(
            "state version {} (this binary reads version {VERSION})",
            state.version
        );
    }
    Ok(state)
}

/// Checks that every named descriptor is open and named once, marks each close-on-exec
/// again (so no worker spawned from now on inherits it) and takes ownership.
fn own(state: Handover) -> anyhow::Result<Taken> {
    let fds = state.fds();
    let mut seen = HashSet::new();
    for &fd in &fds {
        if fd < 3 || !seen.insert(fd) || !is_open(fd) {
            bail!("descriptor {fd} is not open, or named twice");
        }
        // SAFETY: fcntl on an fd number checked open above; it only sets a flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("descriptor {fd}"));
        }
    }
    // SAFETY (each from_raw_fd below): every number was checked open and distinct above,
    // and the previous image left them to this one; each is owned exactly once.
    let owned = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let mut proxy_listeners = Vec::new();
    for &fd in &state.proxy_fds {
        let listener = std::net::TcpListener::from(owned(fd));
        if listener.local_addr().ok() != Some(state.listen) {
            bail!("descriptor {fd} is not the listener on {}", state.listen);
        }
        listener.set_nonblocking(true)?;
        proxy_listeners.push(listener);
    }
    let shared_listener = match state.shared_fd {
        Some(fd) => {
            let listener = std::net::TcpListener::from(owned(fd));
            if listener.local_addr().ok() != Some(state.listen) {
                bail!(
                    "descriptor {fd} is not the shared listener on {}",
                    state.listen
                );
            }
            Some(listener)
        }
        None => None,
    };
    let admin = state.admin.clone().map(|(fd, path)| (owned(fd), path));
    let workers = (state.workers.iter())
        .map(|w| Inherited {
            record: w.clone(),
            ipc: std::os::unix::net::UnixStream::from(owned(w.ipc_fd)),
            output: w.output_fds.map(|fd| fd.map(owned)),
        })
        .collect();
    Ok(Taken {
        state,
        proxy_listeners,
        shared_listener,
        admin,
        workers,
    })
}

/// Whether `fd` is an open descriptor of this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the flags of an fd number; a closed one gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Marks `fds` inheritable (`cloexec` false) or close-on-exec again; the first failure.
pub fn set_cloexec(fds: &[RawFd], cloexec: bool) -> std::io::Result<()> {
    let flag = if cloexec { libc::FD_CLOEXEC } else { 0 };
    for &fd in fds {
        // SAFETY: fcntl on fd numbers this process holds open; it only sets a flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flag) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
