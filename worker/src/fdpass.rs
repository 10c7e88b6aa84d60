//! Passing file descriptors over the IPC channel (`SCM_RIGHTS` on the `AF_UNIX SOCK_STREAM`
//! socketpair), for the socket-sharing modes. Both ends use it: the master sends its listener
//! or an accepted connection with [`send_message`], a worker reads lines and descriptors with
//! [`FdReader`] and turns a descriptor into a socket with [`tcp_listener`] or [`tcp_stream`].
//!
//! # Which line a descriptor belongs to
//!
//! A stream socket has no message boundaries, but Linux keeps the descriptors of one
//! `sendmsg` attached to the first byte it sent, and a `recvmsg` stops right after the data
//! that carried descriptors: one read brings the descriptors of at most one `sendmsg`, and
//! they came with the last bytes of that read. The rule on the wire is therefore:
//! **a message's descriptors ride with the first byte of its line, in a `sendmsg` that holds
//! no other line's bytes** ([`send_with_fds`] does this, and sends the rest of a line the
//! kernel did not take at once in plain writes).
//!
//! So the descriptors of a read belong to the *last line that starts inside that read*. The
//! reader tags each received descriptor with that line's stream offset and queues it; a line
//! that expects a handle takes the front of the queue, as a Node.js `NODE_HANDLE` message takes
//! its pending handle, but only if the tag is its own offset. A line that expected a handle
//! and came without gets none rather than a later message's, and a descriptor whose line has
//! been read without taking it is closed at once. The queue is bounded by
//! [`MAX_QUEUED_FDS`], so a peer cannot make this process hoard descriptors.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bytes::BytesMut;
use nix::libc;
use nix::sys::socket::{
    getsockname, getsockopt, sendmsg, sockopt, AddressFamily, ControlMessage, MsgFlags, SockType,
    SockaddrLike, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio_util::codec::Decoder;

use crate::codec::{LineDecoder, LineError};
use crate::protocol::{MasterMessage, MAX_FDS_PER_MESSAGE};

/// Most received descriptors an [`FdReader`] holds before the lines that claim them have been
/// read. The attribution rule already keeps the queue short (the reader reads only when no
/// complete line is buffered, so at most two lines' descriptors can wait, each capped at
/// [`MAX_FDS_PER_MESSAGE`] by the control buffer); this bound is the backstop that keeps it
/// so if that reasoning ever stops holding. Excess descriptors are closed and logged.
pub const MAX_QUEUED_FDS: usize = 16;

/// Bytes asked of the kernel per read. Control lines are short; a longer line simply takes
/// several reads.
const READ_CHUNK: usize = 8 * 1024;

/// Room for one `SCM_RIGHTS` control message of [`MAX_FDS_PER_MESSAGE`] descriptors.
const CONTROL_LEN: usize =
    // SAFETY: `CMSG_SPACE` is arithmetic on its argument; it dereferences nothing.
    unsafe {
        libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<libc::c_int>()) as libc::c_uint)
    } as usize;

/// A control-message buffer aligned as `cmsghdr` requires (`CMSG_FIRSTHDR` hands out a
/// pointer to its start).
#[repr(C)]
struct ControlBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; CONTROL_LEN],
}

/// Why a received descriptor cannot be used as the socket a message promised.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message arrived without a descriptor (or its descriptor was closed because the
    /// control data was truncated).
    #[error("the message carried no file descriptor")]
    Missing,
    /// Asking the kernel what the descriptor is failed; usually it is not a socket.
    #[error("inspecting the received descriptor")]
    Inspect(#[source] io::Error),
    /// The descriptor is not the kind of socket the message promised.
    #[error("the received descriptor is {found}, not {expected}")]
    WrongKind {
        /// What the message promised.
        expected: &'static str,
        /// What the descriptor turned out to be.
        found: String,
    },
    /// Switching the socket to non-blocking mode failed.
    #[error("making the received socket non-blocking")]
    NonBlocking(#[source] io::Error),
    /// Registering the socket with the tokio runtime failed.
    #[error("registering the received socket with the runtime")]
    Register(#[source] io::Error),
}

/// Writes `bytes` (normally one whole line) to `stream` with `fds` attached to its first
/// byte, in the same `sendmsg`. If the kernel takes only part of the line, the rest follows
/// in plain writes without descriptors, so the receiver sees them exactly once.
///
/// With descriptors, `bytes` must be one line or the start of one (no `\n` before its last
/// byte, at least one byte to ride on) and there may be at most [`MAX_FDS_PER_MESSAGE`] of
/// them: anything else is `InvalidInput`, because the receiver could not tell which line they
/// belong to. The descriptors are duplicated into the receiver; the caller keeps its own.
///
/// Not cancel-safe: a send dropped halfway may have written part of the line. Only one task
/// may write to the stream at a time, or lines interleave.
pub async fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message, at most {MAX_FDS_PER_MESSAGE}",
                fds.len()
            ),
        ));
    }
    if !fds.is_empty() {
        match bytes.split_last() {
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "descriptors need at least one byte to ride on",
                ))
            }
            Some((_, head)) if head.contains(&b'\n') => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "descriptors must travel with a single line",
                ))
            }
            Some(_) => {}
        }
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let mut sent = 0;
    while sent < bytes.len() {
        // The descriptors travel with the first chunk only; a chunk that fails with EAGAIN
        // sent nothing, descriptors included, so retrying it is exact.
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let rest = &bytes[sent..];
        let result = stream
            .async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(rest)],
                    cmsgs,
                    // A closed peer is an error to report, never a signal.
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await;
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `msg` with exactly [`MasterMessage::handles`] descriptors attached (see
/// [`send_with_fds`]). A count that does not match is `InvalidInput` and nothing is sent, so a
/// bug on the sending side cannot shift the receiver's descriptors onto the wrong message.
pub async fn send_message(
    stream: &UnixStream,
    msg: &MasterMessage,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() != msg.handles() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{msg:?} carries {} descriptors, {} given",
                msg.handles(),
                fds.len()
            ),
        ));
    }
    send_with_fds(stream, msg.to_line().as_bytes(), fds).await
}

/// One received descriptor waiting for the line that claims it.
#[derive(Debug)]
struct Queued {
    fd: OwnedFd,
    /// Stream offset of the first byte of the line it came with.
    line: u64,
}

/// Reads `\n`-terminated lines (with [`LineDecoder`]) from a Unix stream socket and collects
/// the descriptors that arrive with them, received close-on-exec.
///
/// `R` is anything that lends the socket: a [`UnixStream`], its
/// [`OwnedReadHalf`](tokio::net::unix::OwnedReadHalf), an `Arc<UnixStream>`.
pub struct FdReader<R> {
    stream: R,
    decoder: LineDecoder,
    /// Received bytes not yet decoded into lines.
    buf: BytesMut,
    /// Received descriptors nobody has taken yet, oldest first.
    fds: VecDeque<Queued>,
    /// Bytes received so far: the stream offset just past the end of `buf`.
    received: u64,
    /// Whether the next byte to arrive starts a line (the last one received was `\n`).
    at_line_start: bool,
    /// Stream offset where the last line returned by [`FdReader::next_line`] began; `None`
    /// when the last item was a bad line, which claims nothing.
    line_start: Option<u64>,
    /// The peer closed its end (or the read failed): no more bytes or descriptors.
    eof: bool,
    /// Descriptors closed unclaimed since [`FdReader::take_discarded`] was last called: the
    /// caller, who knows who the peer is, decides what a peer that sends them deserves.
    discarded: usize,
    scratch: Box<[u8]>,
}

impl<R> std::fmt::Debug for FdReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the scratch buffer: 8 KiB of bytes would drown any log line.
        f.debug_struct("FdReader")
            .field("received", &self.received)
            .field("buffered", &self.buf.len())
            .field("queued_fds", &self.fds.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<R: AsRef<UnixStream>> FdReader<R> {
    /// A reader of lines of at most `max_line` bytes from `stream`.
    pub fn new(stream: R, max_line: usize) -> Self {
        Self {
            stream,
            decoder: LineDecoder::new(max_line),
            buf: BytesMut::new(),
            fds: VecDeque::new(),
            received: 0,
            at_line_start: true,
            line_start: None,
            eof: false,
            discarded: 0,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next line, or `Ok(None)` once the peer has closed the socket. A line that is too
    /// long or not UTF-8 is one `Err` item and reading goes on (see [`LineDecoder`]); an
    /// `Err` result is a failed read, after which the reader reports end of stream.
    ///
    /// Descriptors that arrived with the returned line wait for [`FdReader::take_fd`] until
    /// the next call; then any left unclaimed are closed.
    ///
    /// Cancel-safe: dropping the future loses no bytes and no descriptors.
    pub async fn next_line(&mut self) -> io::Result<Option<Result<String, LineError>>> {
        loop {
            self.close_unclaimed();
            if let Some(item) = self.decoder.decode(&mut self.buf)? {
                let consumed = self.consumed();
                self.line_start = match item {
                    Ok(_) => Some(consumed - self.decoder.last_line_len() as u64),
                    Err(_) => None,
                };
                return Ok(Some(item));
            }
            if self.eof {
                self.line_start = None;
                if !self.buf.is_empty() {
                    tracing::debug!(bytes = self.buf.len(), "ipc stream ended inside a line");
                    self.buf.clear();
                }
                self.close_all("the ipc stream ended");
                return Ok(None);
            }
            if let Err(e) = self.fill().await {
                self.eof = true;
                self.close_all("reading the ipc stream failed");
                return Err(e);
            }
        }
    }

    /// How many descriptors were closed unclaimed since the last call (and resets the count).
    pub fn take_discarded(&mut self) -> usize {
        std::mem::take(&mut self.discarded)
    }

    /// Takes the next descriptor that arrived with the first byte of the line last returned
    /// by [`FdReader::next_line`]. Call it once per handle the message carries
    /// ([`MasterMessage::handles`]); `None` means the line came without (enough) descriptors.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        let start = self.line_start?;
        while let Some(front) = self.fds.front() {
            if front.line < start {
                // Came with an earlier line, which did not take it.
                self.fds.pop_front();
                self.discarded += 1;
                tracing::debug!("closing a file descriptor no message claimed");
                continue;
            }
            if front.line > start {
                // Belongs to a later line.
                return None;
            }
            return self.fds.pop_front().map(|q| q.fd);
        }
        None
    }

    /// How many received descriptors are waiting to be claimed. For tests and the fuzz
    /// target (`fuzz/fuzz_targets/fd_reader.rs`, built with `--cfg fuzzing`), which check the
    /// queue's bound.
    #[cfg(any(test, fuzzing))]
    pub fn queued_fds(&self) -> usize {
        self.fds.len()
    }

    /// Stream offset just past the bytes the decoder has consumed (lines returned and bytes
    /// discarded).
    fn consumed(&self) -> u64 {
        self.received - self.buf.len() as u64
    }

    /// Closes descriptors whose line has been returned (and had its chance to take them) or
    /// discarded.
    fn close_unclaimed(&mut self) {
        let consumed = self.consumed();
        let before = self.fds.len();
        self.fds.retain(|q| q.line >= consumed);
        let closed = before - self.fds.len();
        if closed > 0 {
            self.discarded += closed;
            tracing::debug!(closed, "closing file descriptors no message claimed");
        }
    }

    fn close_all(&mut self, why: &'static str) {
        if !self.fds.is_empty() {
            self.discarded += self.fds.len();
            tracing::debug!(
                closed = self.fds.len(),
                "{why}: closing file descriptors no message claimed"
            );
            self.fds.clear();
        }
    }

    /// One `recvmsg`: appends its bytes to `buf` and queues its descriptors.
    async fn fill(&mut self) -> io::Result<()> {
        let Self {
            stream, scratch, ..
        } = self;
        let stream = stream.as_ref();
        let (n, fds, truncated) = loop {
            match stream
                .async_io(Interest::READABLE, || {
                    recv_with_fds(stream.as_fd(), &mut scratch[..])
                })
                .await
            {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(());
        }
        let data = &self.scratch[..n];
        self.buf.extend_from_slice(data);
        let from = self.received;
        self.received += n as u64;
        // The descriptors came with the last line that starts in this read.
        let owner = match data[..n - 1].iter().rposition(|&b| b == b'\n') {
            Some(i) => Some(from + i as u64 + 1),
            None if self.at_line_start => Some(from),
            None => None,
        };
        self.at_line_start = data[n - 1] == b'\n';
        if fds.is_empty() {
            return Ok(());
        }
        let Some(line) = owner else {
            self.discarded += fds.len();
            tracing::debug!(
                closed = fds.len(),
                "file descriptors arrived in the middle of a line; closing them"
            );
            return Ok(());
        };
        if truncated {
            // Some descriptors of this message were dropped by the kernel: the message can
            // no longer get all it was sent with, so it gets none.
            self.discarded += fds.len();
            tracing::debug!(
                arrived = fds.len(),
                max = MAX_FDS_PER_MESSAGE,
                "ipc control data truncated; closing the descriptors that arrived"
            );
            return Ok(());
        }
        let mut dropped = 0;
        for fd in fds {
            if self.fds.len() < MAX_QUEUED_FDS {
                self.fds.push_back(Queued { fd, line });
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.discarded += dropped;
            tracing::debug!(
                dropped,
                max = MAX_QUEUED_FDS,
                "too many unclaimed file descriptors; closing the excess"
            );
        }
        Ok(())
    }
}

/// One non-blocking `recvmsg` with `MSG_CMSG_CLOEXEC`: returns how many bytes landed in
/// `data`, every descriptor that arrived (owned, so none can leak), and whether the control
/// data was truncated (`MSG_CTRUNC`).
///
/// This calls libc directly rather than `nix::sys::socket::recvmsg` because nix refuses to
/// walk the control messages once `MSG_CTRUNC` is set, and the descriptors that did arrive
/// would then leak.
fn recv_with_fds(fd: BorrowedFd<'_>, data: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut control = ControlBuf {
        _align: [],
        bytes: [0; CONTROL_LEN],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `msghdr` is plain old data (integers and pointers) for which all-zero is a valid
    // value: no address, no buffers, no flags.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `msg` points at `iov` (which points at `data`) and at `control`, all live and
    // writable for the whole call, with their true lengths; the kernel writes only within them.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // Collect descriptors even when truncated: those that fit were installed in our table.
    // SAFETY: `msg` was filled by a successful `recvmsg`, so its control pointer and the
    // length the kernel set describe initialised control data inside `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null pointers from CMSG_FIRSTHDR/CMSG_NXTHDR point at a complete header
        // inside the control data; `read_unaligned` makes no alignment assumption.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: `cmsg` is a valid header (above); CMSG_DATA only offsets the pointer.
            let first = unsafe { libc::CMSG_DATA(cmsg) };
            let header_len = first as usize - cmsg as usize;
            let count =
                (header.cmsg_len as usize).saturating_sub(header_len) / size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` ints after the header (its `cmsg_len`
                // covers them, and it never exceeds the buffer we gave).
                let raw = unsafe { std::ptr::read_unaligned(first.cast::<libc::c_int>().add(i)) };
                // SAFETY: the kernel just installed `raw` in this process's table for this
                // call alone; nothing else knows the number yet, so taking ownership is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `msg` and `cmsg` are valid as above; CMSG_NXTHDR returns null past the end
        // of the control data the kernel reported.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n as usize, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Turns a received descriptor into the listening TCP socket a `listener` message promised:
/// checks it is a listening IPv4/IPv6 stream socket and makes it non-blocking.
///
/// `O_NONBLOCK` belongs to the open file description, which the sender shares: every process
/// holding this listener sees it non-blocking from now on (tokio needs that anyway).
pub fn tcp_listener(fd: OwnedFd) -> Result<std::net::TcpListener, HandleError> {
    check_tcp(&fd, true)?;
    let listener = std::net::TcpListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(HandleError::NonBlocking)?;
    Ok(listener)
}

/// Turns a received descriptor into the connected TCP stream a `conn` message promised:
/// checks it is an IPv4/IPv6 stream socket that is not listening and makes it non-blocking
/// (which the sender's copy shares, see [`tcp_listener`]).
pub fn tcp_stream(fd: OwnedFd) -> Result<std::net::TcpStream, HandleError> {
    check_tcp(&fd, false)?;
    let stream = std::net::TcpStream::from(fd);
    stream
        .set_nonblocking(true)
        .map_err(HandleError::NonBlocking)?;
    Ok(stream)
}

fn check_tcp(fd: &OwnedFd, listening: bool) -> Result<(), HandleError> {
    let expected = if listening {
        "a listening TCP socket"
    } else {
        "a connected TCP socket"
    };
    let inspect = |e: nix::errno::Errno| HandleError::Inspect(e.into());
    let wrong = |found: String| HandleError::WrongKind { expected, found };
    let kind = getsockopt(fd, sockopt::SockType).map_err(inspect)?;
    if kind != SockType::Stream {
        return Err(wrong(format!("a {kind:?} socket")));
    }
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(inspect)?;
    match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {}
        other => return Err(wrong(format!("a stream socket of family {other:?}"))),
    }
    let accepting = getsockopt(fd, sockopt::AcceptConn).map_err(inspect)?;
    if accepting != listening {
        let found = if accepting {
            "a listening TCP socket"
        } else {
            "a TCP socket that is not listening"
        };
        return Err(wrong(found.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
