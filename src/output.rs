//! Worker stdout and stderr in `prefix` mode: each line is written whole to the master's
//! stderr, tagged with the worker's slot and pid, so lines of different workers never
//! interleave mid-line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// A longer line is written in pieces of this size, each prefixed, so one runaway line
/// cannot make the master buffer without bound.
const MAX_OUTPUT_LINE: usize = 16 * 1024;

/// The last line a worker wrote to stderr, kept to explain a worker that never became ready.
pub type LastLine = Arc<Mutex<Option<String>>>;

/// Copies `stream` line by line to the master's stderr until EOF. `last` receives each line.
pub async fn relay<R: AsyncRead + Unpin>(
    stream: R,
    slot: usize,
    pid: u32,
    name: &'static str,
    last: Option<LastLine>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_OUTPUT_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let text = String::from_utf8_lossy(&buf);
        let line = format!("[worker {slot} pid {pid} {name}] {text}\n");
        // One write of the whole line: stderr is unbuffered, so lines stay whole. A closed
        // stderr (EPIPE) must not take the master down; the line is lost, nothing else.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if let Some(last) = &last {
            if let Ok(mut l) = last.lock() {
                *l = Some(text.into_owned());
            }
        }
    }
}
