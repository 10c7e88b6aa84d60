//! Binding the admin endpoint: a TCP listener, or a Unix socket created mode 0600 (only the
//! master's user may connect: the file mode is the authentication) and removed when the
//! listener is dropped at exit. A socket file left by a master that was killed is replaced,
//! but one that a running master still answers on is not.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::AdminAddr;

/// The Unix socket's mode: read and write for the owner only.
const SOCKET_MODE: u32 = 0o600;

/// A bound admin endpoint.
#[derive(Debug)]
pub enum Listener {
    /// On TCP.
    Tcp(TcpListener),
    /// On a Unix socket; the file goes with it.
    Unix(UnixListener, SocketFile),
}

/// One accepted admin connection.
#[derive(Debug)]
pub enum Accepted {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over the Unix socket.
    Unix(UnixStream),
}

impl Listener {
    /// Binds `addr`. Must run inside a tokio runtime.
    pub fn bind(addr: &AdminAddr) -> anyhow::Result<Self> {
        match addr {
            AdminAddr::Tcp(a) => {
                let std = std::net::TcpListener::bind(a)
                    .with_context(|| format!("binding --admin {a}"))?;
                std.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(std)?))
            }
            AdminAddr::Unix(path) => {
                bind_unix(path).with_context(|| format!("binding --admin {}", path.display()))
            }
        }
    }

    /// Takes over the admin listener an in-place upgrade passed on: a TCP listener, or a Unix
    /// one (with `path`, its socket file, which stays where it is and is removed at exit as
    /// usual). Must run inside a tokio runtime.
    pub fn inherit(fd: OwnedFd, path: Option<PathBuf>) -> io::Result<Self> {
        match path {
            None => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(std)?))
            }
            Some(path) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::Unix(UnixListener::from_std(std)?, SocketFile(path)))
            }
        }
    }

    /// A duplicate of the listening socket, and a Unix socket's path: what an upgrade
    /// passes on (the socket file is not removed by the exec: no destructor runs).
    pub fn carry(&self) -> io::Result<(OwnedFd, Option<PathBuf>)> {
        Ok(match self {
            Self::Tcp(l) => (l.as_fd().try_clone_to_owned()?, None),
            Self::Unix(l, f) => (l.as_fd().try_clone_to_owned()?, Some(f.0.clone())),
        })
    }

    /// Where it listens, as the log and `/status` show it (the real port for `:0`).
    pub fn local(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Self::Unix(_, f) => f.0.display().to_string(),
        }
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
            Self::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// The socket file of a Unix admin endpoint, removed on drop.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "could not remove the admin socket");
            }
        }
    }
}

fn bind_unix(path: &Path) -> anyhow::Result<Listener> {
    remove_stale(path)?;
    // The socket is created with the umask's mode: narrow it for the bind, so no other user
    // can connect in the moment before the chmod below. Binding happens before any worker
    // or file-writing task exists, so the process-wide umask affects nothing else.
    // SAFETY: umask only swaps a process attribute and cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let std = bound?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    std.set_nonblocking(true)?;
    Ok(Listener::Unix(UnixListener::from_std(std)?, file))
}

/// Removes a socket file that nobody answers on (a master killed before it could); refuses
/// a path that is not a socket, or that a live master still serves.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("another master is serving on {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale admin socket");
            std::fs::remove_file(path)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
