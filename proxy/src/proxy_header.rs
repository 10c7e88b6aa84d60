//! The PROXY protocol (HAProxy's v1 text and v2 binary headers), parsed and built with the
//! `ppp` crate: one written in front of every backend connection (`--send-proxy`), and one
//! read from each connection of a trusted load balancer in front (`--accept-proxy`).
//!
//! Reading peeks (`MSG_PEEK`) until `ppp` says the header is whole, then consumes exactly
//! its length: the bytes after it are the client's and stay in the socket for the copy
//! loop. It runs on the connection's own task under a timeout and a size bound, so a load
//! balancer that stalls, truncates or lies costs its own connection and nothing else.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::client_addr::ClientAddr;

/// Largest header accepted: a v1 line is at most 107 bytes, a v2 header 16 bytes plus 36 of
/// IPv6 addresses plus TLVs (load balancers add a few dozen bytes of them). Bounds the peek
/// buffer, which lives on the stack of the reading task only while it reads.
pub const MAX_HEADER: usize = 1024;

/// How long a trusted peer may take to send its whole header: a load balancer writes it in
/// the same packet as (or right before) the first client bytes, so a second means it is
/// stalled, or not speaking the protocol at all.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest v1 header, `\r\n` included (the specification's worst case, two full IPv6
/// addresses and ports).
const V1_MAX: usize = 107;

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Which header `--send-proxy` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text header (`PROXY TCP4 src dst sport dport\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// A `--send-proxy` value that is neither `v1` nor `v2`.
#[derive(Debug, thiserror::Error)]
#[error("unknown PROXY protocol version {0:?} (expected v1 or v2)")]
pub struct UnknownVersion(String);

impl FromStr for Version {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" | "1" => Ok(Version::V1),
            "v2" | "2" => Ok(Version::V2),
            other => Err(UnknownVersion(other.to_owned())),
        }
    }
}

/// The header that tells a backend about `client`.
pub fn header(version: Version, client: &ClientAddr) -> io::Result<Vec<u8>> {
    // Both addresses in one family: an IPv4 client on an IPv6 listener is written mapped.
    let (src, dst) = match (client.addr, client.dest) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (client.addr, client.dest)
        }
        (a, b) => (to_v6(a), to_v6(b)),
    };
    match version {
        Version::V1 => Ok(ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes()),
        Version::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (src, dst),
        )
        .build(),
    }
}

fn to_v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

/// Where PROXY headers are required: connections from these networks must start with one.
#[derive(Debug, Clone)]
pub struct AcceptProxy {
    /// The trusted load balancers.
    pub from: Vec<IpNet>,
    /// How long one may take to send its header.
    pub timeout: Duration,
}

/// A `--accept-proxy` entry that is not a CIDR (or a bare address).
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a network (expected CIDR like 10.0.0.0/8 or an address)")]
pub struct BadNetwork(String);

impl AcceptProxy {
    /// Parses `CIDR[,CIDR…]` (a bare address is a /32 or /128).
    pub fn parse(list: &str) -> Result<Self, BadNetwork> {
        let from = list
            .split(',')
            .map(str::trim)
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadNetwork(item.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            from,
            timeout: HEADER_TIMEOUT,
        })
    }

    /// Whether a connection from `ip` must carry a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.from.iter().any(|net| net.contains(&ip))
    }
}

/// Why a trusted peer's connection was closed before it was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The whole header did not come within the timeout (stalled or truncated).
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed before a whole header.
    #[error("closed before a complete PROXY header")]
    Closed,
    /// The header is (or says it is) longer than [`MAX_HEADER`].
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Not a valid v1 or v2 header.
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    /// Reading the socket failed.
    #[error("reading the PROXY header")]
    Io(#[source] io::Error),
}

/// Reads the PROXY header that must start `client` (from the trusted `peer`, connected to
/// our `local` address) and consumes it. The client address is the header's source; a
/// `LOCAL` command or an `UNKNOWN`/unix address (the load balancer's own health check)
/// leaves the peer as the client.
pub async fn read(
    client: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    timeout: Duration,
) -> Result<ClientAddr, HeaderError> {
    tokio::time::timeout(timeout, read_header(client, peer, local))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))?
}

async fn read_header(
    client: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<ClientAddr, HeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        let ready = client
            .ready(Interest::READABLE)
            .await
            .map_err(HeaderError::Io)?;
        // SAFETY: the fd is open for the duration of the call; `buf` is valid for
        // `MAX_HEADER` bytes of writes.
        let n = unsafe {
            libc::recv(
                client.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                MAX_HEADER,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let n = match n {
            0 => return Err(HeaderError::Closed),
            n if n > 0 => n as usize,
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => clear_readable(client),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(HeaderError::Io(e)),
                }
                continue;
            }
        };
        if n == seen {
            // Nothing new since the last look: the peer closed mid-header, or more is to
            // come (then wait for it: readiness is cleared, so this does not spin).
            if ready.is_read_closed() {
                return Err(HeaderError::Closed);
            }
            clear_readable(client);
            continue;
        }
        seen = n;
        let Some((len, source)) = examine(&buf[..n])? else {
            continue;
        };
        consume(client, len).await?;
        let (addr, dest) = source.unwrap_or((peer, local));
        return Ok(ClientAddr {
            addr,
            dest,
            via: Some(peer),
        });
    }
}

/// The header's length and addresses, once `data` (the bytes seen so far) holds a whole
/// one; `None` while more is needed.
fn examine(data: &[u8]) -> Result<Option<(usize, Option<Addresses>)>, HeaderError> {
    // A v2 header that declares more than the bound is refused without waiting for it.
    if data.len() >= 16 && data.starts_with(V2_SIGNATURE) {
        let declared = 16 + usize::from(u16::from_be_bytes([data[14], data[15]]));
        if declared > MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
    }
    // `ppp` judges a v1 line before it ends: `PROXY TCP4 1.2.3.4 5.6.7.8 1 ` is an invalid
    // port to it, though the port's digits may be in the next packet (found by the fuzz
    // target's check that a header read whole and read in pieces agree). A v1 header is
    // one line of at most `V1_MAX` bytes, so it is judged once its line has ended.
    if data.starts_with(b"PROXY") && data.len() < V1_MAX && !data.contains(&b'\n') {
        return Ok(None);
    }
    let parsed = HeaderResult::parse(data);
    if parsed.is_incomplete() {
        if data.len() >= MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
        return Ok(None);
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => Ok(Some((h.header.len(), v1_source(&h.addresses)))),
        HeaderResult::V2(Ok(h)) => Ok(Some((h.len(), v2_source(&h)))),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Invalid(e.to_string())),
    }
}

/// A header's source and destination (`None`: the peer itself, see [`read`]).
type Addresses = (SocketAddr, SocketAddr);

fn v1_source(a: &ppp::v1::Addresses) -> Option<Addresses> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<Addresses> {
    if h.command == v2::Command::Local {
        return None;
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::IPv6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

/// Tells tokio the socket has nothing new to read, so the next wait waits for new bytes.
fn clear_readable(client: &TcpStream) {
    let _ = client.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Reads and drops exactly `len` bytes (already peeked, so already there).
async fn consume(client: &TcpStream, mut len: usize) -> Result<(), HeaderError> {
    let mut sink = [0u8; MAX_HEADER];
    while len > 0 {
        client.readable().await.map_err(HeaderError::Io)?;
        match client.try_read(&mut sink[..len]) {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn client() -> ClientAddr {
        ClientAddr {
            addr: "203.0.113.7:4242".parse().unwrap(),
            dest: "198.51.100.1:443".parse().unwrap(),
            via: None,
        }
    }

    /// Sends `bytes` from a client, then reads the header on the server side.
    async fn read_from(bytes: Vec<u8>, close: bool) -> (Result<ClientAddr, HeaderError>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        c.write_all(&bytes).await.unwrap();
        if close {
            c.shutdown().await.unwrap();
        }
        let local = s.local_addr().unwrap();
        let r = read(&s, peer, local, Duration::from_millis(300)).await;
        let mut rest = vec![0u8; 64];
        let mut s = s;
        let n = if r.is_ok() {
            s.read(&mut rest).await.unwrap()
        } else {
            0
        };
        rest.truncate(n);
        (r, rest)
    }

    #[tokio::test]
    async fn v1_and_v2_round_trip_and_leave_the_payload() {
        for version in [Version::V1, Version::V2] {
            let mut bytes = header(version, &client()).unwrap();
            bytes.extend_from_slice(b"GET /");
            let (r, rest) = read_from(bytes, false).await;
            let got = r.unwrap();
            assert_eq!((got.addr, got.dest), (client().addr, client().dest));
            assert!(got.via.is_some());
            assert_eq!(rest, b"GET /", "{version:?}");
        }
    }

    #[tokio::test]
    async fn truncated_oversized_and_lying_headers_are_refused() {
        let (r, _) = read_from(b"PROXY TCP4 1.2.3.4".to_vec(), false).await;
        assert!(matches!(r, Err(HeaderError::Timeout(_))), "{r:?}");
        let (r, _) = read_from(b"PROXY TCP4 1.2.3.4".to_vec(), true).await;
        assert!(
            matches!(r, Err(HeaderError::Timeout(_) | HeaderError::Closed)),
            "{r:?}"
        );
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        let (r, _) = read_from(long, false).await;
        assert!(
            matches!(r, Err(HeaderError::Invalid(_) | HeaderError::TooLong)),
            "{r:?}"
        );
        // v2 that declares 60000 bytes.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xea, 0x60]);
        let (r, _) = read_from(big, false).await;
        assert!(matches!(r, Err(HeaderError::TooLong)), "{r:?}");
        // v2 that declares 4 bytes for IPv4 addresses (12 needed).
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        let (r, _) = read_from(short, false).await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
        // v1 with an address that is not one.
        let (r, _) = read_from(b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n".to_vec(), false).await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
    }

    #[test]
    fn every_prefix_of_a_header_waits_for_the_rest() {
        // A v1 header split after the source port's space was refused as an invalid port
        // (found by fuzz/fuzz_targets/proxy_header.rs).
        let split = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ";
        assert!(matches!(examine(split), Ok(None)));
        let mapped = ClientAddr {
            addr: "[2001:db8::1]:1".parse().unwrap(),
            dest: "[2001:db8::2]:65535".parse().unwrap(),
            via: None,
        };
        let mut headers = vec![
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            header(Version::V1, &mapped).unwrap(),
        ];
        for version in [Version::V1, Version::V2] {
            headers.push(header(version, &client()).unwrap());
        }
        for h in headers {
            for cut in 0..h.len() {
                let r = examine(&h[..cut]);
                assert!(matches!(r, Ok(None)), "{:?} cut at {cut}: {r:?}", h);
            }
            let mut with_payload = h.clone();
            with_payload.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let r = examine(&with_payload);
            assert!(
                matches!(r, Ok(Some((len, _))) if len == h.len()),
                "{h:?}: {r:?}"
            );
        }
    }

    #[test]
    fn flags_parse_or_say_why_not() {
        assert_eq!("v2".parse::<Version>().unwrap(), Version::V2);
        assert!("v3".parse::<Version>().is_err());
        let a = AcceptProxy::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        assert!(a.trusts("10.1.2.3".parse().unwrap()));
        assert!(a.trusts("127.0.0.1".parse().unwrap()));
        assert!(a.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!a.trusts("127.0.0.2".parse().unwrap()));
        assert!(AcceptProxy::parse("10.0.0.0/33").is_err());
        assert!(AcceptProxy::parse("nonsense").is_err());
        assert!(AcceptProxy::parse("").is_err());
    }
}
