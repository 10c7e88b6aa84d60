//! Issue 15: `--engine epoll`, the tcp proxy on an epoll loop of balancer's own, run as the
//! real binary: forwarding (many connections at once, bulk both ways through full socket
//! buffers), a dead backend skipped, a stalled connect given up (for the next backend, or
//! at once when its client leaves), the idle timeout, the drain at stop, and the flags it
//! refuses. Half-close and close rules: `half_close::*_epoll`. Segments saved per
//! connection (the handshake's last ACK on the first bytes, the FIN on the last ones):
//! counted with `TCP_INFO` on both ends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Echoes each connection's bytes until its EOF, then closes (a thread per connection).
const ECHO: &str = r#"
import threading
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Answers one request after a second, then closes: a request in flight at the stop.
const SLOW: &str = r#"
import threading, time
def answer(c):
    if request(c) is not None:
        say("backend got a request")
        time.sleep(1)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow")
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"#;

/// Reads a request's head (up to its blank line) from `c`: the bytes read, and whether the
/// head is complete (false: EOF or an error came first).
fn read_head(c: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return (head, false),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    (head, true)
}

/// Waits for the master's `upstream backend up` line for `addr` (its first health check
/// passed): from then on it is in rotation.
fn wait_upstream_up(b: &Balancer, addr: std::net::SocketAddr) {
    let want = addr.to_string();
    b.expect_line(
        0,
        &format!("`upstream backend up` for {want}"),
        READY,
        |l| is_event(l, "upstream backend up") && field(l, "addr") == Some(want.as_str()),
    );
}

fn connect(b: &Balancer) -> TcpStream {
    let s = TcpStream::connect(b.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn the_epoll_engine_forwards_many_connections_at_once_and_bulk_both_ways() {
    let (b, _) = start_python_n(2, &["--engine", "epoll", "--admin", "127.0.0.1:0"], ECHO);
    let admin = admin_addr(&b);
    // 200 connections open together, each its own echo.
    let mut conns: Vec<TcpStream> = (0..200).map(|_| connect(&b)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("ping {i:04}").as_bytes()).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut got = [0u8; 9];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("conn {i}: {e}\n{}", b.dump()));
        assert_eq!(&got, format!("ping {i:04}").as_bytes());
    }
    drop(conns);
    // Counted as the tokio path counts them (status and metrics read the same counters).
    let counted = wait_until(READY, || {
        let c = connections(admin);
        c["accepted"].as_u64() >= Some(200) && c["completed"].as_u64() >= Some(200)
    });
    assert!(counted, "{}\n{}", connections(admin), b.dump());
    // 8 MiB up while it comes back: both directions fill their socket buffers, so the
    // engine's held-back bytes and writability wake-ups carry it.
    const BULK: usize = 8 << 20;
    let mut s = connect(&b);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).unwrap();
        // The client's half-close reaches the echo, which then closes.
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(BULK);
    s.read_to_end(&mut got)
        .expect("reading the echo to its EOF");
    writer.join().unwrap();
    assert_eq!(got.len(), BULK, "echoed {} of {BULK} bytes", got.len());
    assert!(
        got.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8),
        "the echo differs"
    );
    assert_no_panic(&b);
}

fn admin_addr(b: &Balancer) -> std::net::SocketAddr {
    let (_, line) = b.expect_line(0, "`admin endpoint listening`", READY, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .expect("admin addr")
}

/// `/status`'s `connections` object (the data path's counters).
fn connections(admin: std::net::SocketAddr) -> serde_json::Value {
    let (_, body) = get_with_timeout(admin, "/status", Duration::from_secs(5)).expect("/status");
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    v["connections"].clone()
}

#[test]
fn the_epoll_engine_holds_max_conns_and_serves_the_next_once_one_closes() {
    let (b, _) = start_python(&["--engine", "epoll", "--max-conns", "2"], ECHO);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(&b)).collect();
    for s in &mut held {
        s.write_all(b"held").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
    }
    // The third waits in the backlog: connected (the kernel's handshake), not served.
    let mut third = connect(&b);
    third.write_all(b"next").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = [0u8; 4];
    match third.read(&mut got) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("a third connection was served past --max-conns 2: {other:?}"),
    }
    drop(held.pop());
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    third
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("not served once a permit was free: {e}\n{}", b.dump()));
    assert_eq!(&got, b"next");
    assert_no_panic(&b);
}

/// A plain HTTP server on a loopback port of its own: answers `live` to each request.
struct Live {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Live {
    fn start() -> Live {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for c in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = c else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let (head, _) = read_head(&mut c);
                if !head.is_empty() {
                    let _ = c.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlive",
                    );
                }
            }
        });
        Live {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_epoll_engine_skips_a_dead_backend() {
    let live = Live::start();
    // Up at its health check (the kernel completes the handshake of a listener that never
    // accepts), then closed: every later connect to it is refused.
    let dying = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = dying.local_addr().unwrap();
    let b = Balancer::start(&[
        "--engine",
        "epoll",
        "--cpus",
        "0",
        "--upstream",
        &dead.to_string(),
        "--upstream",
        &live.addr.to_string(),
        "--health-check",
        "tcp",
        "--health-interval",
        "60s",
        "--health-fall",
        "1000",
    ]);
    for addr in [dead, live.addr] {
        wait_upstream_up(&b, addr);
    }
    drop(dying);
    for i in 0..6 {
        let (status, body) =
            get(b.addr(), "/").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", b.dump()));
        assert_eq!((status, body.as_str()), (200, "live"), "request {i}");
    }
    assert_no_panic(&b);
}

#[test]
fn the_epoll_engine_gives_up_a_stalled_connect_and_tries_the_next_backend() {
    use std::os::fd::AsRawFd;
    let live = Live::start();
    // A listener that never accepts: up at its health checks (the kernel completes their
    // handshakes into its queue), then given the smallest accept queue, so the kernel drops
    // further SYNs and a connect to it stays in progress.
    let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = stalled.local_addr().unwrap();
    let b = Balancer::start(&[
        "--engine",
        "epoll",
        "--cpus",
        "0",
        "--upstream",
        &slow.to_string(),
        "--upstream",
        &live.addr.to_string(),
        "--connect-timeout",
        "300ms",
        "--health-check",
        "tcp",
        "--health-interval",
        "60s",
        "--health-fall",
        "1000",
    ]);
    for addr in [slow, live.addr] {
        wait_upstream_up(&b, addr);
    }
    // SAFETY: the fd is the open listener's; listen(2) again only changes its backlog.
    assert_eq!(unsafe { libc::listen(stalled.as_raw_fd(), 0) }, 0);
    // Fill the queue (the health checks' connections are there already); held open.
    let _fill: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&slow, Duration::from_millis(200)).ok())
        .collect();
    let mut slowest = Duration::ZERO;
    for i in 0..4 {
        let since = Instant::now();
        let (status, body) =
            get(b.addr(), "/").unwrap_or_else(|e| panic!("request {i}: {e}\n{}", b.dump()));
        assert_eq!((status, body.as_str()), (200, "live"), "request {i}");
        slowest = slowest.max(since.elapsed());
    }
    // Round robin sent at least one of the four to the stalled backend first: it waited the
    // connect timeout there, then went on.
    assert!(
        slowest >= Duration::from_millis(250),
        "no request waited for a connect timeout (slowest {slowest:?}): was the queue full?"
    );
    assert_no_panic(&b);
}

/// A client that connects, says nothing and leaves (a FIN, then a reset) while its backend
/// connect is pending: the master drops that connect and the client's socket at once, and
/// counts the client as abandoned, long before the connect timeout.
fn a_client_that_leaves_during_a_stalled_connect_is_dropped_at_once(engine: &str) {
    use crate::faults::procfs::{expect_fds_at_most, fd_count, fd_list, steady_fd_count};
    use std::os::fd::AsRawFd;
    // Up at its health check, then given the smallest accept queue, filled: the kernel
    // drops further SYNs, so the master's connect stays in progress (see
    // the_epoll_engine_gives_up_a_stalled_connect_and_tries_the_next_backend).
    let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = stalled.local_addr().unwrap();
    let b = Balancer::start(&[
        "--engine",
        engine,
        "--cpus",
        "0",
        "--upstream",
        &slow.to_string(),
        "--admin",
        "127.0.0.1:0",
        // Far beyond what the test waits for the master to let go.
        "--connect-timeout",
        "60s",
        "--health-check",
        "tcp",
        "--health-interval",
        "60s",
        "--health-fall",
        "1000",
    ]);
    wait_upstream_up(&b, slow);
    // With no local worker the proxy threads (their runtimes or epoll fds) exist before the
    // `listening` line: the descriptor baseline below holds them.
    let addr = b.addr();
    let admin = admin_addr(&b);
    // SAFETY: the fd is the open listener's; listen(2) again only changes its backlog.
    assert_eq!(unsafe { libc::listen(stalled.as_raw_fd(), 0) }, 0);
    let _fill: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&slow, Duration::from_millis(200)).ok())
        .collect();
    let master = b.pid();
    let baseline = steady_fd_count(master, Duration::from_millis(300));
    for (how, reset) in [("closes", false), ("resets", true)] {
        let client = TcpStream::connect(addr).expect("connect");
        // Accepted, and its backend connect started: two descriptors more.
        let pending = wait_until(READY, || fd_count(master) >= baseline + 2);
        assert!(
            pending,
            "a client that {how}: never accepted with a connect pending ({} fds, baseline {baseline}): {}\n{}",
            fd_count(master),
            fd_list(master),
            b.dump()
        );
        if reset {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: the fd is the open client socket's; `linger` is a valid `struct
            // linger` and its size is passed with it.
            let r = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_LINGER");
        }
        drop(client);
        // Well before the 60 s connect timeout: the master noticed the client leave.
        expect_fds_at_most(
            master,
            baseline,
            Duration::from_secs(5),
            &format!("{engine}: a client that {how} during a stalled connect"),
        );
    }
    // The tokio path closes the client's socket a moment before it counts the abandon.
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = connections(admin);
        if c["abandoned"].as_u64() == Some(2) || Instant::now() >= deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(c["abandoned"].as_u64(), Some(2), "{c}\n{}", b.dump());
    assert_eq!(c["connect_failed"].as_u64(), Some(0), "{c}\n{}", b.dump());
    assert_no_panic(&b);
}

#[test]
fn the_epoll_engine_drops_a_stalled_connect_whose_client_left() {
    a_client_that_leaves_during_a_stalled_connect_is_dropped_at_once("epoll");
}

#[test]
fn the_tokio_engine_drops_a_stalled_connect_whose_client_left() {
    a_client_that_leaves_during_a_stalled_connect_is_dropped_at_once("tokio");
}

#[test]
fn the_epoll_engine_closes_an_idle_connection_at_the_idle_timeout() {
    let (b, _) = start_python(&["--engine", "epoll", "--idle-timeout", "1s"], ECHO);
    let mut s = connect(&b);
    s.write_all(b"x").unwrap();
    let mut got = [0u8; 1];
    s.read_exact(&mut got).unwrap();
    let since = Instant::now();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the master closes");
    let took = since.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert_no_panic(&b);
}

#[test]
fn the_epoll_engine_finishes_a_request_in_flight_at_the_stop() {
    let (mut b, _) = start_python(&["--engine", "epoll", "--grace", "10s"], SLOW);
    let mut s = connect(&b);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    b.expect_line(0, "`backend got a request`", READY, |l| {
        l.contains("backend got a request")
    });
    b.signal(libc::SIGTERM);
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.dump()));
    assert!(
        raw.starts_with("HTTP/1.1 200") && raw.ends_with("slow"),
        "{raw:?}"
    );
    let status = b.expect_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", b.dump());
    assert!(
        !b.lines().iter().any(|l| l.contains("grace period over")),
        "the drain waited out its grace:\n{}",
        b.dump()
    );
    assert_no_panic(&b);
}

#[test]
fn the_epoll_engine_refuses_what_it_does_not_do_in_one_line() {
    for (args, wanted) in [
        (
            &["--engine", "epoll", "--protocol", "http"][..],
            "--protocol http",
        ),
        (
            &["--engine", "epoll", "--send-proxy", "v1"][..],
            "--send-proxy",
        ),
        (
            &["--engine", "epoll", "--accept-proxy", "127.0.0.1"][..],
            "--accept-proxy",
        ),
        (&["--engine", "epoll", "--mode", "handoff"][..], "--mode"),
    ] {
        let line = crate::fatal_error_loopback(args);
        assert!(
            line.contains("--engine epoll") && line.contains(wanted),
            "{args:?}: {line}"
        );
    }
}

/// `tcpi_segs_in` of a socket (`TCP_INFO`, Linux 4.2+): segments received, handshake and
/// pure ACKs included. Read at its offset (140) in `struct tcp_info`, which the libc
/// crate's older copy of the struct does not reach.
fn segments_in(sock: &impl std::os::fd::AsRawFd) -> u32 {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the fd is open; `info` is writable for `len` bytes and `len` says so.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    assert!(len >= 144, "TCP_INFO too short for tcpi_segs_in: {len}");
    u32::from_ne_bytes(info[140..144].try_into().unwrap())
}

/// What the corked backend saw of one connection.
enum Seen {
    /// A connection came in (before its first bytes).
    Opened,
    /// A request was in, after this many segments on the backend's socket.
    Request(u32),
}

/// A backend that reads one request per connection (a thread each), notes how many
/// segments its socket had received by then, and answers with the answer and its FIN in
/// one segment (`TCP_CORK`, then `shutdown`), so the proxy reads the last bytes with the
/// FIN already in.
fn corked_backend() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                if tx.send(Seen::Opened).is_err() {
                    return;
                }
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                if !read_head(&mut c).1 {
                    return;
                }
                let mut buf = [0u8; 1];
                let _ = tx.send(Seen::Request(segments_in(&c)));
                let on: libc::c_int = 1;
                // SAFETY: the fd is open; `on` is an int and its size is passed with it.
                unsafe {
                    libc::setsockopt(
                        c.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_CORK,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
                let _ = c.shutdown(Shutdown::Write);
                // Until the proxy's close, so nothing resets.
                let _ = c.read(&mut buf);
            });
        }
    });
    (addr, rx)
}

/// Per connection through `engine`: the segments the backend had received when the
/// request was in (`SYN` and the request carrying the handshake's ACK: 2, where a bare ACK
/// first makes 3), and the segments the client received in all (`SYN-ACK`, the ACK of its
/// request, the answer with the FIN on it: 3, where a FIN of its own makes 4).
///
/// The request must be in before the proxy accepts, or the proxy connects with no bytes
/// in hand (and rightly acknowledges at once). So with `--max-conns 1`, a holder
/// connection takes the one permit; the measured client connects and sends while the
/// proxy cannot accept it; the holder's close lets it in.
fn segments_per_connection(engine: &str) -> Vec<(u32, u32)> {
    let (backend, seen) = corked_backend();
    let b = Balancer::start(&[
        "--engine",
        engine,
        "--cpus",
        "0",
        "--max-conns",
        "1",
        "--upstream",
        &backend.to_string(),
        "--health-check",
        "http",
        "--health-interval",
        "60s",
    ]);
    wait_upstream_up(&b, backend);
    let next = |what: &str| {
        seen.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the backend saw no {what}\n{}", b.dump()))
    };
    // The health check's request (answered like any other).
    while !matches!(next("health check"), Seen::Request(_)) {}
    let mut counts = Vec::new();
    for i in 0..10 {
        let holder = connect(&b);
        // Accepted and connected on: the permit is taken.
        while !matches!(next("holder"), Seen::Opened) {}
        let mut c = connect(&b);
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        drop(holder);
        let mut answer = Vec::new();
        c.read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", b.dump()));
        assert!(
            answer.ends_with(b"\r\n\r\nok"),
            "connection {i}: {answer:?}"
        );
        let at_backend = loop {
            if let Seen::Request(n) = next("request") {
                break n;
            }
        };
        counts.push((at_backend, segments_in(&c)));
    }
    assert_no_panic(&b);
    counts
}
#[test]
fn the_epoll_engine_sends_the_first_bytes_with_the_handshake_ack_and_the_fin_with_the_last() {
    let counts = segments_per_connection("epoll");
    assert!(
        counts
            .iter()
            .all(|&(backend, client)| backend <= 2 && client <= 3),
        "segments (at the backend when the request was in, at the client in all): {counts:?}"
    );
}

#[test]
fn the_tokio_engine_sends_the_first_bytes_with_the_handshake_ack() {
    let counts = segments_per_connection("tokio");
    assert!(
        counts.iter().all(|&(backend, _)| backend <= 2),
        "segments at the backend when the request was in: {counts:?}"
    );
}
