//! `--upstream HOST:PORT` as typed, checked once at start-up: an IP literal (v4 or `[v6]`)
//! becomes one fixed address, a DNS name becomes a source the resolver follows.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Longest DNS name (RFC 1035: 255 octets on the wire, 253 characters written out).
const MAX_NAME: usize = 253;
/// Longest label of a DNS name.
const MAX_LABEL: usize = 63;

/// Where one `--upstream` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An address given literally: one backend, never resolved.
    Ip(IpAddr),
    /// A DNS name: every A/AAAA record is a backend.
    Name(String),
}

/// One `--upstream`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// The host part.
    pub host: Host,
    /// The port every address of this upstream is reached on.
    pub port: u16,
    /// `host:port` as shown in logs and `/status` (`[v6]:port` for IPv6).
    pub label: Arc<str>,
}

impl UpstreamSpec {
    /// The fixed address of an IP-literal upstream.
    pub fn fixed(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// Why an `--upstream` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// No `:PORT` at the end.
    #[error("--upstream {0:?}: no port (expected HOST:PORT, e.g. app:8080 or [::1]:8080)")]
    NoPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("--upstream {0:?}: the port must be a number from 1 to 65535")]
    BadPort(String),
    /// An IPv6 address without brackets, so its port cannot be told apart.
    #[error("--upstream {0:?}: write an IPv6 address in brackets, e.g. [::1]:8080")]
    Unbracketed(String),
    /// The host is neither an IP address nor a valid DNS name.
    #[error("--upstream {0:?}: {1:?} is neither an IP address nor a valid DNS name")]
    BadHost(String, String),
}

/// Parses one `--upstream` value.
pub fn parse(raw: &str) -> Result<UpstreamSpec, SpecError> {
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err(SpecError::BadHost(raw.into(), raw.into()));
        };
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| SpecError::BadHost(raw.into(), v6.into()))?;
        let Some(port) = after.strip_prefix(':') else {
            return Err(SpecError::NoPort(raw.into()));
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let Some((host, port)) = raw.rsplit_once(':') else {
            return Err(SpecError::NoPort(raw.into()));
        };
        if host.contains(':') {
            return Err(SpecError::Unbracketed(raw.into()));
        }
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) if is_dns_name(host) => Host::Name(host.to_ascii_lowercase()),
            Err(_) => return Err(SpecError::BadHost(raw.into(), host.into())),
        };
        (host, port)
    };
    if port.is_empty() {
        return Err(SpecError::NoPort(raw.into()));
    }
    let port = match port.parse::<u32>() {
        Ok(p @ 1..=65535) if port.bytes().all(|b| b.is_ascii_digit()) => p as u16,
        _ => return Err(SpecError::BadPort(raw.into())),
    };
    let label = match &host {
        Host::Ip(ip) => SocketAddr::new(*ip, port).to_string(),
        Host::Name(name) => format!("{name}:{port}"),
    };
    Ok(UpstreamSpec {
        host,
        port,
        label: label.into(),
    })
}

/// Letters, digits, `-` and `_` (service names in Docker and Kubernetes use it) in labels of
/// 1 to 63 characters, an optional final dot; not all digits (that is a bad IPv4 address).
fn is_dns_name(name: &str) -> bool {
    let bare = name.strip_suffix('.').unwrap_or(name);
    !bare.is_empty()
        && bare.len() <= MAX_NAME
        && !bare.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let v4 = parse("10.0.0.5:8080").unwrap();
        assert_eq!(v4.fixed(), Some("10.0.0.5:8080".parse().unwrap()));
        let v6 = parse("[::1]:80").unwrap();
        assert_eq!(v6.fixed(), Some("[::1]:80".parse().unwrap()));
        assert_eq!(&*v6.label, "[::1]:80");
        let name = parse("App.internal:8080").unwrap();
        assert_eq!(name.host, Host::Name("app.internal".into()));
        assert_eq!((name.port, &*name.label), (8080, "app.internal:8080"));
        assert!(name.fixed().is_none());
        assert!(parse("my_service:1").is_ok());
        assert!(parse("app.svc.cluster.local.:65535").is_ok());
    }

    #[test]
    fn refused_forms() {
        assert!(matches!(parse("app"), Err(SpecError::NoPort(_))));
        assert!(matches!(parse("app:"), Err(SpecError::NoPort(_))));
        assert!(matches!(parse("[::1]"), Err(SpecError::NoPort(_))));
        assert!(matches!(parse("app:0"), Err(SpecError::BadPort(_))));
        assert!(matches!(parse("app:65536"), Err(SpecError::BadPort(_))));
        assert!(matches!(
            parse("app:99999999999"),
            Err(SpecError::BadPort(_))
        ));
        assert!(matches!(parse("app:+80"), Err(SpecError::BadPort(_))));
        assert!(matches!(parse("app:http"), Err(SpecError::BadPort(_))));
        assert!(matches!(parse("::1:80"), Err(SpecError::Unbracketed(_))));
        assert!(matches!(parse("[zz]:80"), Err(SpecError::BadHost(..))));
        assert!(matches!(parse("a b:80"), Err(SpecError::BadHost(..))));
        assert!(matches!(parse(":80"), Err(SpecError::BadHost(..))));
        assert!(matches!(parse("300.1.1.1:80"), Err(SpecError::BadHost(..))));
        assert!(matches!(parse("-app:80"), Err(SpecError::BadHost(..))));
        let long = format!("{}:80", "a".repeat(64));
        assert!(matches!(parse(&long), Err(SpecError::BadHost(..))));
    }

    #[test]
    fn errors_are_one_line_naming_the_flag() {
        for bad in ["app", "app:0", "app:70000", "::1:80"] {
            let msg = parse(bad).unwrap_err().to_string();
            assert!(
                msg.starts_with("--upstream ") && !msg.contains('\n'),
                "{msg}"
            );
        }
    }
}
