//! Bounded newline framing for the IPC channel.
//!
//! Unlike `tokio_util::codec::LinesCodec`, a line that is too long or not UTF-8 does not end
//! the stream: it becomes one [`LineError`] item and the reader carries on at the next
//! newline. A misbehaving worker costs the master one log line, not its channel.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Why one line was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line exceeded the maximum length; its bytes were discarded up to the next newline.
    #[error("line longer than {max} bytes")]
    TooLong {
        /// The limit in force.
        max: usize,
    },
    /// The line is not valid UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
}

/// Splits a byte stream into `\n`-terminated lines of at most `max` bytes (a trailing `\r`
/// is stripped, so `\r\n` peers work too).
#[derive(Debug)]
pub struct LineDecoder {
    max: usize,
    /// True while skipping the rest of an over-long line.
    discarding: bool,
    /// How far `buf` has been searched for a newline, so a slow writer costs O(n), not O(n²).
    searched: usize,
    /// Wire length of the last line returned, newline (and `\r`) included.
    last_len: usize,
}

impl LineDecoder {
    /// A decoder that accepts lines of up to `max` bytes, newline excluded.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            discarding: false,
            searched: 0,
            last_len: 0,
        }
    }

    /// How many bytes the last line returned as `Ok` took on the wire, its `\r\n` or `\n`
    /// included. A reader that knows how many bytes it has consumed can tell from this where
    /// that line started, which [`crate::fdpass`] needs to match descriptors to lines.
    pub fn last_line_len(&self) -> usize {
        self.last_len
    }
}

impl Decoder for LineDecoder {
    type Item = Result<String, LineError>;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        loop {
            let newline = buf[self.searched..].iter().position(|&b| b == b'\n');
            match (self.discarding, newline) {
                (true, Some(i)) => {
                    buf.advance(self.searched + i + 1);
                    self.searched = 0;
                    self.discarding = false;
                }
                (true, None) => {
                    buf.clear();
                    self.searched = 0;
                    return Ok(None);
                }
                (false, Some(i)) => {
                    let end = self.searched + i;
                    self.searched = 0;
                    if end > self.max {
                        buf.advance(end + 1);
                        return Ok(Some(Err(LineError::TooLong { max: self.max })));
                    }
                    self.last_len = end + 1;
                    let line = buf.split_to(end + 1);
                    let mut line = &line[..end];
                    if let [rest @ .., b'\r'] = line {
                        line = rest;
                    }
                    return Ok(Some(
                        std::str::from_utf8(line)
                            .map(str::to_owned)
                            .map_err(|_| LineError::NotUtf8),
                    ));
                }
                (false, None) => {
                    if buf.len() > self.max {
                        buf.clear();
                        self.searched = 0;
                        self.discarding = true;
                        return Ok(Some(Err(LineError::TooLong { max: self.max })));
                    }
                    self.searched = buf.len();
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(
        dec: &mut LineDecoder,
        buf: &mut BytesMut,
        bytes: &[u8],
    ) -> Vec<Result<String, LineError>> {
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(item) = dec.decode(buf).expect("decode never fails on I/O") {
            out.push(item);
        }
        out
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut dec = LineDecoder::new(16);
        let mut buf = BytesMut::new();
        assert!(feed(&mut dec, &mut buf, b"hel").is_empty());
        assert_eq!(
            feed(&mut dec, &mut buf, b"lo\r\nworld\n"),
            vec![Ok("hello".into()), Ok("world".into())]
        );
    }

    #[test]
    fn over_long_line_is_skipped_and_reading_goes_on() {
        let mut dec = LineDecoder::new(4);
        let mut buf = BytesMut::new();
        assert_eq!(
            feed(&mut dec, &mut buf, b"abcdefgh"),
            vec![Err(LineError::TooLong { max: 4 })]
        );
        assert!(feed(&mut dec, &mut buf, b"ijkl").is_empty());
        assert_eq!(feed(&mut dec, &mut buf, b"mn\nok\n"), vec![Ok("ok".into())]);
        assert_eq!(
            feed(&mut dec, &mut buf, b"toolong\nab\n"),
            vec![Err(LineError::TooLong { max: 4 }), Ok("ab".into())]
        );
        assert_eq!(feed(&mut dec, &mut buf, b"abcd\n"), vec![Ok("abcd".into())]);
    }

    #[test]
    fn last_line_len_counts_the_line_ending() {
        let mut dec = LineDecoder::new(16);
        let mut buf = BytesMut::from(&b"ab\r\ncde\n"[..]);
        assert_eq!(dec.decode(&mut buf).ok().flatten(), Some(Ok("ab".into())));
        assert_eq!(dec.last_line_len(), 4);
        assert_eq!(dec.decode(&mut buf).ok().flatten(), Some(Ok("cde".into())));
        assert_eq!(dec.last_line_len(), 4);
    }

    #[test]
    fn invalid_utf8_is_one_bad_line() {
        let mut dec = LineDecoder::new(16);
        let mut buf = BytesMut::new();
        assert_eq!(
            feed(&mut dec, &mut buf, b"\xff\xfe\nfine\n"),
            vec![Err(LineError::NotUtf8), Ok("fine".into())]
        );
    }
}
