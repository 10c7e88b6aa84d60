//! Asking DNS for an upstream name's addresses, with hickory-resolver (async, on the
//! master's runtime: never a blocking `getaddrinfo`).
//!
//! The resolver keeps no cache: the caller decides when to ask again (see
//! [`next_lookup`]), and a change of records must be seen at the next lookup, not when a
//! cached answer expires.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;

/// How long one query to one server may take. DNS on a LAN or in a container network
/// answers in milliseconds; a server that has not answered in 2 s will not.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of one whole lookup (every server, A and AAAA): a silent or broken server
/// must never hold up the next lookup for long.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between two lookups of one name, whatever the TTL says: a TTL of 0 must
/// not turn into a query loop.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a lookup gave no addresses. Each is a state the discovery logs once when it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// NXDOMAIN, or the name exists without A/AAAA records.
    #[error("no such name, or no A/AAAA records")]
    NotFound,
    /// No server answered in time.
    #[error("timed out")]
    Timeout,
    /// Anything else: refused, server failure, an answer that does not parse.
    #[error("lookup failed: {0}")]
    Failed(String),
}

/// Why the resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `/etc/resolv.conf` is missing, unreadable or names no server.
    #[error("reading /etc/resolv.conf (give --resolver IP:PORT instead)")]
    SystemConf(#[source] NetError),
    /// hickory refused the configuration.
    #[error("starting the DNS resolver")]
    Build(#[source] NetError),
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Every address of every A and AAAA record.
    pub addrs: BTreeSet<IpAddr>,
    /// How long the answer may be trusted (the shortest TTL of its records).
    pub ttl: Duration,
}

/// A resolver for upstream names.
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
    /// The servers asked, for the start-up log line.
    pub servers: Vec<SocketAddr>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Dns {
    /// A resolver asking `servers` (UDP, TCP for truncated answers), or with no servers the
    /// nameservers, search list and options of `/etc/resolv.conf`, as libc would (Docker's
    /// embedded DNS and Kubernetes cluster DNS are configured there).
    pub fn new(servers: &[SocketAddr]) -> Result<Self, SetupError> {
        let provider = TokioRuntimeProvider::default();
        let (mut builder, asked) = if servers.is_empty() {
            let (config, opts) = hickory_resolver::system_conf::read_system_conf()
                .map_err(SetupError::SystemConf)?;
            let asked = config
                .name_servers()
                .iter()
                .flat_map(|ns| {
                    ns.connections
                        .first()
                        .map(|c| SocketAddr::new(ns.ip, c.port))
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(config, provider);
            *b.options_mut() = opts;
            (b, asked)
        } else {
            let config = ResolverConfig::from_name_servers(
                servers
                    .iter()
                    .map(|s| {
                        let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                        for c in &mut ns.connections {
                            c.port = s.port();
                        }
                        ns
                    })
                    .collect(),
            );
            let mut b = TokioResolver::builder_with_config(config, provider);
            // Only the listed servers answer: no /etc/hosts either.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            (b, servers.to_vec())
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = QUERY_TIMEOUT;
        opts.attempts = 1;
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(SetupError::Build)?;
        Ok(Self {
            resolver,
            servers: asked,
        })
    }

    /// Asks for `name`'s A and AAAA records, within [`LOOKUP_TIMEOUT`].
    pub async fn lookup(&self, name: &str) -> Result<Answer, LookupError> {
        self.resolver.clear_cache();
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(name))
            .await
            .map_err(|_| LookupError::Timeout)?
            .map_err(classify)?;
        let addrs: BTreeSet<IpAddr> = found.iter().collect();
        if addrs.is_empty() {
            return Err(LookupError::NotFound);
        }
        let ttl = found
            .valid_until()
            .saturating_duration_since(Instant::now());
        Ok(Answer { addrs, ttl })
    }
}

fn classify(e: NetError) -> LookupError {
    if e.is_nx_domain() || e.is_no_records_found() {
        LookupError::NotFound
    } else if matches!(e, NetError::Timeout) {
        LookupError::Timeout
    } else {
        LookupError::Failed(e.to_string())
    }
}

/// When to ask again after an answer valid for `ttl`: after `interval`, sooner when the
/// records expire sooner, never sooner than [`MIN_INTERVAL`].
pub fn next_lookup(interval: Duration, ttl: Option<Duration>) -> Duration {
    ttl.map_or(interval, |t| t.min(interval)).max(MIN_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_short_ttls_down_to_a_floor() {
        let five = Duration::from_secs(5);
        assert_eq!(next_lookup(five, None), five);
        assert_eq!(next_lookup(five, Some(Duration::from_secs(300))), five);
        assert_eq!(
            next_lookup(five, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(next_lookup(five, Some(Duration::ZERO)), MIN_INTERVAL);
        assert_eq!(next_lookup(Duration::from_millis(10), None), MIN_INTERVAL);
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_not_a_hang() {
        // A UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns = Dns::new(&[silent.local_addr().unwrap()]).unwrap();
        let started = Instant::now();
        assert_eq!(dns.lookup("app.test.").await, Err(LookupError::Timeout));
        assert!(started.elapsed() <= LOOKUP_TIMEOUT + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn garbage_answers_are_a_failure() {
        // A server that answers every query with bytes that are not a DNS message.
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(b"\xff\x00garbage", from).await;
            }
        });
        let dns = Dns::new(&[addr]).unwrap();
        assert!(dns.lookup("app.test.").await.is_err());
        server.abort();
    }
}
