//! A worker's IPC channel as the master uses it: the reader (lines with `recvmsg`, so that
//! descriptors a worker sends uninvited are closed and counted, and a short read at the
//! message that carried them does not stall the rest) and one [`Ipc::send`] for every line
//! the master writes, with or without descriptors attached.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use worker::codec::LineError;
use worker::fdpass::FdReader;
use worker::protocol::MAX_LINE;

/// An IPC write that takes longer than this is abandoned: the worker is not reading its
/// channel, and that is handled by its checks and its ready timeout, not by waiting.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// One item read from the channel, in the shape of a stream item: `None` at EOF, an I/O
/// error, or a line that is either text or a framing error (too long, not UTF-8).
pub(super) type Read = Option<io::Result<Result<String, LineError>>>;

/// The master's end of one worker's channel.
pub(super) struct Ipc {
    reader: FdReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Ipc {
    /// Wraps the master's end of the socket pair made at spawn.
    pub(super) fn new(stream: UnixStream) -> Self {
        let (read, write) = stream.into_split();
        Self {
            reader: FdReader::new(read, MAX_LINE),
            write,
        }
    }

    /// The channel's descriptor number (the master's end), for an upgrade to pass on.
    pub(super) fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.write.as_ref())
    }

    /// The next line from the worker (`None` at EOF).
    pub(super) async fn next_line(&mut self) -> Read {
        self.reader.next_line().await.transpose()
    }

    /// How many uninvited descriptors were closed since the last call.
    pub(super) fn take_discarded(&mut self) -> usize {
        self.reader.take_discarded()
    }

    /// Writes one line (newline included) with `fds` attached, giving up after `timeout`.
    /// The caller decides what a failure means: most are only logged, since a worker that
    /// cannot be written to is gone, going, or not reading, and that is handled elsewhere.
    pub(super) async fn send(
        &self,
        line: &str,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> io::Result<()> {
        let sent = worker::fdpass::send_with_fds(self.write.as_ref(), line.as_bytes(), fds);
        match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// [`send`](Self::send) without descriptors and with [`WRITE_TIMEOUT`], logging a
    /// failure at debug: for messages whose loss the worker's life already copes with.
    pub(super) async fn send_line(&self, line: &str) {
        match self.send(line, &[], WRITE_TIMEOUT).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => tracing::debug!("ipc send timed out"),
            Err(e) => tracing::debug!(error = %e, "ipc send failed"),
        }
    }
}

/// The first 200 characters of an IPC line, for logs.
pub(super) fn truncate(line: &str) -> &str {
    match line.char_indices().nth(200) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_is_char_safe() {
        let long = "é".repeat(300);
        assert_eq!(truncate(&long).chars().count(), 200);
        assert_eq!(truncate("short"), "short");
    }
}
