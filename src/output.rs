//! Worker stdout and stderr in `prefix` mode: each line is written whole to the master's
//! stderr, tagged with the worker's slot and pid, so lines of different workers never
//! interleave mid-line. The last lines of stderr are kept ([`Tail`]) to explain a worker
//! that never became ready: [`Output::explain`] picks the line that says why ([`pick`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::cli::WorkerOutput;

/// A longer line is written in pieces of this size, each prefixed, so one runaway line
/// cannot make the master buffer without bound.
const MAX_OUTPUT_LINE: usize = 16 * 1024;
/// Lines of stderr kept per worker: enough for a Node or Python error with its stack trace
/// (the line that explains it comes before the frames and Node's version banner).
const TAIL_LINES: usize = 40;
/// Characters kept of each of those lines: an explanation, not a copy of the output.
const TAIL_LINE_CHARS: usize = 500;

/// After a worker is reaped, how long its output may take to reach EOF: the relay may still
/// be copying its last lines, or a process it started may write a last one on the same pipe.
/// Bounded, since such a process may keep the pipe open for good.
const EOF_WAIT: Duration = Duration::from_millis(250);

/// A worker's output, as `--worker-output` says: relayed line by line (`prefix`), with the
/// last lines of stderr kept to explain a failure.
#[derive(Debug)]
pub struct Output {
    mode: WorkerOutput,
    /// The stderr relay, to wait for its EOF after an unexpected exit.
    relay: Option<JoinHandle<()>>,
    tail: Arc<Tail>,
    /// Duplicates of the read ends of the stdout and stderr pipes (`prefix` mode), kept as
    /// long as the worker's instance lives: an in-place upgrade passes them to the next
    /// master image (see `crate::upgrade`), and a relay that reached EOF has closed its own
    /// copy, whose number could be reused meanwhile.
    carried: [Option<OwnedFd>; 2],
}

impl Output {
    /// Starts relaying the child's piped stdout and stderr (`prefix` mode; in the other
    /// modes they are not pipes).
    pub fn start(child: &mut Child, slot: usize, pid: u32, mode: WorkerOutput) -> Self {
        let mut out = Self::new(mode);
        if mode == WorkerOutput::Prefix {
            if let Some(stdout) = child.stdout.take() {
                out.carried[0] = dup(stdout.as_fd());
                tokio::spawn(relay_lines(stdout, slot, pid, "stdout", None));
            }
            if let Some(stderr) = child.stderr.take() {
                out.carried[1] = dup(stderr.as_fd());
                out.relay_stderr(stderr, slot, pid);
            }
        }
        out
    }

    /// Relays the output pipes of a worker adopted after an in-place upgrade: the read ends
    /// the previous master image passed on (`None` where there was none).
    pub fn adopt(pipes: [Option<OwnedFd>; 2], slot: usize, pid: u32, mode: WorkerOutput) -> Self {
        use tokio::net::unix::pipe::Receiver;
        let mut out = Self::new(mode);
        let [stdout, stderr] = pipes;
        if let Some(fd) = stdout {
            out.carried[0] = dup(fd.as_fd());
            match Receiver::from_owned_fd(fd) {
                Ok(r) => drop(tokio::spawn(relay_lines(r, slot, pid, "stdout", None))),
                Err(e) => {
                    tracing::warn!(slot, pid, error = %e, "could not relay the adopted worker's stdout")
                }
            }
        }
        if let Some(fd) = stderr {
            out.carried[1] = dup(fd.as_fd());
            match Receiver::from_owned_fd(fd) {
                Ok(r) => out.relay_stderr(r, slot, pid),
                Err(e) => {
                    tracing::warn!(slot, pid, error = %e, "could not relay the adopted worker's stderr")
                }
            }
        }
        out
    }

    fn new(mode: WorkerOutput) -> Self {
        Self {
            mode,
            relay: None,
            tail: Arc::new(Tail::default()),
            carried: [None, None],
        }
    }

    fn relay_stderr<R: AsyncRead + Unpin + Send + 'static>(&mut self, r: R, slot: usize, pid: u32) {
        let tail = Some(Arc::clone(&self.tail));
        self.relay = Some(tokio::spawn(relay_lines(r, slot, pid, "stderr", tail)));
    }

    /// The pipes' read ends to pass on at an upgrade: `[stdout, stderr]`.
    pub fn carried_fds(&self) -> [Option<RawFd>; 2] {
        [0, 1].map(|i| self.carried[i].as_ref().map(AsRawFd::as_raw_fd))
    }

    /// Waits (at most [`EOF_WAIT`]) for the end of the worker's stderr, so that its last
    /// lines are in the tail. Call once the worker is reaped and its exit was unexpected.
    pub async fn settle(&mut self) {
        if let Some(relay) = self.relay.as_mut() {
            if tokio::time::timeout(EOF_WAIT, relay).await.is_ok() {
                self.relay = None;
            }
        }
    }

    /// The line of stderr that explains a failure, if output is captured and there is one.
    pub fn last_error(&self) -> Option<String> {
        let lines = self.tail.0.lock().unwrap_or_else(|p| p.into_inner());
        pick(lines.iter().map(String::as_str)).map(str::to_owned)
    }

    /// What to say about stderr when a worker failed: [`last_error`](Self::last_error), or
    /// why there is none to show.
    pub fn explain(&self) -> String {
        match self.mode {
            WorkerOutput::Ignore => "(not captured: --worker-output ignore)".to_owned(),
            WorkerOutput::Inherit => {
                "(not captured: --worker-output inherit; see the worker's own output)".to_owned()
            }
            WorkerOutput::Prefix => self
                .last_error()
                .unwrap_or_else(|| "(nothing on stderr)".to_owned()),
        }
    }
}

/// A close-on-exec duplicate of `fd` (`None`, logged, if the fd table is full).
fn dup(fd: BorrowedFd<'_>) -> Option<OwnedFd> {
    fd.try_clone_to_owned()
        .inspect_err(
            |e| tracing::warn!(error = %e, "could not keep a worker's output pipe for an upgrade"),
        )
        .ok()
}

/// The last [`TAIL_LINES`] lines of one worker's stderr.
#[derive(Debug, Default)]
pub struct Tail(Mutex<VecDeque<String>>);

impl Tail {
    fn push(&self, line: &str) {
        let line = match line.char_indices().nth(TAIL_LINE_CHARS) {
            Some((i, _)) => &line[..i],
            None => line,
        };
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }
}

/// The line of a failed program's stderr that says why: the last one that looks like an
/// error (`SyntaxError: …`, `Error: listen EADDRINUSE …`, `fatal: …`, a panic), else the last
/// one that is not noise (blank lines, stack frames, `^^^` markers, Node's `Node.js v20`
/// banner, which Node prints after the error).
pub fn pick<'a>(lines: impl DoubleEndedIterator<Item = &'a str> + Clone) -> Option<&'a str> {
    let meaningful = lines.map(str::trim).filter(|l| !is_noise(l));
    meaningful
        .clone()
        .rev()
        .find(|l| looks_like_error(l))
        .or_else(|| meaningful.clone().next_back())
}

fn is_noise(line: &str) -> bool {
    line.is_empty()
        || line.starts_with("at ")
        || line.chars().all(|c| matches!(c, '^' | '~' | ' '))
        || (line.starts_with("Node.js v") && !line.contains(' '))
        || line.starts_with("note: run with `RUST_BACKTRACE")
}

fn looks_like_error(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    if lower.starts_with("error") || lower.starts_with("fatal") || lower.contains(" panicked at ") {
        return true;
    }
    if lower.contains(": error:") || lower.contains(": fatal:") {
        return true;
    }
    // `SyntaxError: …`, `ModuleNotFoundError: …`, `java.lang.IllegalStateException: …`,
    // and Node's `Uncaught TypeError: …`.
    let head = line.split(':').next().unwrap_or("");
    let head = head.strip_prefix("Uncaught ").unwrap_or(head);
    !head.contains(' ') && (head.ends_with("Error") || head.ends_with("Exception"))
}

/// Copies `stream` line by line to the master's stderr until EOF. `tail` keeps the last
/// lines. Returns at EOF: the worker and everything it started closed the stream.
async fn relay_lines<R: AsyncRead + Unpin>(
    stream: R,
    slot: usize,
    pid: u32,
    name: &'static str,
    tail: Option<Arc<Tail>>,
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
        if let Some(tail) = &tail {
            tail.push(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick_of(text: &str) -> Option<&str> {
        pick(text.lines())
    }

    #[test]
    fn node_syntax_error_over_its_banner() {
        let node = "/tmp/w.js:3\n  res.end('x';\n          ^^^\n\nSyntaxError: missing ) after argument list\n    at wrapSafe (node:internal/modules/cjs/loader:1378:20)\n    at node:internal/main/run_main_module:28:49\n\nNode.js v20.20.2\n";
        assert_eq!(
            pick_of(node),
            Some("SyntaxError: missing ) after argument list")
        );
    }

    #[test]
    fn node_unhandled_error_event() {
        let node = "node:events:497\n      throw er; // Unhandled 'error' event\n      ^\n\nError: listen EADDRINUSE: address already in use :::8080\n    at Server.setupListenHandle [as _listen2] (node:net:1872:16)\nEmitted 'error' event on Server instance at:\n    at emitErrorNT (node:net:1851:8) {\n  code: 'EADDRINUSE',\n}\n\nNode.js v20.20.2\n";
        assert_eq!(
            pick_of(node),
            Some("Error: listen EADDRINUSE: address already in use :::8080")
        );
    }

    #[test]
    fn python_traceback_rust_panic_and_plain_lines() {
        let py = "Traceback (most recent call last):\n  File \"w.py\", line 1, in <module>\n    import nosuch\nModuleNotFoundError: No module named 'nosuch'\n";
        assert_eq!(
            pick_of(py),
            Some("ModuleNotFoundError: No module named 'nosuch'")
        );
        let rust = "\nthread 'main' panicked at src/main.rs:2:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            pick_of(rust),
            Some("thread 'main' panicked at src/main.rs:2:5:")
        );
        assert_eq!(
            pick_of("starting\nsh: 1: foo: not found\n"),
            Some("sh: 1: foo: not found")
        );
        assert_eq!(pick_of("\n\n"), None);
        assert_eq!(pick_of(""), None);
    }

    fn output(mode: WorkerOutput) -> Output {
        Output::new(mode)
    }

    #[test]
    fn tail_keeps_the_last_lines_and_says_when_output_is_not_captured() {
        let out = output(WorkerOutput::Prefix);
        assert_eq!(out.explain(), "(nothing on stderr)");
        for i in 0..100 {
            out.tail.push(&format!("line {i}"));
        }
        out.tail.push(&"x".repeat(10_000));
        assert_eq!(out.tail.0.lock().unwrap().len(), TAIL_LINES);
        assert_eq!(out.explain().len(), TAIL_LINE_CHARS);
        assert!(output(WorkerOutput::Ignore)
            .explain()
            .contains("--worker-output ignore"));
        assert!(output(WorkerOutput::Inherit)
            .explain()
            .contains("--worker-output inherit"));
    }
}
