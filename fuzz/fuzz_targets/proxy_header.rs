//! Fuzzes the `--accept-proxy` reader, `proxy::proxy_header::read`, on real loopback TCP
//! connections: it peeks with `recv(MSG_PEEK)` on the socket's fd, so nothing but a real
//! socket drives it. A current-thread runtime and one listener are made once; each input
//! is sent on two fresh connections, in one write and in small writes (yielding between
//! them, so the reader also sees the header arrive in pieces), and the writer then shuts
//! its side down.
//!
//! Input: byte 0 picks the size of the small writes (1–64 bytes); the rest is what the
//! trusted load balancer sends (a v1 or v2 header and the client's first bytes).
//!
//! Checks besides "no panic":
//! - never a timeout: the peer always closes, so the reader must end on its own;
//! - on success, the reader consumed exactly one whole header: the bytes left in the
//!   socket are the input after it, and the consumed bytes alone parse (with `ppp`) as a
//!   complete header of that length with the same addresses the reader returned;
//! - the addresses returned re-serialise: our own v1 and v2 headers for them read back
//!   to the same client;
//! - the result does not depend on how the bytes were split into writes.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ppp::{HeaderResult, PartialResult};
use proxy::proxy_header::{self, HeaderError, Version};
use proxy::ClientAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Far longer than any input takes; reaching it means the reader missed the peer's close.
const TIMEOUT: Duration = Duration::from_secs(5);

struct Harness {
    rt: Runtime,
    listener: TcpListener,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        Harness { rt, listener }
    })
}

/// What the reader made of one delivery: its result, and the bytes it left in the socket.
struct Outcome {
    result: Result<ClientAddr, HeaderError>,
    rest: Vec<u8>,
    peer: SocketAddr,
}

/// Sends `stream` (in writes of `chunk` bytes) on a new connection, closes the sending
/// side, and runs the reader on the accepting side.
async fn deliver(listener: &TcpListener, stream: &[u8], chunk: usize) -> Outcome {
    let mut client = TcpStream::connect(listener.local_addr().expect("local addr"))
        .await
        .expect("connect");
    let (server, peer) = listener.accept().await.expect("accept");
    let local = server.local_addr().expect("local addr");
    let bytes = stream.to_vec();
    let writer = tokio::spawn(async move {
        for piece in bytes.chunks(chunk.max(1)) {
            // The reader may already have closed the connection after an early refusal.
            if client.write_all(piece).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = client.shutdown().await;
        client
    });
    let result = proxy_header::read(&server, peer, local, TIMEOUT).await;
    let mut rest = Vec::new();
    if result.is_ok() {
        let mut server = server;
        server.read_to_end(&mut rest).await.expect("reading the rest");
    }
    let _client = writer.await.expect("writer");
    Outcome { result, rest, peer }
}

/// The addresses a complete header says, as the reader should report them (`None`:
/// LOCAL, UNKNOWN or unix, i.e. the peer itself).
fn addresses(header: &HeaderResult<'_>) -> Option<(SocketAddr, SocketAddr)> {
    match header {
        HeaderResult::V1(Ok(h)) => match &h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            )),
            ppp::v1::Addresses::Tcp6(a) => Some((
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            )),
            ppp::v1::Addresses::Unknown => None,
        },
        HeaderResult::V2(Ok(h)) if h.command == ppp::v2::Command::Proxy => match h.addresses {
            ppp::v2::Addresses::IPv4(a) => Some((
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            )),
            ppp::v2::Addresses::IPv6(a) => Some((
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            )),
            _ => None,
        },
        _ => None,
    }
}

fn header_len(header: &HeaderResult<'_>) -> Option<usize> {
    match header {
        HeaderResult::V1(Ok(h)) => Some(h.header.len()),
        HeaderResult::V2(Ok(h)) => Some(h.len()),
        _ => None,
    }
}

/// The kind of a result, for comparing two deliveries (each on its own connection, so
/// "the peer itself" is not compared by address).
fn kind(o: &Outcome) -> String {
    match &o.result {
        Ok(c) if c.addr == o.peer => "ok from the peer itself".into(),
        Ok(c) => format!("ok {} {}", c.addr, c.dest),
        Err(HeaderError::Timeout(_)) => "timeout".into(),
        Err(HeaderError::Closed) => "closed".into(),
        Err(HeaderError::TooLong) => "too long".into(),
        Err(HeaderError::Invalid(_)) => "invalid".into(),
        Err(HeaderError::Io(e)) => format!("io {:?}", e.kind()),
    }
}

fn check(stream: &[u8], o: &Outcome) {
    let client = match &o.result {
        Err(HeaderError::Timeout(_)) => panic!("timed out although the peer closed"),
        Err(_) => return,
        Ok(c) => c,
    };
    assert_eq!(client.via, Some(o.peer), "via is the load balancer");
    assert!(o.rest.len() <= stream.len());
    let consumed = stream.len() - o.rest.len();
    assert_eq!(&stream[consumed..], &o.rest[..], "bytes after the header changed");
    let header = &stream[..consumed];
    let parsed = HeaderResult::parse(header);
    assert!(
        !parsed.is_incomplete() && header_len(&parsed) == Some(consumed),
        "consumed {consumed} bytes, not one whole header: {parsed:?}"
    );
    match addresses(&parsed) {
        Some((addr, dest)) => assert_eq!((client.addr, client.dest), (addr, dest)),
        None => assert_eq!(client.addr, o.peer, "LOCAL/UNKNOWN leaves the peer"),
    }
    if addresses(&parsed).is_some() {
        for version in [Version::V1, Version::V2] {
            let again = proxy_header::header(version, client).expect("building a header");
            let reparsed = HeaderResult::parse(&again);
            assert_eq!(header_len(&reparsed), Some(again.len()), "{version:?}: {reparsed:?}");
            let (addr, dest) = addresses(&reparsed).expect("addresses");
            // A mixed-family pair is written IPv4-mapped; compare as the reader would.
            let canon = |a: SocketAddr| match a {
                SocketAddr::V6(v6) => v6
                    .ip()
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::from((v4, v6.port()))),
                v4 => v4,
            };
            assert_eq!(
                (canon(addr), canon(dest)),
                (canon(client.addr), canon(client.dest)),
                "{version:?} header does not read back"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(pick % 64) + 1;
    let h = harness();
    let (whole, pieces) = h.rt.block_on(async {
        let whole = deliver(&h.listener, stream, stream.len()).await;
        let pieces = deliver(&h.listener, stream, chunk).await;
        (whole, pieces)
    });
    check(stream, &whole);
    check(stream, &pieces);
    assert_eq!(
        kind(&whole),
        kind(&pieces),
        "one write and writes of {chunk} bytes read differently"
    );
});
