//! Who a client connection is from: the value that flows from the accept (the socket's
//! peer, or the PROXY header a trusted load balancer in front sent) into `--send-proxy`,
//! the HTTP forwarded headers and the logs.

use std::fmt;
use std::net::SocketAddr;

/// The client of one connection, as far as balancer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The real client: the socket's peer, or the source in the PROXY header its peer sent.
    pub addr: SocketAddr,
    /// The address the client connected to: our listener, or the destination in the header.
    pub dest: SocketAddr,
    /// The load balancer in front that sent a PROXY header (`None`: the client is the peer).
    pub via: Option<SocketAddr>,
}

impl ClientAddr {
    /// A client connected directly: `peer` to our `local` address.
    pub fn direct(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            addr: peer,
            dest: local,
            via: None,
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            Some(via) => write!(f, "{} via {via}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}
