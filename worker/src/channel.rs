//! The worker's end of the IPC channel: find it, announce readiness, learn when to stop.
//!
//! A Rust program becomes a balancer worker with three lines:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let mut channel = worker::Channel::from_env()?;
//! channel.ready(listener.local_addr()?.port()).await?;
//! // serve `listener` until this resolves:
//! let why = channel.stopped().await;
//! # Ok(()) }
//! ```

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_util::codec::FramedRead;

use crate::codec::LineDecoder;
use crate::protocol::{MasterMessage, WorkerMessage, ENV_IPC_FD, MAX_LINE};

/// Why the channel could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// `BALANCER_IPC_FD` is not set: this process was not started by balancer.
    #[error("{ENV_IPC_FD} is not set: not started by balancer")]
    NotSet,
    /// `BALANCER_IPC_FD` is not a file descriptor number.
    #[error("{ENV_IPC_FD}={0:?} is not a file descriptor number")]
    BadFd(String),
    /// The fd named by `BALANCER_IPC_FD` is not open or not a socket.
    #[error("{ENV_IPC_FD}={fd} is not an open socket")]
    NotASocket {
        /// The fd number from the environment.
        fd: RawFd,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Writing a message to the master failed (usually: the master is gone).
    #[error("sending to the master")]
    Send(#[source] std::io::Error),
}

/// Why [`Channel::stopped`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The master sent `shutdown`: drain and exit 0.
    Shutdown,
    /// The channel closed: the master is gone, exit promptly.
    Disconnected,
}

/// The worker's end of the IPC channel.
#[derive(Debug)]
pub struct Channel {
    reader: FramedRead<OwnedReadHalf, LineDecoder>,
    writer: OwnedWriteHalf,
}

impl Channel {
    /// Opens the channel named by `BALANCER_IPC_FD`.
    ///
    /// Takes ownership of the fd, marks it close-on-exec (so this worker's own children do
    /// not hold the master's channel open), and removes the variable from the environment,
    /// as Node does with `NODE_CHANNEL_FD`. Must run inside a tokio runtime.
    pub fn from_env() -> Result<Self, ChannelError> {
        let raw = std::env::var(ENV_IPC_FD).map_err(|_| ChannelError::NotSet)?;
        let fd: RawFd = raw
            .trim()
            .parse()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| ChannelError::BadFd(raw.clone()))?;
        let not_socket = |source| ChannelError::NotASocket { fd, source };
        // Check the fd is open and a socket before taking ownership of it.
        nix::sys::socket::getsockopt(
            // SAFETY: borrowing a raw fd only for the duration of this call; no ownership taken.
            &unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::sys::socket::sockopt::SockType,
        )
        .map_err(|e| not_socket(e.into()))?;
        // SAFETY: the master gave this fd to us alone; nothing else in this process owns it,
        // and the variable is removed below so nothing else will claim it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Called once, early, before the program spawns threads that read the environment
        // (the documented contract of `from_env`).
        std::env::remove_var(ENV_IPC_FD);
        Self::from_fd(owned).map_err(not_socket)
    }

    /// Wraps an already-open channel socket (for tests, or programs that pass it on).
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        let std = std::os::unix::net::UnixStream::from(fd);
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&std),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        std.set_nonblocking(true)?;
        let (read, writer) = UnixStream::from_std(std)?.into_split();
        Ok(Self {
            reader: FramedRead::new(read, LineDecoder::new(MAX_LINE)),
            writer,
        })
    }

    /// Tells the master this worker accepts connections on `127.0.0.1:port`.
    pub async fn ready(&mut self, port: u16) -> Result<(), ChannelError> {
        self.send(&WorkerMessage::Ready {
            port: Some(port),
            features: vec!["ping".to_owned()],
        })
        .await
    }

    /// Sends one message to the master.
    pub async fn send(&mut self, msg: &WorkerMessage) -> Result<(), ChannelError> {
        self.writer
            .write_all(msg.to_line().as_bytes())
            .await
            .map_err(ChannelError::Send)
    }

    /// Waits for the next message from the master; `None` once the channel is closed.
    /// Lines that cannot be parsed are skipped with a debug log.
    pub async fn recv(&mut self) -> Option<MasterMessage> {
        loop {
            match self.reader.next().await? {
                Ok(Ok(line)) => match MasterMessage::parse(&line) {
                    Ok(msg) => return Some(msg),
                    Err(e) => tracing::debug!(error = %e, "ignoring message from master"),
                },
                Ok(Err(e)) => tracing::debug!(error = %e, "ignoring line from master"),
                Err(e) => {
                    tracing::debug!(error = %e, "ipc channel read failed");
                    return None;
                }
            }
        }
    }

    /// Answers pings until the master asks this worker to stop or the channel closes.
    pub async fn stopped(&mut self) -> StopReason {
        loop {
            match self.recv().await {
                None => return StopReason::Disconnected,
                Some(MasterMessage::Shutdown) => return StopReason::Shutdown,
                Some(MasterMessage::Ping { seq }) => {
                    if self.send(&WorkerMessage::Pong { seq }).await.is_err() {
                        return StopReason::Disconnected;
                    }
                }
                Some(_) => {}
            }
        }
    }
}
