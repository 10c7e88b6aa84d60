//! The admin endpoint as configuration: where it is (`IP:PORT`, `:PORT` or a Unix socket
//! path) and the `--admin-token` secret. The master binds one ([`crate::admin`]), the
//! operator subcommands ([`crate::client`]) connect to one, and [`crate::config`] validates
//! both; keeping these values in a leaf module is what stops config and admin from
//! importing each other.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// An admin endpoint's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl AdminAddr {
    /// `IP:PORT`, `[v6]:PORT`, `:PORT`, or a path: anything with a `/` in it (`./admin.sock`
    /// for one in the current directory), so a typo in an address is never taken for a
    /// file name.
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        if raw.contains('/') {
            return Ok(Self::Unix(PathBuf::from(raw)));
        }
        worker::protocol::parse_listen(raw).map(Self::Tcp).ok_or_else(|| {
            anyhow::anyhow!(
                "--admin {raw:?}: expected IP:PORT (e.g. 127.0.0.1:9000), :PORT, or a Unix socket path with a / in it (e.g. /run/balancer.sock, ./admin.sock)"
            )
        })
    }
}

impl AdminAddr {
    /// Whether only this machine can reach it: a Unix socket, or TCP on a loopback address.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(a) => a.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The `--admin-token` secret; its `Debug` does not show it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// A token; `None` for an empty one (which would let anyone in).
    pub fn new(secret: &str) -> Option<Self> {
        (!secret.is_empty()).then(|| Self(secret.to_owned()))
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            AdminAddr::parse("127.0.0.1:9000").unwrap(),
            AdminAddr::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            AdminAddr::parse(":9000").unwrap(),
            AdminAddr::Tcp("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(
            AdminAddr::parse("/run/b.sock").unwrap(),
            AdminAddr::Unix("/run/b.sock".into())
        );
        assert_eq!(
            AdminAddr::parse("./b.sock").unwrap(),
            AdminAddr::Unix("./b.sock".into())
        );
        assert!(AdminAddr::parse("b.sock").is_err());
        assert!(AdminAddr::parse("localhost:9000").is_err());
        assert!(AdminAddr::parse(":99999").is_err());
        assert!(AdminAddr::parse("[::1]:9").unwrap().is_local());
        assert!(!AdminAddr::parse("0.0.0.0:9").unwrap().is_local());
        assert!(!AdminAddr::parse(":9").unwrap().is_local());
        assert!(AdminAddr::parse("/x").unwrap().is_local());
    }
}
