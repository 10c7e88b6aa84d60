//! Hostile byte streams (issue 16), kept as regression tests: an upgraded connection carrying
//! an echo both ways for 10 s, 200 MB up and 200 MB down at once with slow peers (the
//! master's memory must stay flat, the bytes must arrive intact), and a client that resets
//! its connection in the middle of a download (the worker must learn of it at once).
//!
//! The worker is [`BULK`], a python server with three commands on a connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use super::python::python;
use super::*;

/// A worker with three kinds of connection, by their first line:
/// - `GET ...` with `Upgrade: echo`: answers `101 Switching Protocols`, then echoes every
///   byte until the client closes its side;
/// - `UP n`: reads `n` bytes, pausing 20 ms after each 4 MiB (a slow reader), then answers
///   the sha256 of what it read, in hex, and a newline;
/// - `DOWN n`: sends `n` random bytes, then their sha256 in hex and a newline; if the client
///   goes away first it prints `down aborted after N bytes` to stderr (the master relays it).
///
/// Connections with no first line (health checks) are closed.
const BULK: &str = r#"
import hashlib, os, socket, sys, threading, time
IPC = int(os.environ["BALANCER_IPC_FD"])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(256)

def serve(c):
    f = c.makefile("rb")
    try:
        first = f.readline()
        if first.startswith(b"GET "):
            while f.readline() not in (b"\r\n", b""):
                pass
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
            while True:
                data = f.read1(65536)
                if not data:
                    break
                c.sendall(data)
        elif first.startswith(b"UP "):
            left = int(first.split()[1])
            h = hashlib.sha256()
            since_pause = 0
            while left > 0:
                data = f.read1(min(left, 262144))
                if not data:
                    break
                h.update(data)
                left -= len(data)
                since_pause += len(data)
                if since_pause >= 4 << 20:
                    since_pause = 0
                    time.sleep(0.02)
            c.sendall(h.hexdigest().encode() + b"\n")
        elif first.startswith(b"DOWN "):
            total = int(first.split()[1])
            h = hashlib.sha256()
            sent = 0
            try:
                while sent < total:
                    chunk = os.urandom(min(total - sent, 262144))
                    c.sendall(chunk)
                    h.update(chunk)
                    sent += len(chunk)
                c.sendall(h.hexdigest().encode() + b"\n")
            except OSError as e:
                print("down aborted after %d bytes: %s" % (sent, type(e).__name__), file=sys.stderr, flush=True)
    except OSError:
        pass
    finally:
        c.close()

def accept():
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()

def obey():
    for line in os.fdopen(os.dup(IPC), "rb"):
        if b"shutdown" in line:
            break
    os._exit(0)

threading.Thread(target=accept, daemon=True).start()
threading.Thread(target=obey, daemon=True).start()
os.write(IPC, b'{"type":"ready","port":%d}\n' % srv.getsockname()[1])
while True:
    time.sleep(3600)
"#;

/// A master with one [`BULK`] worker and `extra` flags, ready.
fn bulk_master(extra: &[&str]) -> Balancer {
    let mut args = vec!["--cpus", "1"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", python(), "-S", "-c", BULK]);
    let b = Balancer::start(&args);
    b.addr();
    wait_all_ready(&b, 1);
    b
}

/// Resident memory of `pid`, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Deterministic filler bytes (xorshift), so that what was sent can be checked.
struct Filler(u64);

impl Filler {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).ok();
    c.set_write_timeout(Some(Duration::from_secs(30))).ok();
    c
}

/// An upgraded connection (`101`, then raw bytes) carries an echo both ways for 10 s, with
/// `--idle-timeout 2s`: 1 KiB every 10 ms out, every byte back in order, something back in
/// each of the ten seconds, and the stream is never cut for idleness (it is not idle).
#[test]
fn upgraded_stream_echoes_both_ways_for_ten_seconds() {
    const FOR: Duration = Duration::from_secs(10);
    const CHUNK: usize = 1024;
    let b = bulk_master(&["--idle-timeout", "2s"]);
    let mut conn = connect(b.addr());
    conn.write_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
    )
    .expect("upgrade request");
    let mut head = BufReader::new(conn.try_clone().expect("clone"));
    let mut status = String::new();
    head.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 101"), "{status:?}");
    loop {
        let mut h = String::new();
        head.read_line(&mut h).expect("header");
        if h == "\r\n" {
            break;
        }
    }
    assert!(head.buffer().is_empty(), "echo bytes before any were sent");
    drop(head);

    let mut writer = conn.try_clone().expect("clone");
    let (sent_tx, sent_rx) = mpsc::channel::<Vec<u8>>();
    let started = Instant::now();
    let sender = thread::spawn(move || {
        let mut filler = Filler(0x5eed);
        let mut chunks = 0;
        while started.elapsed() < FOR && chunks < 2_000 {
            let mut chunk = vec![0; CHUNK];
            filler.fill(&mut chunk);
            writer.write_all(&chunk).expect("writing the stream");
            sent_tx.send(chunk).expect("channel");
            chunks += 1;
            thread::sleep(Duration::from_millis(10)); // Pacing: a steady trickle.
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        chunks
    });

    let mut per_second = [0usize; 11];
    let mut expected: Vec<u8> = Vec::new();
    let mut matched = 0usize;
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = conn.read(&mut buf).expect("reading the echo");
        if n == 0 {
            break;
        }
        let second = (started.elapsed().as_secs() as usize).min(10);
        per_second[second] += n;
        while expected.len() < matched + n {
            expected.extend(
                sent_rx
                    .recv()
                    .expect("the echo is no longer than what was sent"),
            );
        }
        assert_eq!(
            &buf[..n],
            &expected[matched..matched + n],
            "echo differs at byte {matched}"
        );
        matched += n;
    }
    let chunks = sender.join().expect("sender");
    assert_eq!(matched, chunks * CHUNK, "every byte came back");
    assert!(
        per_second[..10].iter().all(|&n| n > 0),
        "a second without echo: {per_second:?}"
    );
    assert!(started.elapsed() >= FOR);
    summary(
        "upgrade_echo_10s",
        &[
            ("bytes_each_way", matched.to_string()),
            ("per_second", format!("{:?}", &per_second[..10])),
        ],
    );
    assert_no_panic(&b);
}

/// Sends `UP n` and `n` filler bytes; returns (our sha256, the worker's).
fn upload(addr: SocketAddr, n: usize) -> (String, String) {
    let mut conn = connect(addr);
    conn.write_all(format!("UP {n}\n").as_bytes()).expect("UP");
    // A block of filler whose length is no power of two, sent round and round: every write
    // starts at another offset of it, at no cost per byte (this test is a debug build).
    let mut block = vec![0; (1 << 20) + 4099];
    Filler(0xfeed).fill(&mut block);
    let mut hash = Sha256::new();
    let mut at = 0;
    let mut left = n;
    while left > 0 {
        let k = left.min(256 * 1024).min(block.len() - at);
        let chunk = &block[at..at + k];
        conn.write_all(chunk).expect("uploading");
        hash.update(chunk);
        at = (at + k) % block.len();
        left -= k;
    }
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .expect("the worker's digest");
    (hex(&hash.finalize()), answer.trim().to_owned())
}

/// Sends `DOWN n`, reads the `n` bytes slowly (a 2 ms pause per MiB, 50 ms per 16 MiB);
/// returns (our sha256 of them, the worker's).
fn download(addr: SocketAddr, n: usize) -> (String, String) {
    let mut conn = connect(addr);
    conn.write_all(format!("DOWN {n}\n").as_bytes())
        .expect("DOWN");
    let mut r = BufReader::with_capacity(256 * 1024, conn);
    let mut hash = Sha256::new();
    let mut got = 0;
    let mut since_pause = 0;
    let mut since_nap = 0;
    while got < n {
        let buf = r.fill_buf().expect("downloading");
        assert!(!buf.is_empty(), "EOF after {got} of {n} bytes");
        let k = buf.len().min(n - got);
        hash.update(&buf[..k]);
        r.consume(k);
        got += k;
        since_pause += k;
        since_nap += k;
        // Pacing: a slow reader, so that the proxy has to hold back the worker.
        if since_nap >= 1 << 20 {
            since_nap = 0;
            thread::sleep(Duration::from_millis(2));
        }
        if since_pause >= 16 << 20 {
            since_pause = 0;
            thread::sleep(Duration::from_millis(50));
        }
    }
    let mut answer = String::new();
    r.read_line(&mut answer).expect("the worker's digest");
    (hex(&hash.finalize()), answer.trim().to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 200 MB up and 200 MB down at the same time through the proxy, both peers slow (the worker
/// reads in bursts, the client drains slowly): both sha256 sums match, and the master's
/// resident memory never grows by more than 16 MiB over what it was before (flat: it holds
/// back the fast side instead of buffering).
#[test]
fn two_hundred_megabytes_each_way_with_slow_peers_and_flat_memory() {
    const SIZE: usize = 200_000_000;
    const SLACK_KIB: u64 = 16 * 1024;
    let b = bulk_master(&[]);
    let addr = b.addr();
    let master = b.pid();
    // Warm up the data path (first-use allocations are not growth), then take the baseline.
    let (a, w) = download(addr, 1 << 20);
    assert_eq!(a, w);
    let baseline = rss_kib(master);
    assert!(baseline > 0, "no VmRSS for {master}");

    let stop = AtomicBool::new(false);
    let (up, down, peak) = thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(master));
                thread::sleep(Duration::from_millis(50)); // Pacing: the sampling period.
            }
            peak
        });
        let t = Instant::now();
        let up = s.spawn(move || (upload(addr, SIZE), t.elapsed()));
        let down = s.spawn(move || (download(addr, SIZE), t.elapsed()));
        let up = up.join().expect("upload");
        let down = down.join().expect("download");
        stop.store(true, Ordering::Relaxed);
        (up, down, sampler.join().expect("sampler"))
    });
    let ((up, up_took), (down, down_took)) = (up, down);
    assert_eq!(up.0, up.1, "upload sha256: ours vs the worker's");
    assert_eq!(down.0, down.1, "download sha256: ours vs the worker's");
    summary(
        "bulk_200mb_each_way",
        &[
            ("rss_before_kib", baseline.to_string()),
            ("rss_peak_kib", peak.to_string()),
            ("up_ms", up_took.as_millis().to_string()),
            ("down_ms", down_took.as_millis().to_string()),
        ],
    );
    assert!(
        peak <= baseline + SLACK_KIB,
        "master RSS grew from {baseline} KiB to {peak} KiB while moving 400 MB"
    );
    assert_no_panic(&b);
}

/// A client that resets its connection (SO_LINGER 0) after 8 MiB of a 200 MB download: the
/// reset reaches the worker within 5 s (it logs the aborted send well short of 200 MB), the
/// master's descriptors come back, and the next download is whole.
#[test]
fn client_reset_in_the_middle_of_a_download() {
    const SIZE: usize = 200_000_000;
    let b = bulk_master(&[]);
    let addr = b.addr();
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    let mut conn = connect(addr);
    conn.write_all(format!("DOWN {SIZE}\n").as_bytes())
        .expect("DOWN");
    let mut buf = vec![0; 64 * 1024];
    let mut got = 0;
    while got < 8 << 20 {
        let n = conn.read(&mut buf).expect("downloading");
        assert!(n > 0, "EOF after {got} bytes");
        got += n;
    }
    socket2::SockRef::from(&conn)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    let reset_at = b.lines().len();
    drop(conn);

    let (_, aborted) = b.expect_line(reset_at, "the worker's `down aborted`", EXIT, |l| {
        l.contains("stderr] down aborted after ")
    });
    let sent: usize = aborted
        .split("after ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {aborted:?}"));
    assert!(
        sent < SIZE / 2,
        "the worker sent {sent} bytes before noticing"
    );
    expect_fds_at_most(master, fds_before + 2, Duration::from_secs(10), "after");
    let (ours, theirs) = download(addr, 4 << 20);
    assert_eq!(ours, theirs, "the next download is whole");
    summary(
        "client_rst_mid_download",
        &[
            ("client_read", got.to_string()),
            ("worker_sent", sent.to_string()),
        ],
    );
    assert_no_panic(&b);
}
