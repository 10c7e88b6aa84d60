//! The copy loop: moves bytes both ways between a client and a backend until both
//! directions are closed.
//!
//! Unlike `tokio::io::copy_bidirectional`, it holds no buffer while a connection is idle.
//! Each direction waits for readiness, reads into a stack buffer and writes it straight on,
//! synchronously; only when the destination cannot take everything does the rest go into a
//! heap buffer until it drains. So an idle proxied connection costs its task and two sockets,
//! and the common case (the destination keeps up) allocates nothing. A read or write that
//! comes back short clears the socket's readiness, as tokio's own `poll_read` does, which
//! saves the extra `read()` returning `EAGAIN` after every message.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::activity::Activity;
use crate::quiesce::Quiesce;

/// Bytes moved by a finished copy: (a → b, b → a).
pub type Totals = (u64, u64);

/// Size of the stack buffer used per read. One read of this size covers a typical HTTP
/// request or response; larger bodies simply take several rounds.
pub const CHUNK: usize = 16 * 1024;

/// What to do when the backend is the first to end its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendEof {
    /// The connection is over once everything the backend sent is delivered and the client
    /// has nothing unread in flight: both sockets are closed, with no `shutdown` and no wait
    /// for the client's own FIN (nginx's `proxy_half_close off`). A server that closes is
    /// done; this saves a `shutdown`, a `read` and a wake-up per connection. Bytes the
    /// client already sent are still passed on (then it falls back to [`Self::PassOn`]).
    #[default]
    Close,
    /// Pass the half-close on (`shutdown(SHUT_WR)` towards the client) and keep copying
    /// the client's bytes to the backend until the client ends too: for protocols whose
    /// server shuts its write side first and goes on reading (`--half-close`).
    PassOn,
}

/// Copies `a → b` and `b → a` until both directions reach EOF, passing the first half-close
/// on (`shutdown(SHUT_WR)` on the other socket), except a backend's that `on_backend_eof`
/// says ends the connection. The second EOF is passed on by the caller closing both
/// sockets, which it must do as soon as this returns. `a` is the client and `b` the
/// backend: every move is noted in `activity`, with its direction, for the timeouts.
/// While `hold` (an in-place upgrade's [`Quiesce`]) holds the client, its next bytes are
/// left unread. Returns the first error of either direction (the caller drops both sockets,
/// which closes them).
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    activity: &Activity,
    on_backend_eof: BackendEof,
    hold: Option<&Quiesce>,
) -> io::Result<Totals> {
    let finished = AtomicBool::new(false);
    let (ab_total, ba_total) = (AtomicU64::new(0), AtomicU64::new(0));
    let close = on_backend_eof == BackendEof::Close;
    let mut ab = pin!(one_way(
        a,
        b,
        activity,
        Activity::to_backend,
        &finished,
        &ab_total,
        false,
        hold
    ));
    let mut ba = pin!(one_way(
        b,
        a,
        activity,
        Activity::to_client,
        &finished,
        &ba_total,
        close,
        None
    ));
    let (mut ab_done, mut ba_done) = (false, false);
    // Not `try_join!`: a backend's EOF may end the client's direction too (`Close`).
    std::future::poll_fn(|cx| -> Poll<io::Result<()>> {
        if !ab_done {
            if let Poll::Ready(r) = ab.as_mut().poll(cx) {
                r?;
                ab_done = true;
            }
        }
        if !ba_done {
            if let Poll::Ready(r) = ba.as_mut().poll(cx) {
                if r? == End::Whole {
                    return Poll::Ready(Ok(()));
                }
                ba_done = true;
            }
        }
        if ab_done && ba_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok((
        ab_total.load(Ordering::Relaxed),
        ba_total.load(Ordering::Relaxed),
    ))
}

/// How a direction ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// This direction reached EOF (and passed it on, or the other one had already).
    Half,
    /// The whole connection is over: the other direction need not be waited for.
    Whole,
}

/// Copies `src → dst` until EOF on `src`, counting bytes in `total`, then shuts down `dst`
/// for writing, unless the other direction has `finished` already (then both sockets are
/// about to be closed, which says the same to both peers without the extra system call), or
/// `close_on_eof` is set and `dst` has nothing unread: then the whole connection ends.
/// While `hold` holds the client, `src` is not read (it is ready, so it is read at once
/// when the hold ends).
#[allow(clippy::too_many_arguments)]
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    read: fn(&Activity),
    finished: &AtomicBool,
    total: &AtomicU64,
    close_on_eof: bool,
    hold: Option<&Quiesce>,
) -> io::Result<End> {
    let mut backlog: Vec<u8> = Vec::new();
    loop {
        // The per-direction readiness slot (`poll_read_ready`), not `readable()`, whose
        // waiter list takes a lock on every registration: 16 → 13 µs of master CPU per
        // keep-alive request in an A/B run (bench/NOTES.md).
        std::future::poll_fn(|cx| src.poll_read_ready(cx)).await?;
        // After the readiness, so a request that arrives once quiescing began is held too.
        if let Some(q) = hold.filter(|q| q.holds(activity)) {
            q.resumed().await;
            continue;
        }
        // The stack buffer lives only inside this block, which has no `.await`, so it is not
        // part of the future: an idle connection does not carry it.
        let outcome = {
            // Not zeroed: clearing 16 KiB per read showed up in profiles, and only the bytes
            // `read()` wrote are ever looked at.
            let mut buf = [MaybeUninit::<u8>::uninit(); CHUNK];
            match read_clearing(src, &mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    // SAFETY: read(2) initialised the first `n` bytes of `buf`.
                    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    read(activity);
                    let written = write_now(dst, data)?;
                    backlog.extend_from_slice(&data[written..]);
                    Some(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Some(0),
                Err(e) => return Err(e),
            }
        };
        match outcome {
            None => {
                if finished.swap(true, Ordering::Relaxed) {
                    return Ok(End::Half);
                }
                // Everything read was written (the backlog is empty between reads).
                if close_on_eof && !has_unread(dst) {
                    return Ok(End::Whole);
                }
                shutdown_write(dst);
                return Ok(End::Half);
            }
            Some(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        // Slow path: the destination is full. Hold the rest (at most one chunk) until it
        // drains; do not read more meanwhile, so memory stays bounded by one chunk.
        while !backlog.is_empty() {
            std::future::poll_fn(|cx| dst.poll_write_ready(cx)).await?;
            match write_clearing(dst, &backlog) {
                Ok(w) => {
                    backlog.drain(..w);
                    activity.moved();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        if backlog.capacity() > 0 {
            backlog = Vec::new();
        }
    }
}

/// Writes as much of `data` as the socket takes now; returns how much.
fn write_now(dst: &TcpStream, mut data: &[u8]) -> io::Result<usize> {
    let len = data.len();
    while !data.is_empty() {
        match write_clearing(dst, data) {
            Ok(w) => data = &data[w..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len - data.len())
}

/// One `read()`; a short read also clears read readiness (the queue is very likely empty).
fn read_clearing(src: &TcpStream, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    let mut got = 0;
    let fd = src.as_raw_fd();
    let r = src.try_io(Interest::READABLE, || {
        // SAFETY: `fd` is the open socket of `src`, borrowed for this call; `buf` is valid
        // for writes of `buf.len()` bytes (read(2) does not need them initialised).
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < buf.len() {
            // Tells tokio to clear readiness; the bytes are returned through `got`.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// One `send()` (no SIGPIPE); a short write also clears write readiness.
fn write_clearing(dst: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut put = 0;
    let fd = dst.as_raw_fd();
    let r = dst.try_io(Interest::WRITABLE, || {
        // SAFETY: `fd` is the open socket of `dst`, borrowed for this call; `data` is a valid
        // readable slice of `data.len()` bytes.
        let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        put = n as usize;
        if put < data.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(put)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && put > 0 => Ok(put),
        other => other,
    }
}

/// Whether `sock` has bytes waiting that nobody has read (an EOF is not such a byte): one
/// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte. Closing a socket with unread bytes sends a
/// reset, which can destroy the answer still in flight to the peer, so such a connection
/// is ended by the half-close path instead. An error counts as unread (the slow, careful
/// path will see it). By descriptor too: the TLS path asks about its client's socket.
pub(crate) fn has_unread(sock: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: the fd is open for the duration of the call; `byte` is valid for one byte.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

/// Passes a half-close on. Errors (the peer is already gone) are irrelevant: the other
/// direction will see them.
fn shutdown_write(dst: &TcpStream) {
    // SAFETY: `dst`'s fd is open for the duration of this call.
    unsafe {
        libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn copies_large_transfers_both_ways_with_half_close() {
        // client <-> (p1 | p2) <-> server
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let activity = Activity::default();
        // Like `forward`, close both sockets as soon as the copy returns: the second EOF is
        // passed on by that close, not by a shutdown.
        let proxy = async {
            let r = bidirectional(&p1, &p2, &activity, BackendEof::PassOn, None).await;
            drop((p1, p2));
            r
        };
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let ends = async {
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            let send_up = async {
                cw.write_all(&up).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let send_down = async {
                sw.write_all(&down).await.unwrap();
                sw.shutdown().await.unwrap();
            };
            let mut got_up = Vec::new();
            let mut got_down = Vec::new();
            let (_, _, up_read, down_read) = tokio::join!(
                send_up,
                send_down,
                sr.read_to_end(&mut got_up),
                cr.read_to_end(&mut got_down)
            );
            up_read.unwrap();
            down_read.unwrap();
            (got_up, got_down)
        };
        let (totals, (got_up, got_down)) = tokio::join!(proxy, ends);
        assert_eq!(totals.unwrap(), (up.len() as u64, down.len() as u64));
        assert!(got_up == up && got_down == down);
        assert!(activity.answered());
    }

    #[tokio::test]
    async fn a_backend_eof_ends_the_connection_once_delivered() {
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let activity = Activity::default();
        let backend = async {
            let mut req = [0u8; 3];
            server.read_exact(&mut req).await.unwrap();
            server.write_all(b"response").await.unwrap();
            drop(server);
        };
        let talk = async {
            client.write_all(b"req").await.unwrap();
        };
        // The copy returns although the client never closed its side.
        let ((), (), r) = tokio::join!(
            backend,
            talk,
            bidirectional(&p1, &p2, &activity, BackendEof::Close, None)
        );
        assert_eq!(r.unwrap(), (3, 8));
        drop((p1, p2));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
    }

    #[tokio::test]
    async fn a_backend_half_close_is_passed_on_when_asked() {
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let activity = Activity::default();
        let proxy = async {
            let r = bidirectional(&p1, &p2, &activity, BackendEof::PassOn, None).await;
            drop((p1, p2));
            r
        };
        // The server speaks first and shuts its side, then goes on reading the client.
        let backend = async {
            server.write_all(b"greeting").await.unwrap();
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            rest
        };
        let talk = async {
            let mut got = [0u8; 8];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"greeting");
            let mut eof = [0u8; 1];
            assert_eq!(client.read(&mut eof).await.unwrap(), 0);
            client.write_all(b"after the server's EOF").await.unwrap();
            client.shutdown().await.unwrap();
        };
        let (r, rest, ()) = tokio::join!(proxy, backend, talk);
        assert_eq!(rest, b"after the server's EOF");
        assert_eq!(r.unwrap(), (22, 8));
    }

    #[test]
    fn idle_connection_future_does_not_carry_the_chunk() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = pair().await;
            let activity = Activity::default();
            let fut = bidirectional(&a, &b, &activity, BackendEof::Close, None);
            assert!(
                std::mem::size_of_val(&fut) < CHUNK,
                "future is {} bytes",
                std::mem::size_of_val(&fut)
            );
        });
    }
}
