//! Connecting to a backend without a timer in the common case.
//!
//! On loopback a non-blocking `connect()` has finished (or been refused) by the time it
//! returns: the kernel runs the handshake inside the call. When the client's first bytes
//! are already in hand, sending them is the check: sent (connected), `EAGAIN` (still
//! connecting) or the connect's error. Otherwise a `poll()` with no timeout says which. Only
//! a connect still in progress (a remote backend, a full accept queue) is waited for, by the
//! caller, under its timeout.
//!
//! Why not `timeout(TcpStream::connect(..))`: that arms a timer per connection, and a timer
//! earlier than the runtime's next planned wake-up makes tokio write to its eventfd (a
//! self-wake per connection on a busy thread); it also always waits one event-loop turn for
//! writability, and sets `TCP_NODELAY` with a system call of its own afterwards.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;

/// A connect that was started.
#[derive(Debug)]
pub(crate) enum Connecting {
    /// Established already, with the first `sent` bytes of `first` delivered.
    Done {
        /// The connected socket.
        stream: TcpStream,
        /// How many bytes of `first` went out.
        sent: usize,
    },
    /// Still in progress: wait with [`finish`].
    Pending(TcpStream),
}

/// Starts a non-blocking connect to `addr` (with `TCP_NODELAY`, as every proxied
/// connection wants), sends what it can of `first` once it is up, and says whether it is
/// done. A refusal seen at once is an error. Nothing of `first` is sent unless `Done`.
pub(crate) fn start(addr: SocketAddr, first: &[u8]) -> io::Result<Connecting> {
    let (socket, sent) = start_socket(addr, first)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    Ok(match sent {
        Some(sent) => Connecting::Done { stream, sent },
        None => Connecting::Pending(stream),
    })
}

/// [`start`] without tokio: the socket, and how many bytes of `first` went out (`None`:
/// the connect is still in progress). For the epoll engine, which registers the socket
/// with its own poller.
pub(crate) fn start_socket(addr: SocketAddr, first: &[u8]) -> io::Result<(Socket, Option<usize>)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    // Before the connect, so it costs no extra round and the first bytes go out at once.
    let _ = socket.set_tcp_nodelay(true);
    if !first.is_empty() {
        // HAProxy's `option tcp-smart-connect`: with bytes to send the moment the connect
        // is up, the handshake's last ACK waits (delayed-ACK mode) and rides on them, one
        // segment fewer per backend connection, and the backend is woken once, with its
        // accept and the bytes together. Only with bytes in hand: a server that speaks
        // first would otherwise see its accept wait for the delayed-ACK timer (up to
        // `TCP_DELACK_MAX`, 200 ms, in `tcp_rcv_synsent_state_process`).
        let _ = socket.set_tcp_quickack(false);
    }
    let established = match socket.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    let sent = if first.is_empty() {
        (established || writable_now(&socket)?).then_some(0)
    } else {
        send_now(&socket, first)?
    };
    Ok((socket, sent))
}

/// One `send()` of `data` that does not wait: how much went out (`None`: the connect is
/// still in progress), or the connect's error (a refusal, a reset).
fn send_now(socket: &Socket, data: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: the fd is open for the duration of the call; `data` is a readable slice of
    // `data.len()` bytes.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        _ => Err(e),
    }
}

/// Waits for a pending connect to finish; its error if it failed.
pub(crate) async fn finish(stream: TcpStream) -> io::Result<TcpStream> {
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// One `poll()` that does not wait: whether the connect has finished (`true`), is still
/// in progress (`false`) or failed (its error).
fn writable_now(socket: &Socket) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `fd` is one valid `pollfd` for an open socket; a timeout of 0 never blocks.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        return Err(socket
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(fd.revents & libc::POLLOUT != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_loopback_connect_is_done_within_the_call() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Nearly always done at once; a softirq deferred under heavy load may leave one
        // pending, so one done connect in 20 is the claim.
        let mut done = None;
        for _ in 0..20 {
            match start(l.local_addr().unwrap(), &[]).unwrap() {
                Connecting::Done { stream: s, sent: 0 } => {
                    done = Some(s);
                    break;
                }
                Connecting::Pending(s) => drop(finish(s).await.unwrap()),
                Connecting::Done { sent, .. } => panic!("sent {sent} of nothing"),
            }
        }
        let mut s = done.expect("no loopback connect was done within the call");
        assert!(s.nodelay().unwrap());
        let mut peer = loop {
            // Earlier (pending) connects queue first; take the one that gets our bytes.
            let (p, _) = l.accept().await.unwrap();
            if p.peer_addr().unwrap() == s.local_addr().unwrap() {
                break p;
            }
        };
        s.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn first_bytes_go_out_with_the_connect() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (s, sent) = match start(l.local_addr().unwrap(), b"request").unwrap() {
            Connecting::Done { stream, sent } => (stream, sent),
            Connecting::Pending(s) => (finish(s).await.unwrap(), 0),
        };
        let mut s = s;
        s.write_all(&b"request"[sent..]).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_at_once() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        for first in [&b""[..], b"request"] {
            let e = match start(addr, first) {
                Err(e) => e,
                Ok(Connecting::Pending(s)) => finish(s).await.unwrap_err(),
                Ok(Connecting::Done { .. }) => panic!("connected to a closed port"),
            };
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        }
    }
}
