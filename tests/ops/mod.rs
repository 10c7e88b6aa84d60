//! Operations (issues 9 item 7 and 14): the admin endpoint's limits, its mutations, the
//! operator subcommands (`health`, `status`, `scale`, `reload`), the config file, scaling
//! signals and the privilege drop, each against the real binary.

mod admin;

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
