//! Fuzz target: [`worker::fdpass::FdReader`], the reader both ends of the channel use, driven
//! through a real `AF_UNIX` socketpair with real descriptors (`SCM_RIGHTS`) attached.
//!
//! The input is a list of sends. Each carries some bytes and 0 to 7 pipe read ends, each pipe
//! holding a 4-byte id, so a descriptor the reader hands out can be told apart from the others.
//! Two modes, chosen by the first byte:
//! - **conforming**: every send is one whole line with at most `MAX_FDS_PER_MESSAGE`
//!   descriptors riding with its first byte ([`send_with_fds`], sometimes with the rest of
//!   the line in a second write), as the master sends. Then each good line must get exactly
//!   its own descriptors, in order, and nothing more; a bad line (too long, not UTF-8) none,
//!   and those are counted as discarded.
//! - **hostile**: raw `sendmsg`s of anything: descriptors in the middle of lines, several lines
//!   per send, more descriptors than the control buffer holds. Only safety is promised there.
//!
//! Both modes check that the lines are exactly those [`LineDecoder`] makes of the whole
//! stream, that the queue of unclaimed descriptors stays within `MAX_QUEUED_FDS`, and that no
//! descriptor leaks: once the reader and every handed-out descriptor are dropped, every pipe's
//! write end sees `EPIPE`, i.e. no copy of any read end is left open in this process.

#![no_main]

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio_util::codec::Decoder;
use worker::codec::{LineDecoder, LineError};
use worker::fdpass::{send_with_fds, FdReader, MAX_QUEUED_FDS};
use worker::protocol::MAX_FDS_PER_MESSAGE;

/// Most sends and descriptors per input: keeps one run well under a millisecond-scale budget
/// and far from the process's descriptor limit.
const MAX_SENDS: usize = 64;
const MAX_FDS: usize = 48;

/// One send of the input.
struct Send {
    bytes: Vec<u8>,
    fds: usize,
    /// Conforming mode: the first byte (with the descriptors) and the rest in two writes.
    split: bool,
    /// Let the reader run before this send, so reads end at varied places.
    yield_first: bool,
}

fn parse(data: &[u8], hostile: bool) -> Vec<Send> {
    let mut sends = Vec::new();
    let mut rest = data;
    let mut total_fds = 0;
    while let [h, len, tail @ ..] = rest {
        if sends.len() == MAX_SENDS {
            break;
        }
        let len = (*len as usize).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        let mut fds = (h & 7) as usize;
        let mut bytes = body.to_vec();
        if hostile {
            if bytes.is_empty() {
                // Descriptors need a byte to ride on; a plain empty send is a no-op.
                bytes.push(b'x');
            }
        } else {
            fds = fds.min(MAX_FDS_PER_MESSAGE);
            bytes.retain(|&b| b != b'\n');
            bytes.push(b'\n');
        }
        fds = fds.min(MAX_FDS - total_fds);
        total_fds += fds;
        sends.push(Send {
            bytes,
            fds,
            split: h & 8 != 0,
            yield_first: h & 16 != 0,
        });
    }
    sends
}

/// A pipe whose read end is sent; its write end stays here to detect leaks.
struct Tagged {
    /// Closed (taken) once sent: the receiver's copy is then the only one.
    read: Option<OwnedFd>,
    write: std::fs::File,
}

fn tagged(id: u32) -> Tagged {
    use std::io::Write;
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let mut write = std::fs::File::from(w);
    write.write_all(&id.to_le_bytes()).expect("tag the pipe");
    Tagged {
        read: Some(r),
        write,
    }
}

fn id_of(fd: &OwnedFd) -> u32 {
    let mut id = [0u8; 4];
    let n = nix::unistd::read(fd.as_raw_fd(), &mut id).expect("read the tag");
    assert_eq!(n, 4, "a handed-out descriptor is one of the tagged pipes");
    u32::from_le_bytes(id)
}

/// A raw `sendmsg` of `bytes` with `fds`, then plain writes of what the kernel did not take.
async fn send_raw(tx: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let rest = &bytes[sent..];
        let n = tx
            .async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    tx.as_raw_fd(),
                    &[IoSlice::new(rest)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await
            .expect("sendmsg");
        sent += n;
    }
}

/// Each input send: the ids of its descriptors.
async fn sender(tx: UnixStream, sends: &[Send], hostile: bool, pipes: &mut Vec<Tagged>) {
    for s in sends {
        if s.yield_first {
            tokio::task::yield_now().await;
        }
        let first = pipes.len();
        for _ in 0..s.fds {
            pipes.push(tagged(pipes.len() as u32));
        }
        let fds: Vec<BorrowedFd<'_>> = pipes[first..]
            .iter()
            .filter_map(|p| p.read.as_ref().map(AsFd::as_fd))
            .collect();
        if hostile {
            send_raw(&tx, &s.bytes, &fds).await;
        } else if s.split {
            let (head, tail) = s.bytes.split_at(1);
            send_with_fds(&tx, head, &fds).await.expect("send head");
            send_with_fds(&tx, tail, &[]).await.expect("send tail");
        } else {
            send_with_fds(&tx, &s.bytes, &fds).await.expect("send");
        }
        // The receiver's copies are the only ones from now on.
        for p in &mut pipes[first..] {
            p.read = None;
        }
    }
    drop(tx);
}

/// What the reader saw: each item, and for each the ids of the descriptors it took.
type Seen = Vec<(Result<String, LineError>, Vec<u32>)>;

async fn receiver(mut rx: FdReader<UnixStream>, expect: Option<Vec<usize>>) -> (Seen, usize) {
    let mut seen = Seen::new();
    let mut discarded = 0;
    while let Some(item) = rx.next_line().await.expect("reading a socketpair") {
        assert!(rx.queued_fds() <= MAX_QUEUED_FDS, "{} queued", rx.queued_fds());
        let wanted = match &expect {
            // Conforming: take exactly as many as the line was sent with, then one more try.
            Some(counts) => counts.get(seen.len()).copied().unwrap_or(0) + 1,
            None => 8,
        };
        let mut ids = Vec::new();
        for _ in 0..wanted {
            match rx.take_fd() {
                Some(fd) => ids.push(id_of(&fd)),
                None => break,
            }
        }
        discarded += rx.take_discarded();
        seen.push((item, ids));
    }
    discarded += rx.take_discarded();
    assert_eq!(rx.queued_fds(), 0, "descriptors left queued at end of stream");
    (seen, discarded)
}

fn reference(max: usize, sends: &[Send]) -> Vec<Result<String, LineError>> {
    let mut dec = LineDecoder::new(max);
    let mut buf = BytesMut::new();
    for s in sends {
        buf.extend_from_slice(&s.bytes);
    }
    let mut out = Vec::new();
    while let Some(item) = dec.decode(&mut buf).expect("no I/O") {
        out.push(item);
    }
    out
}

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime"),
    );
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let hostile = mode & 1 != 0;
    let max = if mode & 2 != 0 { 4096 } else { 40 };
    let sends = parse(rest, hostile);
    let mut pipes = Vec::new();
    let (seen, discarded) = RUNTIME.with(|rt| {
        rt.borrow().block_on(async {
            let (tx, rx) = UnixStream::pair().expect("socketpair");
            let rx = FdReader::new(rx, max);
            let expect = (!hostile).then(|| sends.iter().map(|s| s.fds).collect());
            let (_, out) = tokio::join!(
                sender(tx, &sends, hostile, &mut pipes),
                receiver(rx, expect)
            );
            out
        })
    });

    let items: Vec<_> = seen.iter().map(|(item, _)| item.clone()).collect();
    assert_eq!(items, reference(max, &sends), "lines differ from the decoder's");

    if !hostile {
        // One item per send; each good line got its own descriptors in order, bad ones none.
        let mut next_id = 0u32;
        let mut bad_fds = 0;
        for ((item, ids), s) in seen.iter().zip(&sends) {
            let own: Vec<u32> = (next_id..next_id + s.fds as u32).collect();
            next_id += s.fds as u32;
            match item {
                Ok(_) => assert_eq!(ids, &own, "a good line's descriptors"),
                Err(_) => {
                    assert!(ids.is_empty(), "a bad line took descriptors");
                    bad_fds += s.fds;
                }
            }
        }
        assert_eq!(discarded, bad_fds, "discarded = the bad lines' descriptors");
    }

    // No leak: every read end is closed now, so each write end sees EPIPE.
    for p in &mut pipes {
        use std::io::Write;
        let err = p.write.write_all(b"x").expect_err("a read end leaked");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }
}

fuzz_target!(
    init: {
        // libFuzzer's own main runs instead of Rust's, which would have ignored SIGPIPE; the
        // leak check relies on EPIPE.
        // SAFETY: setting a signal's disposition to ignore touches no memory of ours.
        unsafe {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn)
        }
        .expect("ignore SIGPIPE");
    },
    |data: &[u8]| run(data)
);
