//! What the upstream tests run beside balancer: small HTTP backends on 127.0.0.x addresses
//! that say who they are, and a real DNS server on 127.0.0.1 whose answers the test changes.
//!
//! The DNS server is built on hickory-proto's message types (the wire format is not
//! hand-written); it serves one zone from memory over UDP, and can be told to answer
//! NXDOMAIN, to answer bytes that are not DNS, or to stay silent. Both kinds of server run
//! on threads that stop and are joined when the value is dropped.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};

/// How long a backend waits for a request before giving up on the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP/1.1 server that answers every request with `200` and its tag as the body.
pub struct Backend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds `addr` (port 0 picks one) and serves until dropped.
    pub fn start(addr: SocketAddr, tag: &str) -> std::io::Result<Backend> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, tag) = (Arc::clone(&stop), tag.to_owned());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    let tag = tag.clone();
                    std::thread::spawn(move || answer(stream, &tag));
                }
            }
        });
        Ok(Backend {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; the listener closes when the thread returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut stream: TcpStream, tag: &str) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{tag}",
        tag.len()
    );
}

/// A TCP server that echoes every byte back until the client closes: a long-lived
/// connection for the drain tests.
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(addr: SocketAddr) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut stream) = conn {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = stream.read(&mut buf) {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        Ok(Echo {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds one backend per address in `ips`, all on the same port (an upstream name has one
/// port for all its records). Tries a few ports in case one is taken on some address.
pub fn backends_on_one_port(ips: &[IpAddr]) -> Vec<Backend> {
    for _ in 0..20 {
        let first = Backend::start(SocketAddr::new(ips[0], 0), &ips[0].to_string())
            .expect("binding a backend");
        let port = first.addr.port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            match Backend::start(SocketAddr::new(*ip, port), &ip.to_string()) {
                Ok(b) => all.push(b),
                Err(e) if e.kind() == ErrorKind::AddrInUse => break,
                Err(e) => panic!("binding {ip}:{port}: {e}"),
            }
        }
        if all.len() == ips.len() {
            return all;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// How the DNS server answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The zone's records, with this TTL.
    Records(u32),
    /// NXDOMAIN for everything.
    NxDomain,
    /// Bytes that are not a DNS message.
    Garbage,
    /// Nothing at all.
    Silent,
}

#[derive(Debug)]
struct Zone {
    mode: Mode,
    /// By lower-case name without the final dot.
    records: HashMap<String, Vec<IpAddr>>,
    queries: u64,
}

/// A DNS server on `127.0.0.1:0` (UDP).
pub struct Dns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dns {
    pub fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("binding the DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local addr");
        let zone = Arc::new(Mutex::new(Zone {
            mode: Mode::Records(1),
            records: HashMap::new(),
            queries: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (z, flag) = (Arc::clone(&zone), Arc::clone(&stop));
        let thread = std::thread::spawn(move || serve(&socket, &z, &flag));
        Dns {
            addr,
            zone,
            stop,
            thread: Some(thread),
        }
    }

    /// `name`'s A/AAAA records from now on (an empty list: the name exists, no records).
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        self.lock().records.insert(key(name), ips.to_vec());
    }

    /// How every query is answered from now on.
    pub fn mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Queries received so far.
    pub fn queries(&self) -> u64 {
        self.lock().queries
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, zone: &Mutex<Zone>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => continue,
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let reply = {
            let mut zone = zone.lock().unwrap_or_else(|p| p.into_inner());
            zone.queries += 1;
            respond(&zone, &query)
        };
        if let Some(bytes) = reply {
            let _ = socket.send_to(&bytes, from);
        }
    }
}

fn respond(zone: &Zone, query: &Message) -> Option<Vec<u8>> {
    let id = query.metadata.id;
    let ttl = match zone.mode {
        Mode::Silent => return None,
        Mode::Garbage => return Some(b"\x13\x37 this is not a DNS message".to_vec()),
        Mode::NxDomain => {
            let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::NXDomain);
            m.metadata.recursion_available = true;
            m.add_queries(query.queries.clone());
            return m.to_vec().ok();
        }
        Mode::Records(ttl) => ttl,
    };
    let mut m = Message::new(id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.add_queries(query.queries.clone());
    let mut known = false;
    for q in &query.queries {
        let Some(ips) = zone.records.get(&key(&q.name.to_ascii())) else {
            continue;
        };
        known = true;
        for ip in ips {
            let rdata = match (ip, q.query_type) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            m.add_answer(Record::from_rdata(q.name.clone(), ttl, rdata));
        }
    }
    if !known {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    m.to_vec().ok()
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// An HTTP/1.1 backend stuck on slow work: it reads each request head and then answers
/// nothing (or, with `partial`, a head announcing 1,000 bytes and only the first 10 of
/// them), holding the connection until the other end closes it. Counts the requests it
/// holds, so a test knows they reached it.
pub struct Hold {
    pub addr: SocketAddr,
    held: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How a [`Hold`] connection thread checks for the stop flag while it waits.
const HOLD_POLL: Duration = Duration::from_millis(100);

impl Hold {
    pub fn start(addr: SocketAddr, partial: bool) -> std::io::Result<Hold> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&held));
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    let (flag, count) = (Arc::clone(&flag), Arc::clone(&count));
                    conns.push(std::thread::spawn(move || {
                        hold(stream, partial, &count, &flag)
                    }));
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(Hold {
            addr,
            held,
            stop,
            thread: Some(thread),
        })
    }

    /// Requests whose head arrived and that are being held (or were).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads bytes until the peer closes or `stop` is set; `None` then.
fn read_or_stop(stream: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> Option<usize> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

fn hold(
    mut stream: TcpStream,
    partial: bool,
    held: &std::sync::atomic::AtomicUsize,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(HOLD_POLL));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let Some(n) = read_or_stop(&mut stream, &mut buf, stop) else {
            return;
        };
        head.extend_from_slice(&buf[..n]);
        if head.len() > 64 * 1024 {
            return;
        }
    }
    held.fetch_add(1, Ordering::SeqCst);
    if partial {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789");
    }
    while read_or_stop(&mut stream, &mut buf, stop).is_some() {}
}

/// A backend that accepts each connection and resets it ([`RESET_AFTER`]), before reading or
/// writing a byte: what a worker killed between the master's connect and the client's first bytes
/// looks like from the master. Counts the connections it accepted.
pub struct Resetter {
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long after accepting a [`Resetter`] resets.
const RESET_AFTER: Duration = Duration::from_millis(20);

impl Resetter {
    pub fn start(addr: SocketAddr) -> std::io::Result<Resetter> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    count.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        // The kill comes just after the connect completed (a reset racing
                        // the handshake fails the connect itself, a case the master already
                        // retries).
                        std::thread::sleep(RESET_AFTER);
                        // SO_LINGER 0: the close sends RST.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    });
                }
            }
        });
        Ok(Resetter {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// Connections accepted (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
