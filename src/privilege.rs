//! `--user USER [--group GROUP]`: the master binds its listeners and its admin endpoint as
//! root, then gives root up for good before the first worker is spawned, so that every worker
//! (any program) runs unprivileged and the master itself can no longer become root.
//!
//! The order is the one that leaves no way back: hand the Unix admin socket to the user, then
//! `setgroups`, `setresgid` and `setresuid` (real, effective and saved ids alike: with a saved
//! uid of 0 a process could return to root). Then it is checked, not assumed: `setuid(0)`,
//! `setgid(0)` and `setgroups([0])` must fail, and every thread's `/proc/self/task/*/status`
//! must show the new ids in all four fields and no capability. The proxy threads already run
//! at that point; glibc applies each of these calls to every thread, and the per-thread check
//! is what proves it. A failure anywhere is fatal.
//!
//! Supplementary groups: only the one group (GROUP, else the user's primary group). The
//! user's other groups in /etc/group are not kept, so the workers' rights are exactly the
//! user's and that group's, whatever the group database says.
//!
//! The kernel clears `PR_SET_PDEATHSIG` on a change of credentials. Workers set theirs after
//! the fork (`child`), from the already dropped master, so nothing clears them. The master's
//! own parent-death signal, if whoever started it asked for one, is armed again here.

use std::path::Path;

use anyhow::{bail, Context};
use nix::unistd::{Gid, Group, Uid, User};

use crate::endpoint::AdminAddr;

/// Who the master becomes: `--user` and `--group` resolved once, at validation (so `--check`
/// and a start with an unknown name fail before anything is bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `--user` as given, for messages.
    pub user: String,
    /// Its uid.
    pub uid: Uid,
    /// `--group`, else the user's primary group.
    pub gid: Gid,
}

impl Target {
    /// Looks `user` (and `group`) up in the user and group databases; a number with no
    /// entry is taken as a uid (gid), for images with no /etc/passwd. Root is refused: it
    /// would make the drop a no-op that looks like a success.
    pub fn resolve(user: &str, group: Option<&str>) -> anyhow::Result<Self> {
        let entry = User::from_name(user)
            .map_err(|e| anyhow::anyhow!("--user {user:?}: looking it up: {e}"))?;
        let (uid, primary) = match (entry, user.parse::<u32>()) {
            (Some(u), _) => (u.uid, Some(u.gid)),
            (None, Ok(n)) => {
                let uid = Uid::from_raw(n);
                (uid, User::from_uid(uid).ok().flatten().map(|u| u.gid))
            }
            (None, Err(_)) => bail!("--user {user:?}: no such user"),
        };
        if uid.is_root() {
            bail!("--user {user:?}: that is root; name an unprivileged user");
        }
        let gid = match group {
            Some(g) => resolve_group(g)?,
            None => primary.with_context(|| {
                format!("--user {user:?}: uid {uid} has no /etc/passwd entry to take a group from; give --group")
            })?,
        };
        if gid.as_raw() == 0 {
            bail!("--user {user:?}: its group would be gid 0 (root's); give --group");
        }
        Ok(Self {
            user: user.to_owned(),
            uid,
            gid,
        })
    }
}

fn resolve_group(group: &str) -> anyhow::Result<Gid> {
    let entry = Group::from_name(group)
        .map_err(|e| anyhow::anyhow!("--group {group:?}: looking it up: {e}"))?;
    match (entry, group.parse::<u32>()) {
        (Some(g), _) => Ok(g.gid),
        (None, Ok(n)) => Ok(Gid::from_raw(n)),
        (None, Err(_)) => bail!("--group {group:?}: no such group"),
    }
}

/// Becomes `target` for good (nothing to do without one). Call once everything that needs
/// root is bound and before any worker is spawned. A master that already runs as the target
/// uid and is not root (an in-place upgrade re-executed it after the drop) skips the change
/// and only checks it has no way back.
pub fn drop_to(target: Option<&Target>, admin: Option<&AdminAddr>) -> anyhow::Result<()> {
    let Some(target) = target else {
        return Ok(());
    };
    drop_to_target(target, admin).with_context(|| format!("dropping to --user {}", target.user))
}

fn drop_to_target(target: &Target, admin: Option<&AdminAddr>) -> anyhow::Result<()> {
    let uid = target.uid;
    let now = nix::unistd::getresuid().context("getresuid")?;
    if [now.real, now.effective, now.saved] == [uid; 3] {
        verify(target, false)?;
        tracing::info!(user = %target.user, uid = %uid, gid = %nix::unistd::getgid(), "already running as --user; nothing to drop");
        return Ok(());
    }
    if !now.effective.is_root() {
        bail!(
            "cannot change to uid {uid}: the master runs as uid {}, not root",
            now.effective
        );
    }
    let parent_death = nix::sys::prctl::get_pdeathsig().context("reading PR_GET_PDEATHSIG")?;
    let parent = nix::unistd::getppid();
    if let Some(AdminAddr::Unix(path)) = admin {
        hand_over(path, target)?;
    }
    let gid = target.gid;
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    verify(target, true)?;
    if let Some(signal) = parent_death {
        nix::sys::prctl::set_pdeathsig(signal).context("arming PR_SET_PDEATHSIG again")?;
        // The parent may have died between the drop and the re-arming: then nothing will
        // send the signal, so the master sends it to itself, as the parent wanted.
        if nix::unistd::getppid() != parent {
            nix::sys::signal::raise(signal).context("raising the parent-death signal")?;
        }
    }
    tracing::info!(user = %target.user, uid = %uid, gid = %gid, "dropped privileges");
    Ok(())
}

/// Gives the Unix admin socket to the target user: created 0600 by root, it would be
/// unusable by the dropped master's user, and in a sticky directory (/tmp) only its owner
/// may remove it at exit. Removing it still needs write access to its directory: in one the
/// user cannot write (a root-owned /run), the socket stays after exit, and the next master
/// (as root again) replaces it as stale.
fn hand_over(path: &Path, target: &Target) -> anyhow::Result<()> {
    nix::unistd::chown(path, Some(target.uid), Some(target.gid))
        .with_context(|| format!("handing the admin socket {} to the user", path.display()))
}

/// Checks that there is no way back to root: the calls that would need a privilege fail,
/// and every thread shows the target's ids (the gid too, after a drop) and no capabilities.
fn verify(target: &Target, check_gid: bool) -> anyhow::Result<()> {
    let root = Uid::from_raw(0);
    if nix::unistd::setuid(root).is_ok() || nix::unistd::setresuid(root, root, root).is_ok() {
        bail!("a return to root still succeeds (setuid(0))");
    }
    let root_group = Gid::from_raw(0);
    if nix::unistd::setgid(root_group).is_ok() || nix::unistd::setgroups(&[root_group]).is_ok() {
        bail!("a return to group root still succeeds (setgid(0) or setgroups)");
    }
    let tasks = std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")?;
    for task in tasks {
        let path = task
            .context("listing /proc/self/task")?
            .path()
            .join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            // A thread that ended since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let gid = check_gid.then_some(target.gid.as_raw());
        check_status(&status, target.uid.as_raw(), gid)
            .with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

/// One `/proc/.../status`: `Uid:` all `uid`, `Gid:` all `gid` and `Groups:` just `gid` (when
/// given), `CapEff:` and `CapPrm:` zero.
fn check_status(status: &str, uid: u32, gid: Option<u32>) -> anyhow::Result<()> {
    let field = |name: &str| -> anyhow::Result<Vec<&str>> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|rest| rest.split_whitespace().collect())
            .with_context(|| format!("no {name} line"))
    };
    let all = |name: &str, want: u32| -> anyhow::Result<()> {
        let got = field(name)?;
        if got.len() != 4 || got.iter().any(|v| v.parse() != Ok(want)) {
            bail!("{name} is {}, not {want} in all four fields", got.join(" "));
        }
        Ok(())
    };
    all("Uid", uid)?;
    if let Some(gid) = gid {
        all("Gid", gid)?;
        let groups = field("Groups")?;
        if groups != [gid.to_string().as_str()] {
            bail!("Groups is {:?}, not just {gid}", groups.join(" "));
        }
    }
    for caps in ["CapEff", "CapPrm"] {
        let got = field(caps)?;
        if got.len() != 1 || u64::from_str_radix(got[0], 16) != Ok(0) {
            bail!("{caps} is {}, not 0", got.join(" "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\tbalancer\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nGroups:\t65534 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";

    #[test]
    fn a_dropped_status_passes_and_any_root_trace_fails() {
        check_status(DROPPED, 65534, Some(65534)).unwrap();
        let saved_root = DROPPED.replace("Uid:\t65534\t65534\t65534", "Uid:\t65534\t65534\t0");
        let e = check_status(&saved_root, 65534, Some(65534)).unwrap_err();
        assert!(format!("{e}").contains("Uid is 65534 65534 0 65534"), "{e}");
        let caps = DROPPED.replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff");
        assert!(check_status(&caps, 65534, None).is_err());
        let groups = DROPPED.replace("Groups:\t65534 ", "Groups:\t0 65534");
        assert!(check_status(&groups, 65534, Some(65534)).is_err());
        assert!(
            check_status(&groups, 65534, None).is_ok(),
            "gid not checked"
        );
        assert!(check_status("Name:\tx\n", 1, None).is_err());
    }

    #[test]
    fn names_resolve_and_root_or_unknown_is_refused() {
        // `nobody` exists on every Linux this runs on (Debian: 65534, group nogroup).
        let nobody = Target::resolve("nobody", None).unwrap();
        assert_eq!(nobody.uid.as_raw(), 65534);
        assert_ne!(nobody.gid.as_raw(), 0);
        let numeric = Target::resolve("65534", Some("65534")).unwrap();
        assert_eq!((numeric.uid.as_raw(), numeric.gid.as_raw()), (65534, 65534));
        let e = Target::resolve("no-such-user-xyz", None).unwrap_err();
        assert_eq!(format!("{e}"), "--user \"no-such-user-xyz\": no such user");
        let e = Target::resolve("nobody", Some("no-such-group-xyz")).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "--group \"no-such-group-xyz\": no such group"
        );
        assert!(format!("{}", Target::resolve("root", None).unwrap_err()).contains("root"));
        assert!(Target::resolve("0", Some("1")).is_err());
    }
}
