//! The worker's end of the IPC channel: find it, announce readiness, receive the sockets the
//! master hands over, learn when to stop.
//!
//! A Rust program becomes a balancer worker with three lines (proxy mode):
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
//!
//! A hyper server should serve each connection with `builtin::http1` (feature `builtin`; hyper's
//! builder with half-close on), so a client that shuts its write side after the request
//! still gets the answer.
//!
//! In shared mode the listener comes from the master instead ([`Channel::listener`]); in
//! handoff mode each connection does ([`Channel::recv`] yields [`Event::Conn`], answer with
//! [`Channel::accepted`]). The channel reads through [`FdReader`], so descriptors that come
//! with no message expecting them are closed rather than kept.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::fdpass::{self, FdReader, HandleError};
use crate::node;
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
    /// The master asked this worker to stop, or closed the channel, before sending the
    /// listener [`Channel::listener`] was waiting for.
    #[error("the channel ended before the master sent a listener ({0:?})")]
    NoListener(StopReason),
    /// The master sent a `listener` message whose descriptor is missing or not a listening
    /// TCP socket.
    #[error("the master's listener is unusable")]
    BadListener(#[source] HandleError),
}

/// Why [`Channel::stopped`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The master sent `shutdown`: drain and exit 0.
    Shutdown,
    /// The channel closed: the master is gone, exit promptly.
    Disconnected,
}

/// Something the master sent that the worker has to act on. Pings are answered inside
/// [`Channel::recv`] and never show up here.
#[derive(Debug)]
pub enum Event {
    /// Stop accepting, finish open connections, exit 0.
    Shutdown,
    /// Shared mode: the master's listening socket, already registered with the runtime.
    Listener(TcpListener),
    /// Handoff mode: a client connection. Answer [`Channel::accepted`] once it is yours (the
    /// master holds its own copy until then), or [`Channel::rejected`].
    Conn {
        /// The master's id for this connection, to echo in the answer.
        id: u64,
        /// The client connection, already registered with the runtime.
        stream: TcpStream,
    },
}

/// What one message turned into, before [`Channel::recv`] filters it.
enum Received {
    Event(Event),
    /// A `listener` message that came without a usable socket: [`Channel::listener`] fails
    /// on it, [`Channel::recv`] logs it.
    BadListener(HandleError),
}

/// The worker's end of the IPC channel.
#[derive(Debug)]
pub struct Channel {
    reader: FdReader<OwnedReadHalf>,
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
            reader: FdReader::new(read, MAX_LINE),
            writer,
        })
    }

    /// Tells the master this worker accepts connections on `port`: its own loopback port in
    /// proxy mode, the shared or reuseport port in those modes.
    pub async fn ready(&mut self, port: u16) -> Result<(), ChannelError> {
        self.send(&WorkerMessage::Ready {
            port: Some(port),
            features: vec!["ping".to_owned()],
        })
        .await
    }

    /// Tells the master this worker is ready without listening anywhere (handoff mode: it
    /// serves only the connections the master hands it).
    pub async fn ready_without_port(&mut self) -> Result<(), ChannelError> {
        self.send(&WorkerMessage::Ready {
            port: None,
            features: vec!["ping".to_owned()],
        })
        .await
    }

    /// Tells the master this worker owns the handed-off connection `id`, so the master can
    /// close its copy.
    pub async fn accepted(&mut self, id: u64) -> Result<(), ChannelError> {
        self.send(&WorkerMessage::Accepted { id }).await
    }

    /// Tells the master this worker will not serve the handed-off connection `id`; the master
    /// still holds the client and may give it to another worker.
    pub async fn rejected(&mut self, id: u64) -> Result<(), ChannelError> {
        self.send(&WorkerMessage::Rejected { id }).await
    }

    /// Sends one message to the master.
    pub async fn send(&mut self, msg: &WorkerMessage) -> Result<(), ChannelError> {
        self.writer
            .write_all(msg.to_line().as_bytes())
            .await
            .map_err(ChannelError::Send)
    }

    /// Waits for the next thing the master wants; `None` once the channel is closed.
    ///
    /// Answers pings meanwhile. Lines that cannot be parsed are skipped with a debug log; a
    /// `conn` whose descriptor is missing or not a TCP connection is answered `rejected` here;
    /// a `listener` without a usable socket is logged and skipped. Cancel-safe, except that an
    /// answer (`pong`, `rejected`) being written when the future is dropped may be cut short.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            match self.next().await? {
                Received::Event(event) => return Some(event),
                Received::BadListener(e) => {
                    tracing::warn!(error = %e, "ignoring a listener the master sent")
                }
            }
        }
    }

    /// Waits for the master's listening socket (shared mode), answering pings meanwhile.
    /// Connections handed over in the meantime are rejected: this worker serves the listener.
    pub async fn listener(&mut self) -> Result<TcpListener, ChannelError> {
        loop {
            match self.next().await {
                None => return Err(ChannelError::NoListener(StopReason::Disconnected)),
                Some(Received::BadListener(e)) => return Err(ChannelError::BadListener(e)),
                Some(Received::Event(Event::Listener(listener))) => return Ok(listener),
                Some(Received::Event(Event::Shutdown)) => {
                    return Err(ChannelError::NoListener(StopReason::Shutdown))
                }
                Some(Received::Event(Event::Conn { id, .. })) => self.refuse(id).await,
            }
        }
    }

    /// Answers pings until the master asks this worker to stop or the channel closes. A
    /// connection handed over meanwhile is rejected (so the master gives it to someone else)
    /// and an extra listener is closed: a worker waiting here serves what it already has.
    pub async fn stopped(&mut self) -> StopReason {
        loop {
            match self.recv().await {
                None => return StopReason::Disconnected,
                Some(Event::Shutdown) => return StopReason::Shutdown,
                Some(Event::Conn { id, .. }) => self.refuse(id).await,
                Some(Event::Listener(_)) => {
                    tracing::debug!("closing a listener the master sent while not waiting for one")
                }
            }
        }
    }

    /// Rejects a handed-off connection this worker does not want; the stream has already
    /// been dropped by the caller. A failed send shows up as end of channel on the next read.
    async fn refuse(&mut self, id: u64) {
        tracing::debug!(
            id,
            "rejecting a handed-off connection: not serving handoffs now"
        );
        let _ = self.rejected(id).await;
    }

    /// Reads messages until one needs the caller, answering pings and bad `conn`s itself.
    async fn next(&mut self) -> Option<Received> {
        loop {
            let line = match self.reader.next_line().await {
                Ok(Some(Ok(line))) => line,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "ignoring line from master");
                    continue;
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "ipc channel read failed");
                    return None;
                }
            };
            let msg = match MasterMessage::parse(&line) {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::debug!(error = %e, "ignoring message from master");
                    continue;
                }
            };
            match msg {
                MasterMessage::Shutdown => return Some(Received::Event(Event::Shutdown)),
                MasterMessage::Ping { seq } => {
                    if self.send(&WorkerMessage::Pong { seq }).await.is_err() {
                        return None;
                    }
                }
                MasterMessage::Listener => {
                    return Some(match self.take_listener() {
                        Ok(listener) => {
                            // Node's handle protocol: the sender holds back everything else
                            // until the receiver acknowledges the handle.
                            if self
                                .writer
                                .write_all(node::ACK_LINE.as_bytes())
                                .await
                                .is_err()
                            {
                                return None;
                            }
                            Received::Event(Event::Listener(listener))
                        }
                        Err(e) => Received::BadListener(e),
                    });
                }
                MasterMessage::Conn { id } => match self.take_stream() {
                    Ok(stream) => return Some(Received::Event(Event::Conn { id, stream })),
                    Err(e) => {
                        tracing::warn!(id, error = %e, "rejecting a handed-off connection");
                        if self.rejected(id).await.is_err() {
                            return None;
                        }
                    }
                },
                MasterMessage::Unknown => {}
            }
        }
    }

    fn take_listener(&mut self) -> Result<TcpListener, HandleError> {
        let fd = self.reader.take_fd().ok_or(HandleError::Missing)?;
        TcpListener::from_std(fdpass::tcp_listener(fd)?).map_err(HandleError::Register)
    }

    fn take_stream(&mut self) -> Result<TcpStream, HandleError> {
        let fd = self.reader.take_fd().ok_or(HandleError::Missing)?;
        TcpStream::from_std(fdpass::tcp_stream(fd)?).map_err(HandleError::Register)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    /// Generous bound for steps that take microseconds, so a broken test fails instead of
    /// hanging.
    const STEP: Duration = Duration::from_secs(10);

    /// The master's side of a channel: writes with descriptors, reads worker messages.
    pub(crate) struct FakeMaster {
        stream: UnixStream,
        reader: FdReader<UnixStream>,
    }

    impl FakeMaster {
        /// A connected (master, worker channel) pair, both inside this test process.
        pub(crate) fn pair() -> (Self, Channel) {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let channel = Channel::from_fd(OwnedFd::from(b)).expect("channel");
            a.set_nonblocking(true).expect("nonblocking");
            let read = a.try_clone().expect("clone");
            let stream = UnixStream::from_std(a).expect("register");
            let reader = FdReader::new(UnixStream::from_std(read).expect("register"), MAX_LINE);
            (Self { stream, reader }, channel)
        }

        pub(crate) async fn send(&self, msg: &MasterMessage, fds: &[std::os::fd::BorrowedFd<'_>]) {
            fdpass::send_message(&self.stream, msg, fds)
                .await
                .expect("send to worker");
        }

        /// Writes a raw line with no descriptors (to send a message without its handle).
        pub(crate) async fn send_raw(&self, line: &str) {
            fdpass::send_with_fds(&self.stream, line.as_bytes(), &[])
                .await
                .expect("send to worker");
        }

        pub(crate) async fn recv(&mut self) -> WorkerMessage {
            let line = tokio::time::timeout(STEP, self.reader.next_line())
                .await
                .expect("worker message in time")
                .expect("read")
                .expect("channel open")
                .expect("good line");
            WorkerMessage::parse(&line).expect("parses")
        }
    }

    #[tokio::test]
    async fn listener_arrives_while_pings_are_answered() {
        let (mut master, mut channel) = FakeMaster::pair();
        let shared = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = shared.local_addr().expect("addr");
        let worker = tokio::spawn(async move {
            let listener = channel.listener().await;
            (channel, listener)
        });
        master.send(&MasterMessage::Ping { seq: 3 }, &[]).await;
        assert_eq!(master.recv().await, WorkerMessage::Pong { seq: 3 });
        master
            .send(&MasterMessage::Listener, &[shared.as_fd()])
            .await;
        let (_channel, listener) = tokio::time::timeout(STEP, worker)
            .await
            .expect("in time")
            .expect("task");
        let listener = listener.expect("a listener");
        assert_eq!(listener.local_addr().expect("addr"), addr);
    }

    #[tokio::test]
    async fn listener_wait_ends_on_shutdown_close_or_a_bad_handle() {
        let (master, mut channel) = FakeMaster::pair();
        master.send(&MasterMessage::Shutdown, &[]).await;
        assert!(matches!(
            channel.listener().await,
            Err(ChannelError::NoListener(StopReason::Shutdown))
        ));
        master.send_raw("{\"type\":\"listener\"}\n").await;
        assert!(matches!(
            channel.listener().await,
            Err(ChannelError::BadListener(HandleError::Missing))
        ));
        drop(master);
        assert!(matches!(
            channel.listener().await,
            Err(ChannelError::NoListener(StopReason::Disconnected))
        ));
    }

    #[tokio::test]
    async fn handed_off_connections_are_received_and_answered() {
        let (mut master, mut channel) = FakeMaster::pair();
        let public = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(public.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = public.accept().expect("accept");

        // Without its descriptor a conn is rejected by the channel itself.
        master.send_raw("{\"type\":\"conn\",\"id\":1}\n").await;
        master
            .send(&MasterMessage::Conn { id: 2 }, &[accepted.as_fd()])
            .await;
        let event = tokio::time::timeout(STEP, channel.recv())
            .await
            .expect("in time");
        let Some(Event::Conn { id, stream }) = event else {
            panic!("expected a conn, got {event:?}");
        };
        assert_eq!(id, 2);
        assert_eq!(master.recv().await, WorkerMessage::Rejected { id: 1 });
        assert_eq!(
            stream.peer_addr().expect("peer"),
            client.local_addr().expect("local")
        );
        channel.accepted(id).await.expect("send");
        assert_eq!(master.recv().await, WorkerMessage::Accepted { id: 2 });
    }

    #[tokio::test]
    async fn stopped_rejects_handoffs_and_reports_shutdown() {
        let (mut master, mut channel) = FakeMaster::pair();
        let public = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _client =
            std::net::TcpStream::connect(public.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = public.accept().expect("accept");
        master
            .send(&MasterMessage::Conn { id: 9 }, &[accepted.as_fd()])
            .await;
        master.send(&MasterMessage::Shutdown, &[]).await;
        assert_eq!(channel.stopped().await, StopReason::Shutdown);
        assert_eq!(master.recv().await, WorkerMessage::Rejected { id: 9 });
        drop(master);
        assert_eq!(channel.stopped().await, StopReason::Disconnected);
    }

    #[tokio::test]
    async fn ready_messages() {
        let (mut master, mut channel) = FakeMaster::pair();
        channel.ready(8080).await.expect("send");
        channel.ready_without_port().await.expect("send");
        assert!(matches!(
            master.recv().await,
            WorkerMessage::Ready {
                port: Some(8080),
                ..
            }
        ));
        assert!(matches!(
            master.recv().await,
            WorkerMessage::Ready { port: None, .. }
        ));
    }
}
