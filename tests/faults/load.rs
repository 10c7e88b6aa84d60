//! The load client: threads that each open a new TCP connection per request, send one
//! `GET` with `Connection: close`, read to EOF and record how it went, with the start and end
//! instants, so that a scenario can classify every failure against the moments it broke
//! something (a kill, a `SIGSTOP`, a reload).
//!
//! Every loop is bounded three ways: a stop flag, a count per thread and a deadline.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How one request over a new connection ended, from the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A whole `200` response, then EOF.
    Ok,
    /// `connect()` was refused: nothing listened on the client port.
    Refused,
    /// `connect()`, a write or a read took longer than the client's timeout.
    Timeout,
    /// The connection was reset (`ECONNRESET`, `EPIPE`) at any step.
    Reset,
    /// EOF before a single byte of response.
    Empty,
    /// EOF after part of a response (headers cut, or a body shorter than its length).
    Short,
    /// A whole response whose status is not 200.
    Status,
    /// Any other error.
    Other,
}

impl Outcome {
    /// The name used in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Reset => "reset",
            Outcome::Empty => "empty",
            Outcome::Short => "short",
            Outcome::Status => "status",
            Outcome::Other => "other",
        }
    }
}

/// One request over one new connection.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Just before `connect()`.
    pub start: Instant,
    /// When the outcome was known.
    pub end: Instant,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether the whole request had been written (to the master) when it ended.
    pub sent: bool,
}

impl Attempt {
    /// Whether the attempt was open at some moment of `[from, to]`.
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.start <= to && self.end >= from
    }
}

/// The request every load thread sends.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// One request over a new connection to `addr`, `timeout` per step.
pub fn request(addr: SocketAddr, request: &[u8], timeout: Duration) -> Attempt {
    let start = Instant::now();
    let mut sent = false;
    let outcome = exchange(addr, request, timeout, &mut sent);
    Attempt {
        start,
        end: Instant::now(),
        outcome,
        sent,
    }
}

fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration, sent: &mut bool) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
    {
        return Outcome::Other;
    }
    if let Err(e) = stream.write_all(request) {
        return classify(&e);
    }
    *sent = true;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => judge(&raw),
        // A reset after a whole response (the server closed with our bytes unread) still
        // delivered the response.
        Err(_) if judge(&raw) == Outcome::Ok => Outcome::Ok,
        Err(e) => classify(&e),
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Outcome::Reset,
        _ => Outcome::Other,
    }
}

/// Whether `raw` is one whole HTTP/1.1 response with status 200.
fn judge(raw: &[u8]) -> Outcome {
    if raw.is_empty() {
        return Outcome::Empty;
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Short;
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Outcome::Short;
    };
    for header in lines {
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if body.len() >= n => {}
                _ => return Outcome::Short,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
            && !body.ends_with(b"0\r\n\r\n")
        {
            return Outcome::Short;
        }
    }
    if status == 200 {
        Outcome::Ok
    } else {
        Outcome::Status
    }
}

/// How a load runs.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Client threads, each with one connection at a time.
    pub threads: usize,
    /// Pause after each request of one thread: the pacing of the load (it keeps CPU use and
    /// the host's TIME_WAIT table modest).
    pub pace: Duration,
    /// Timeout of each step (connect, write, read) of one request.
    pub timeout: Duration,
    /// Most requests one thread makes.
    pub max_per_thread: usize,
    /// The load stops by itself this long after it started, whatever happens.
    pub limit: Duration,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            threads: 4,
            pace: Duration::from_millis(2),
            timeout: Duration::from_secs(5),
            max_per_thread: 20_000,
            limit: Duration::from_secs(60),
        }
    }
}

/// A running load; [`finish`](Load::finish) stops it and returns what happened. Dropping it
/// (a failed test) only raises the stop flag: each thread ends after its current request.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Attempt>>>,
}

impl Load {
    /// Starts `spec.threads` clients of `addr`.
    pub fn start(addr: SocketAddr, spec: Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + spec.limit;
        let threads = (0..spec.threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut attempts = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && attempts.len() < spec.max_per_thread
                        && Instant::now() < deadline
                    {
                        attempts.push(request(addr, REQUEST, spec.timeout));
                        if !spec.pace.is_zero() {
                            thread::sleep(spec.pace);
                        }
                    }
                    attempts
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients and returns every attempt, in start order.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until every client has reached its count or the time limit; returns every
    /// attempt, in start order.
    pub fn join(mut self) -> Report {
        let mut attempts: Vec<Attempt> = std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().expect("a load thread panicked"))
            .collect();
        attempts.sort_by_key(|a| a.start);
        Report { attempts }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every attempt of a finished load.
#[derive(Debug, Default)]
pub struct Report {
    /// In start order.
    pub attempts: Vec<Attempt>,
}

impl Report {
    /// How many requests were made.
    pub fn len(&self) -> usize {
        self.attempts.len()
    }

    /// The attempts that did not end `Ok`.
    pub fn failures(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| a.outcome != Outcome::Ok)
    }

    /// Failed attempts by kind.
    pub fn failed_kinds(&self) -> Kinds {
        Kinds::of(self.failures())
    }
}

/// Counts of outcomes by kind, printed as `reset:2,empty:1` (or `none`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Kinds(pub BTreeMap<Outcome, usize>);

impl Kinds {
    /// Counts `attempts` by outcome.
    pub fn of<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> Kinds {
        let mut map = BTreeMap::new();
        for a in attempts {
            *map.entry(a.outcome).or_default() += 1;
        }
        Kinds(map)
    }

    /// The total.
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }
}

impl fmt::Display for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, n)| format!("{}:{n}", k.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_judged_whole_or_short() {
        assert_eq!(judge(b""), Outcome::Empty);
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\n"), Outcome::Short);
        assert_eq!(
            judge(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab"),
            Outcome::Short
        );
        assert_eq!(
            judge(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"),
            Outcome::Ok
        );
        assert_eq!(
            judge(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"),
            Outcome::Status
        );
    }
}
