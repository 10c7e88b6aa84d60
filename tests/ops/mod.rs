//! Operations (issues 9 item 7 and 14): the admin endpoint's limits, its mutations, the
//! operator subcommands (`health`, `status`, `scale`, `reload`, `top`), the config
//! file, scaling
//! signals and the privilege drop, each against the real binary.

mod admin;
mod client;
mod config;
mod privilege;
mod reread;
mod scale;
mod top;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::helper::*;

/// The address from `admin endpoint listening addr=...`.
fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", STARTUP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
}

/// One raw HTTP exchange: writes `request` as is, reads to EOF, returns the status, the
/// header block and the body.
fn exchange(addr: SocketAddr, request: &str) -> io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{head:?}")))?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// Whether the peer has closed `stream` (EOF or reset), without blocking; any bytes it sent
/// before closing are read and dropped.
fn peer_closed(stream: &mut TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// What a client subcommand did.
#[derive(Debug)]
pub(crate) struct Run {
    /// Its exit code (`None`: killed by a signal).
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `balancer ARGS...` (an operator subcommand) to completion, killing it if it takes
/// longer than `CLIENT_DEADLINE`.
pub(crate) fn run_client(args: &[&str]) -> Run {
    use std::process::{Command, Stdio};
    /// Far above the client's own 5 s timeout: only a hung client reaches it.
    const CLIENT_DEADLINE: Duration = Duration::from_secs(20);
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("BALANCER_ADMIN")
        .env_remove("BALANCER_ADMIN_TOKEN")
        .env_remove("BALANCER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the balancer client");
    let (mut out, mut err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut status = None;
    let done = wait_until(CLIENT_DEADLINE, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("balancer {args:?} still running after {CLIENT_DEADLINE:?}");
    }
    Run {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Asserts `run` failed with exit code 1 and exactly one `balancer: error: ...` line that
/// contains `expected`.
pub(crate) fn assert_one_error_line(run: &Run, expected: &str) {
    assert_eq!(run.code, Some(1), "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line: {run:?}");
    assert!(
        lines[0].starts_with("balancer: error: ") && lines[0].contains(expected),
        "expected `balancer: error: ...{expected}...`: {run:?}"
    );
}
