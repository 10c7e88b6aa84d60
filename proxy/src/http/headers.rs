//! Header rewriting between client and backend: the hop-by-hop headers (RFC 9110 §7.6.1),
//! including every header named in `Connection`, are removed both ways; the client's
//! address, scheme and host are passed on in `X-Forwarded-For/-Proto/-Host` and the
//! standard `Forwarded` (RFC 7239). Incoming forwarding headers are kept (and appended
//! to) only from `--trusted-proxies`; from anyone else they are replaced, so a client
//! cannot pose as another address.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::header::{HeaderName, HeaderValue, CONNECTION, FORWARDED, HOST, UPGRADE};
use hyper::{HeaderMap, Request, Version};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers that are never forwarded (besides those named in `Connection`).
/// `Proxy-Connection` and `Keep-Alive` are legacy but still sent by old clients.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The `--trusted-proxies` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// A `--trusted-proxies` entry that is neither an address nor a CIDR block.
#[derive(Debug, thiserror::Error)]
#[error("not an IP address or CIDR block: {0:?}")]
pub struct BadCidr(String);

impl FromStr for TrustedProxies {
    type Err = BadCidr;

    /// `CIDR,CIDR,…`; a plain address is a block of one.
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => part
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| BadCidr(part.to_owned()))?,
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }
}

impl TrustedProxies {
    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is in the list.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Who the request came from, as the forwarding headers tell it.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The client's address (from the socket, or from a PROXY protocol header).
    pub client: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The peer is a trusted proxy: its forwarding headers are kept and appended to.
    pub trusted: bool,
}

/// Everything the HTTP path changes in a client's request before it goes to a backend:
/// `Host` from the authority where only that was sent (backends speak HTTP/1.1, so an
/// HTTP/2 request's `:authority` becomes its `Host`), the hop-by-hop headers removed
/// (`Upgrade` kept when `upgrade`), the forwarding headers set, and the version 1.1.
/// One function so the fuzz target (`fuzz/fuzz_targets/http_request.rs`) runs exactly it.
pub fn rewrite_request<B>(req: &mut Request<B>, origin: &Origin, upgrade: bool) {
    let host = host_of(req.headers(), req.uri());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // After the strip: `Connection: host` must not take the client's Host away (found by
    // the fuzz target; the backend then saw no Host at all).
    if let Some(h) = &host {
        req.headers_mut().insert(HOST, h.clone());
    }
    set_forwarded(req.headers_mut(), origin, host.as_ref());
    *req.version_mut() = Version::HTTP_11;
}

/// Removes the hop-by-hop headers and every header named in `Connection`. With
/// `upgrade`, `Upgrade` survives and `Connection: upgrade` is set again, so the backend
/// sees the upgrade request (or the client the backend's 101).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Split as bytes: a field with one non-ASCII option still names the others.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    let kept_upgrade = if upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(proto) = kept_upgrade {
        headers.insert(UPGRADE, proto);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Sets the forwarding headers for `origin`; `host` is the request's `Host` (or HTTP/2
/// authority).
pub fn set_forwarded(headers: &mut HeaderMap, origin: &Origin, host: Option<&HeaderValue>) {
    let ip = origin.client.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if !origin.trusted {
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(&X_FORWARDED_PROTO);
        headers.remove(&X_FORWARDED_HOST);
        headers.remove(FORWARDED);
    }
    append(headers, &X_FORWARDED_FOR, &ip.to_string());
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(origin.proto),
        );
    }
    if let Some(host) = host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
    }
    let mut element = format!("for={}", node(ip));
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        element.push_str(&quoted(host));
    }
    element.push_str(";proto=");
    element.push_str(origin.proto);
    append(headers, &FORWARDED, &element);
}

/// The request's host: `Host`, or else the URI authority (HTTP/2's `:authority`).
pub fn host_of(headers: &HeaderMap, uri: &hyper::Uri) -> Option<HeaderValue> {
    headers.get(HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Appends `value` to the (comma-separated) header `name`, merging repeated fields.
fn append(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    let mut joined = String::new();
    for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
        joined.push_str(v);
        joined.push_str(", ");
    }
    joined.push_str(value);
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name.clone(), v);
    }
}

/// An RFC 7239 node: IPv4 as is, IPv6 in brackets and quotes.
fn node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// `value` as an RFC 7230 token if it is one, else as a quoted-string.
fn quoted(value: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(is_tchar) {
        value.to_owned()
    } else {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(client: &str, trusted: bool) -> Origin {
        Origin {
            client: client.parse().unwrap(),
            proto: "http",
            trusted,
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn connection_cannot_take_host_and_non_ascii_does_not_hide_names() {
        // Both found by fuzz/fuzz_targets/http_request.rs.
        let mut req = Request::new(());
        let h = req.headers_mut();
        h.insert(HOST, HeaderValue::from_static("example.test"));
        h.insert(CONNECTION, HeaderValue::from_static("close, host"));
        h.append(
            CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xe9").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        rewrite_request(&mut req, &origin("10.0.0.7:5000", false), false);
        assert_eq!(req.headers()[HOST], "example.test");
        assert!(!req.headers().contains_key("x-secret"));
        assert!(!req.headers().contains_key(CONNECTION));
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert!(!h.contains_key("x-hop"));
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let host = HeaderValue::from_static("example.test:8080");
        set_forwarded(&mut h, &origin("10.0.0.7:5000", false), Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.test:8080");
        assert_eq!(
            h[FORWARDED],
            "for=10.0.0.7;host=\"example.test:8080\";proto=http"
        );
    }

    #[test]
    fn trusted_forwarding_headers_are_appended_to() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(FORWARDED, HeaderValue::from_static("for=1.1.1.1"));
        set_forwarded(&mut h, &origin("[::ffff:127.0.0.1]:1", true), None);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[FORWARDED], "for=1.1.1.1, for=127.0.0.1;proto=http");
    }

    #[test]
    fn ipv6_nodes_are_bracketed_and_quoted() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &origin("[2001:db8::1]:443", false), None);
        assert_eq!(h[FORWARDED], "for=\"[2001:db8::1]\";proto=http");
    }

    #[test]
    fn trusted_proxies_parse_and_match() {
        let t: TrustedProxies = "127.0.0.0/8, 10.1.2.3,::1".parse().unwrap();
        assert!(t.contains("127.9.9.9".parse().unwrap()));
        assert!(t.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(!t.contains("10.1.2.4".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("nope".parse::<TrustedProxies>().is_err());
        assert!(!TrustedProxies::default().contains("127.0.0.1".parse().unwrap()));
    }
}
