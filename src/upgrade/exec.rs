//! The exec itself: the state into a memfd, close-on-exec cleared on exactly the
//! descriptors being passed, then `execve` of the binary with the master's own arguments
//! and [`ENV_STATE_FD`](super::handover::ENV_STATE_FD) added to its environment. Called on
//! the main thread with the master's signals blocked (see `crate::signals::block`). It
//! returns only when the exec failed, having put the flags back.
//!
//! It must run on the main thread: the workers were forked from it, and `PR_SET_PDEATHSIG`
//! fires when the *thread* that forked a child exits. An exec from another thread ends the
//! main thread (the kernel makes the exec'ing thread the leader) and would kill every worker.

use std::ffi::{CString, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::handover::{set_cloexec, Handover, ENV_STATE_FD};

/// Replaces this process's image with `exe`, passing `state`. Returns why it could not.
pub fn exec(exe: &Path, args: &[OsString], state: &Handover) -> std::io::Error {
    // Everything that allocates happens before the flags change, so a failure here leaves
    // nothing to undo.
    let prepared = (|| -> std::io::Result<_> {
        let file = state.to_memfd()?;
        let path = cstring(exe.as_os_str().as_bytes())?;
        let argv = (args.iter())
            .map(|a| cstring(a.as_bytes()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut env = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k.as_bytes() == ENV_STATE_FD.as_bytes() {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(cstring(&kv)?);
        }
        env.push(cstring(
            format!("{ENV_STATE_FD}={}", file.as_raw_fd()).as_bytes(),
        )?);
        Ok((file, path, argv, env))
    })();
    let (file, path, argv, env) = match prepared {
        Ok(p) => p,
        Err(e) => return e,
    };
    let fds = state.fds();
    if let Err(e) = set_cloexec(&fds, false) {
        let _ = set_cloexec(&fds, true);
        return e;
    }
    let err = match nix::unistd::execve(&path, &argv, &env) {
        Ok(never) => match never {},
        Err(e) => std::io::Error::from(e),
    };
    // Still here: the exec failed and this image goes on. The passed descriptors must not
    // leak into the next worker spawned.
    let _ = set_cloexec(&fds, true);
    drop(file);
    err
}

fn cstring(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| std::io::Error::other("a NUL byte in an argument"))
}
