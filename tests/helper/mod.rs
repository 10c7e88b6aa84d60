//! Drives the real `balancer` binary for the integration tests: starts it on a free port,
//! reads its log as it is written, talks HTTP/1.1 to it, inspects processes in `/proc`, and
//! kills everything it started when a [`Balancer`] is dropped (also when a test panics).
//!
//! Waiting is always "until a condition holds, or a deadline passes": log lines arrive
//! through a `Condvar`, process states are polled under a deadline. No bare sleeps.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The unprivileged user (and group) `nobody`, for tests that need to run without root.
pub const NOBODY: u32 = 65534;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_balancer");

/// How long the master may take to log `listening`: it binds before it spawns anything, so
/// this is only process start-up of a debug build on a busy 2-core machine.
pub const STARTUP: Duration = Duration::from_secs(10);
/// Default timeout of one HTTP exchange through the proxy.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one TCP connect on loopback.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two checks of a polled condition (process state, exit status).
const POLL: Duration = Duration::from_millis(10);
/// After the master exits, how long its stderr may take to reach EOF (the reader thread
/// drains what is left in the pipe).
const EOF_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variables that would change what the binary does if the test runner happened
/// to have them set.
const SCRUBBED_ENV: [&str; 6] = [
    "BALANCER_LOG",
    "BALANCER_LISTEN",
    "BALANCER_CPUS",
    "BALANCER_IPC_FD",
    "BALANCER_WORKER_ID",
    "RUST_LOG",
];

// ---------------------------------------------------------------------------------------------
// The master process.

/// A running `balancer` master. Dropping it SIGKILLs the master and every worker it was seen
/// to spawn that is still alive, then reaps the master.
pub struct Balancer {
    child: Child,
    pid: u32,
    /// The master's stderr: its log, plus the relayed worker output.
    log: Arc<Lines>,
    /// The master's stdout (normally empty; read so that the pipe can never fill up).
    stdout: Arc<Lines>,
}

impl Balancer {
    /// Starts `balancer --listen 127.0.0.1:0 ARGS...`.
    pub fn start(args: &[&str]) -> Balancer {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Balancer::start_exact(&all)
    }

    /// Starts `balancer ARGS...` with exactly these arguments (no `--listen` added).
    pub fn start_exact<S: AsRef<OsStr>>(args: &[S]) -> Balancer {
        Balancer::start_exact_as(args, None)
    }

    /// [`start_exact`](Self::start_exact), as user and group `uid` if given (the test must
    /// be root to change them): to see what an unprivileged master does where tests run as
    /// root.
    pub fn start_exact_as<S: AsRef<OsStr>>(args: &[S], uid: Option<u32>) -> Balancer {
        let mut cmd = Command::new(BIN);
        if let Some(uid) = uid {
            // std drops the supplementary groups too (setgroups) before setuid.
            cmd.uid(uid).gid(uid);
        }
        cmd.args(args);
        Balancer::spawn(cmd)
    }

    /// Starts `PROGRAM ARGS...`, where the program is a copy of the binary under test (for
    /// tests that replace the file on disk, as an in-place upgrade does).
    pub fn start_program<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Balancer {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Balancer::spawn(cmd)
    }

    /// Starts `WRAPPER... balancer ARGS...`, for a wrapper that execs the binary in its own
    /// process (such as `systemd-socket-activate`), so the pid is the master's all the same.
    pub fn start_wrapped<S: AsRef<OsStr>>(wrapper: &[S], args: &[S]) -> Balancer {
        let (program, wrapper_args) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = Command::new(program);
        cmd.args(wrapper_args).arg(BIN).args(args);
        Balancer::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Balancer {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        // SAFETY: runs in the child between fork and exec; prctl is a plain system call (no
        // allocation, no locks), and the closure captures nothing. It is only a safety net:
        // if the test process dies without running `Drop`, the master (and through its own
        // PR_SET_PDEATHSIG, its workers) die with the thread that spawned it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawning the balancer binary");
        let pid = child.id();
        let log = Arc::new(Lines::default());
        let stdout = Arc::new(Lines::default());
        let err = child.stderr.take().expect("stderr is piped");
        let out = child.stdout.take().expect("stdout is piped");
        {
            let log = Arc::clone(&log);
            thread::spawn(move || read_lines(err, &log, Some(pid)));
        }
        {
            let stdout = Arc::clone(&stdout);
            thread::spawn(move || read_lines(out, &stdout, None));
        }
        Balancer {
            child,
            pid,
            log,
            stdout,
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The address from the `listening addr=...` line (waits for it).
    pub fn addr(&self) -> SocketAddr {
        let (_, line) = self.expect_line(0, "the `listening` line", STARTUP, |l| {
            is_event(l, "listening")
        });
        field(&line, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line:?}"))
    }

    /// Waits until some line satisfies `pred`; returns it, or `None` after `timeout`.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.wait_for_line_from(0, timeout, pred).map(|(_, l)| l)
    }

    /// Like [`wait_for_line`](Self::wait_for_line), looking only at lines with index
    /// `from` or later. Returns the line's index too, for a later `from`.
    pub fn wait_for_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        self.log.wait_for(from, Instant::now() + timeout, pred)
    }

    /// Like [`wait_for_line_from`](Self::wait_for_line_from), but panics with the whole log
    /// when the line does not come. `what` names the line for the panic message.
    pub fn expect_line(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        self.wait_for_line_from(from, timeout, pred)
            .unwrap_or_else(|| panic!("no {what} within {timeout:?}; log so far:\n{}", self.dump()))
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().lines.clone()
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().lines.clone()
    }

    /// The log so far, one line each, for panic messages.
    pub fn dump(&self) -> String {
        let state = self.log.lock();
        let mut out = String::new();
        for l in &state.lines {
            out.push_str("    ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Pids of every worker the master logged as spawned, in order.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.log.lock().workers.iter().map(|w| w.pid).collect()
    }

    /// Sends `sig` to the master, unless it has already been reaped (then its pid may belong
    /// to someone else).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.is_running() {
            send_signal(self.pid, sig);
        }
    }

    /// Whether the master has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the master to exit; then waits for the end of its stderr, so
    /// that [`lines`](Self::lines) is complete. `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => return None,
                Err(e) => panic!("waiting for the master: {e}"),
            }
        };
        assert!(
            self.log.wait_eof(Instant::now() + EOF_TIMEOUT),
            "the master exited but its stderr stayed open"
        );
        Some(status)
    }

    /// Like [`wait_exit`](Self::wait_exit), but panics with the log on timeout.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "the master did not exit within {timeout:?}; log so far:\n{}",
                self.dump()
            ),
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // Kill by pid only while unreaped: a reaped pid may already belong to someone else.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        // Let the reader record any `worker spawned` line still in the pipe.
        self.log.wait_eof(Instant::now() + EOF_TIMEOUT);
        let workers = std::mem::take(&mut self.log.lock().workers);
        for w in workers {
            // Only the very process we saw start: same pid *and* same start time.
            if w.is_still_running() {
                // The worker leads its own process group: take its descendants with it.
                send_signal_group(w.pid, libc::SIGKILL);
                send_signal(w.pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// A worker seen in a `worker spawned` line, identified beyond its pid so that `Drop` never
/// signals a process that merely reuses the number.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    pid: u32,
    /// `starttime` from `/proc/<pid>/stat` while the master was its parent; `None` if it was
    /// already gone (or not the master's child) when the line was read.
    start_time: Option<u64>,
}

impl Tracked {
    fn is_still_running(&self) -> bool {
        match (self.start_time, proc_stat(self.pid)) {
            (Some(start), Some(now)) => now.start_time == start && now.is_alive(),
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Collected output lines.

#[derive(Debug, Default)]
struct LineState {
    lines: Vec<String>,
    /// Whether the stream has ended.
    eof: bool,
    /// Workers seen in `worker spawned` lines (stderr only).
    workers: Vec<Tracked>,
}

/// Lines of one output stream, as they arrive.
#[derive(Debug, Default)]
struct Lines {
    state: Mutex<LineState>,
    changed: Condvar,
}

impl Lines {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        // A panicking test thread must not hide the log from `Drop` or other threads.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for(
        &self,
        from: usize,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let mut state = self.lock();
        let mut checked = from;
        loop {
            if let Some((i, l)) = state
                .lines
                .iter()
                .enumerate()
                .skip(checked)
                .find(|(_, l)| pred(l))
            {
                return Some((i, l.clone()));
            }
            checked = checked.max(state.lines.len());
            let now = Instant::now();
            if state.eof || now >= deadline {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn wait_eof(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while !state.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Reads `stream` line by line into `into` until EOF. With `master = Some(pid)`, it also
/// records the workers of `worker spawned` lines, at once, while they are still the
/// master's children.
fn read_lines(stream: impl Read, into: &Lines, master: Option<u32>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        let tracked = master.and_then(|master| {
            if !is_event(&line, "worker spawned") {
                return None;
            }
            let pid = field_u32(&line, "pid")?;
            let start_time = proc_stat(pid)
                .filter(|s| s.ppid == master)
                .map(|s| s.start_time);
            Some(Tracked { pid, start_time })
        });
        let mut state = into.lock();
        state.lines.push(line);
        state.workers.extend(tracked);
        drop(state);
        into.changed.notify_all();
    }
    into.lock().eof = true;
    into.changed.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Log lines: `2026-11-27T10:08:45.648072Z  INFO worker spawned slot=0 pid=5631`.

/// The level and the rest (message, then fields) of a log line; `None` for relayed worker
/// output and anything else that is not a log event.
pub fn event(line: &str) -> Option<(&str, &str)> {
    let (timestamp, rest) = line.split_once(' ')?;
    if !timestamp.ends_with('Z') || !timestamp.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let rest = rest.trim_start();
    let (level, rest) = rest.split_once(' ')?;
    matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR").then_some((level, rest))
}

/// Whether `line` is a log event whose message is `message` (followed by fields, or not).
pub fn is_event(line: &str, message: &str) -> bool {
    event(line).is_some_and(|(_, rest)| {
        rest.strip_prefix(message)
            .is_some_and(|after| after.is_empty() || after.starts_with(' '))
    })
}

/// The value of field `name` in a log line: up to the next space, or the quoted string.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (_, rest) = event(line)?;
    let key = format!(" {name}=");
    let start = rest.find(&key)? + key.len();
    let value = &rest[start..];
    if let Some(quoted) = value.strip_prefix('"') {
        return quoted.find('"').map(|end| &quoted[..end]);
    }
    Some(value.split(' ').next().unwrap_or(value))
}

/// [`field`] as a number.
pub fn field_u32(line: &str, name: &str) -> Option<u32> {
    field(line, name)?.parse().ok()
}

/// A `std::time::Duration` printed with `{:?}` (`104.5ms`, `1.2s`, `800µs`).
pub fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// Asserts that the master's log has no panic text in it.
pub fn assert_no_panic(b: &Balancer) {
    assert!(
        !b.lines().iter().any(|l| looks_like_panic(l)),
        "panic text in the log:\n{}",
        b.dump()
    );
}

/// Whether a log line has the text a panic leaves on stderr; a user-facing error must never
/// contain it.
pub fn looks_like_panic(line: &str) -> bool {
    line.contains("panicked") || line.contains("RUST_BACKTRACE")
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// The parts of `/proc/<pid>/stat` the tests need.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time since boot, in clock ticks: with the pid, identifies one process.
    pub start_time: u64,
}

impl ProcStat {
    /// Not a zombie (or dead) yet.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    // Field N of proc(5) is fields[N - 3].
    let num = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        cpu_ticks: num(14)? + num(15)?,
        start_time: num(22)?,
    })
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.is_alive())
}

/// Polls `cond` until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// `kill(pid, sig)`; errors (no such process) are ignored.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill has no memory-safety preconditions; a positive pid names one process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `kill(-pgid, sig)`; errors (no such group) are ignored.
fn send_signal_group(pgid: u32, sig: libc::c_int) {
    let pgid = libc::pid_t::try_from(pgid).expect("pid fits pid_t");
    assert!(pgid > 1, "refusing to signal process group {pgid}");
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// The effective uid of the test process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// `GET path` over a new connection with `Connection: close`; returns status and body.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    get_with_timeout(addr, path, HTTP_TIMEOUT)
}

/// [`get`] with a read/write timeout of `timeout` per operation.
pub fn get_with_timeout(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    get_after(addr, path, timeout, Duration::ZERO)
}

/// [`get`] from a client that lets `hesitate` pass between its connect and its request: a
/// distant or descheduled client, whose connection the server has accepted and which has
/// sent nothing yet. (A sleep that is the client's behaviour, not a wait for a condition.)
pub fn get_hesitant(addr: SocketAddr, path: &str, hesitate: Duration) -> io::Result<(u16, String)> {
    get_after(addr, path, HTTP_TIMEOUT, hesitate)
}

fn get_after(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    hesitate: Duration,
) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    if !hesitate.is_zero() {
        thread::sleep(hesitate);
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// [`get`] that must succeed with 200; returns the body.
pub fn get_ok(addr: SocketAddr, path: &str) -> String {
    match get(addr, path) {
        Ok((200, body)) => body,
        Ok((status, body)) => panic!("GET {path}: status {status}, body {body:?}"),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if raw.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers not UTF-8"))?;
    let body = &raw[split + 4..];
    let mut head_lines = head.split("\r\n");
    let status_line = head_lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut length = None;
    let mut chunked = false;
    for header in head_lines {
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or_else(|| bad("body shorter than content-length"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// The pid in the built-in worker's `GET /` body: `child worker run, at pid: 123, host: h`.
pub fn body_pid(body: &str) -> u32 {
    body.trim_end()
        .strip_prefix("child worker run, at pid: ")
        .and_then(|rest| rest.split_once(", host: "))
        .and_then(|(pid, _host)| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a built-in worker body: {body:?}"))
}

// ---------------------------------------------------------------------------------------------
// Files and external programs.

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `balancer-test-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("balancer-test-{}-{n}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Creates a named pipe at `path`.
pub fn make_fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {path:?}: {}", io::Error::last_os_error());
}

/// Opens the write end of a FIFO once a reader has opened it (a non-blocking open fails
/// with ENXIO until then), waiting at most `timeout`.
pub fn open_fifo_writer(path: &Path, timeout: Duration) -> fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    let opened = wait_until(timeout, || {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => {
                last = Some(Ok(f));
                true
            }
            Err(e) => {
                last = Some(Err(e));
                false
            }
        }
    });
    match last {
        Some(Ok(f)) if opened => f,
        other => panic!("no reader opened {path:?} within {timeout:?}: {other:?}"),
    }
}

/// The real python3 executable (not a pyenv shim, whose extra start-up and exec chain only
/// slow the worker down). Panics if there is none: the tests that call this need it.
pub fn python3() -> &'static Path {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
            (out.status.success() && path.is_file()).then_some(path)
        })
        .as_deref()
        .expect("python3 is needed for this test and was not found in PATH")
}

/// Waits until the log says all `n` workers are ready and the master accepts
/// (`READY_TIMEOUT` at most). The master starts its proxy threads (their runtimes, epoll
/// fds and listener copies) once the first worker is ready, on its main loop: a test that
/// counts the master's descriptors or threads must not begin before that.
pub fn wait_all_ready(b: &Balancer, n: usize) {
    b.expect_line(0, "`all workers ready`", READY_TIMEOUT, |l| {
        is_event(l, "all workers ready") && field(l, "workers") == Some(&n.to_string())
    });
    b.expect_line(0, "the master accepting", READY_TIMEOUT, |l| {
        is_event(l, "a worker is ready: accepting")
            || is_event(l, "an upstream is in rotation: accepting")
    });
}

/// Pids of the workers logged as `worker ready` that are still alive: the ones serving now.
/// (Not simply every spawned pid: on a very busy machine a slow starter can be replaced; and
/// a worker is logged `ready` again when it comes back up on health checks.)
pub fn ready_pids(b: &Balancer) -> Vec<u32> {
    let mut pids: Vec<u32> = Vec::new();
    for pid in b
        .lines()
        .iter()
        .filter(|l| is_event(l, "worker ready"))
        .filter_map(|l| field_u32(l, "pid"))
    {
        if !pids.contains(&pid) && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// How long a test waits for workers to become ready: generous, for a loaded CI machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
