//! Header rewriting between client and backend: the hop-by-hop headers (RFC 9110 §7.6.1),
//! including every header named in `Connection`, are removed both ways; the client's
//! address, scheme and host are passed on in `X-Forwarded-For/-Proto/-Host` and the
//! standard `Forwarded` (RFC 7239). Incoming forwarding headers are kept (and appended
//! to) only from `--trusted-proxies`; from anyone else they are replaced, so a client
//! cannot pose as another address.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, FORWARDED, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{HeaderMap, Method, Request, Version};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `Keep-Alive` (legacy, still sent by old clients).
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection` (legacy, still sent by old clients).
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers that are never forwarded (besides those named in `Connection`).
/// Held as parsed names: removing by `&str` would parse and validate each name again on
/// every request, both ways (it was a fifth of the proxy's instructions per request).
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ]
}

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

/// Who the request came from, as the forwarding headers tell it. Made once per client
/// connection, with the client's address already formatted for the headers, so a
/// keep-alive connection's requests do not format it again each.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The client's address (from the socket, or from a PROXY protocol header).
    pub client: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The peer is a trusted proxy: its forwarding headers are kept and appended to.
    pub trusted: bool,
    /// The client's IP (IPv4-mapped IPv6 as IPv4), as `X-Forwarded-For` carries it.
    for_ip: HeaderValue,
    /// The RFC 7239 node of the client's IP, as `Forwarded: for=` carries it.
    for_node: String,
}

impl Origin {
    /// The origin of a client connection from `client`.
    pub fn new(client: SocketAddr, proto: &'static str, trusted: bool) -> Self {
        let ip = match client.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let text = ip_text(ip);
        Self {
            client,
            proto,
            trusted,
            for_node: match ip {
                IpAddr::V4(_) => text.clone(),
                IpAddr::V6(_) => format!("\"[{text}]\""),
            },
            // An IP's text is always a valid header value.
            for_ip: HeaderValue::try_from(text)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        }
    }
}

/// Everything the HTTP path changes in a client's request before it goes to a backend:
/// `Host` from the target's authority where there is one (see [`host_of`]; backends speak
/// HTTP/1.1, so an HTTP/2 request's `:authority` becomes its `Host`), an absolute-form
/// `OPTIONS` with an empty path made `OPTIONS *` (see [`sent_without_path`]), the
/// hop-by-hop headers removed (`Upgrade` kept when `upgrade`), the forwarding headers set,
/// and the version 1.1. The rest of the absolute form (scheme and authority) comes off in
/// [`client::origin_form`](super::client::origin_form), just before the send.
/// One function so the fuzz target (`fuzz/fuzz_targets/http_request.rs`) runs exactly it.
pub fn rewrite_request<B>(req: &mut Request<B>, origin: &Origin, upgrade: bool) {
    let host = host_of(req.headers(), req.uri());
    let from_target = req.uri().authority().is_some();
    // RFC 9112 §3.2.4: the last proxy sends `OPTIONS http://h:80` on as `OPTIONS *` (and
    // `OPTIONS http://h:80/` as `OPTIONS /`). Only an HTTP/1 request line can tell the two
    // apart; HTTP/2 has `:path` `*` for the first.
    if req.method() == Method::OPTIONS
        && (req.version() == Version::HTTP_11 || req.version() == Version::HTTP_10)
        && sent_without_path(req.uri())
    {
        *req.uri_mut() = hyper::Uri::from_static("*");
    }
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // After the strip: `Connection: host` must not take the client's Host away (found by
    // the fuzz target; the backend then saw no Host at all).
    // Exactly one Host goes on: the target's authority, replacing whatever Host came with
    // it, or else the client's one Host. Several never get here: [`check_host`] answers
    // them 400 first.
    if from_target || req.headers().get_all(HOST).iter().count() != 1 {
        if let Some(h) = &host {
            req.headers_mut().insert(HOST, h.clone());
        }
    }
    set_forwarded(req.headers_mut(), origin, host.as_ref());
    *req.version_mut() = Version::HTTP_11;
}

/// Whether an absolute-form target was sent with an empty path (`http://h:80`, not
/// `http://h:80/`, nor `http://h:80?q`).
///
/// The `http` crate reads both `http://h:80` and `http://h:80/` as the path `/` and keeps
/// no flag of which was sent. What tells them apart is where that `/` lives: a path that
/// was sent is a slice of the same bytes as the authority, starting right where the
/// authority ends (hyper hands the parser the request line's bytes, and the parser slices
/// them without copying), while the `/` made up for an empty path is a static string.
/// A URI put together from parts (HTTP/2's pseudo-headers) has its path elsewhere too,
/// so the caller asks this of HTTP/1 request lines only.
///
/// Should a later `http` copy the path out instead, every path would look made up: the
/// same parse of a static `http://a/` is checked first, and if its path is not right after
/// its authority either, this answers `false` (`OPTIONS /`, as before) rather than turn
/// every `OPTIONS http://h/` into `OPTIONS *`.
pub fn sent_without_path(uri: &hyper::Uri) -> bool {
    fn path_follows_authority(uri: &hyper::Uri) -> Option<bool> {
        let authority = uri.authority()?.as_str();
        let path = uri.path_and_query()?.as_str();
        // Addresses compared, never dereferenced: no byte outside either slice is read.
        Some(path.as_ptr() as usize == authority.as_ptr() as usize + authority.len())
    }
    if uri.scheme().is_none() || uri.path_and_query().map(|p| p.as_str()) != Some("/") {
        return false;
    }
    let slices = path_follows_authority(&hyper::Uri::from_static("http://a/")) == Some(true);
    slices && path_follows_authority(uri) == Some(false)
}

/// Why a request's `Host` is refused (RFC 9112 §3.2: a server MUST answer 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHost {
    /// More than one `Host` field line. Which one a backend would use is its own choice,
    /// and one that differs from ours (`X-Forwarded-Host`, the pick of a virtual host) is
    /// how requests are smuggled past a proxy's rules (found by the fuzz target).
    #[error("more than one Host field")]
    Several,
    /// A `Host` that is not `uri-host [":" port]` (RFC 9110 §7.2).
    #[error("invalid Host value")]
    Invalid,
    /// An HTTP/1.1 request with no `Host` (HTTP/1.0 may omit it; HTTP/2 has
    /// `:authority`).
    #[error("no Host field in an HTTP/1.1 request")]
    Missing,
}

/// Checks the request's `Host` fields as RFC 9112 §3.2 asks of a server: exactly one in
/// HTTP/1.1 (at most one otherwise), and a valid `uri-host [":" port]`. The caller answers
/// 400 and closes on an error, as nginx and HAProxy do.
///
/// The same with an absolute-form target (`GET http://a.test/ HTTP/1.1`), whose authority
/// then names the host and whose `Host` value is ignored and replaced ([`host_of`], RFC
/// 9112 §3.2.2): the 400 of §3.2 is for "any HTTP/1.1 request message" that lacks Host or
/// has several or an invalid one, with no exception for the absolute form, and nginx
/// answers so too (it takes the host from the request line, yet still refuses an HTTP/1.1
/// request with no, two or an invalid Host). A valid Host that differs from the authority
/// is let through and replaced, as nginx does and §3.2.2 says ("MUST ignore"); HAProxy
/// answers that 400, which guards a next hop that might read the Host instead, and here
/// the next hop never sees the client's Host at all.
pub fn check_host<B>(req: &Request<B>) -> Result<(), BadHost> {
    let mut fields = req.headers().get_all(HOST).iter();
    match (fields.next(), fields.next()) {
        (Some(_), Some(_)) => Err(BadHost::Several),
        (Some(v), None) if !is_host(v.as_bytes()) => Err(BadHost::Invalid),
        (Some(_), None) => Ok(()),
        (None, _) if req.version() == Version::HTTP_11 => Err(BadHost::Missing),
        (None, _) => Ok(()),
    }
}

/// A request-target refused with 400 (RFC 9112 §3.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    /// The asterisk form (`*`) with a method other than OPTIONS: it names the server, and
    /// only OPTIONS asks about the server as a whole.
    #[error("request-target * with a method other than OPTIONS")]
    Asterisk,
    /// A target's authority (absolute-form, CONNECT's authority-form, HTTP/2's
    /// `:authority`) that is not `uri-host [":" port]`: it becomes the request's `Host`
    /// ([`host_of`]), which must be valid. Userinfo (`http://user@h/`) is the usual case:
    /// RFC 9110 §4.2.4 has a recipient treat it as an error, and nginx answers it 400.
    #[error("request-target authority is not a valid host")]
    Authority,
}

/// Checks the request-target's form: `*` only for OPTIONS, which goes to the backend as
/// `OPTIONS *`, as HAProxy passes it (nginx refuses it outright, which leaves a backend
/// that implements server-wide OPTIONS unreachable through the proxy); an authority in
/// the target only if it can be the `Host` sent on.
pub fn check_target<B>(req: &Request<B>) -> Result<(), BadTarget> {
    let uri = req.uri();
    let asterisk = uri.authority().is_none() && uri.path() == "*";
    if asterisk && req.method() != Method::OPTIONS {
        return Err(BadTarget::Asterisk);
    }
    if uri
        .authority()
        .is_some_and(|a| !is_host(a.as_str().as_bytes()))
    {
        return Err(BadTarget::Authority);
    }
    Ok(())
}

/// Whether `v` is `uri-host [":" port]` (RFC 3986 §3.2.2–3.2.3), or empty (what a client
/// sends for a target with no authority, RFC 9112 §3.2), leaving out percent-escapes in a
/// host name: no DNS name has them, and the `http` crate refuses them in an authority (the
/// fuzz target checks that every Host let through is an authority to it). Hand-written:
/// that parser also takes userinfo (`a@b`), and this runs on every request, so it is one
/// pass over the bytes with no allocation.
pub fn is_host(v: &[u8]) -> bool {
    let unreserved_or_sub = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
    let (rest, ok_host) = if let Some(inner) = v.strip_prefix(b"[") {
        // IP-literal: an IPv6 address or IPvFuture; the address itself is checked by
        // parsing, IPvFuture only by its characters.
        let Some(end) = inner.iter().position(|&b| b == b']') else {
            return false;
        };
        let lit = &inner[..end];
        let ok = match lit.first() {
            Some(b'v' | b'V') => {
                lit.len() > 1 && lit.iter().all(|&b| unreserved_or_sub(b) || b == b':')
            }
            _ => std::str::from_utf8(lit)
                .ok()
                .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                .is_some(),
        };
        (&inner[end + 1..], ok)
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let (name, rest) = v.split_at(end);
        (rest, name.iter().all(|&b| unreserved_or_sub(b)))
    };
    // port = *DIGIT; more than 5 digits cannot be a port number.
    ok_host
        && match rest.strip_prefix(b":") {
            None => rest.is_empty(),
            Some(port) => port.len() <= 5 && port.iter().all(u8::is_ascii_digit),
        }
}

/// Removes the hop-by-hop headers and every header named in `Connection`. With
/// `upgrade`, `Upgrade` survives and `Connection: upgrade` is set again, so the backend
/// sees the upgrade request (or the client the backend's 101).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names (an enum compare each
    // for standard headers) instead of seven hashed removes.
    let hop = hop_by_hop();
    if !headers.keys().any(|k| hop.contains(&k)) {
        return;
    }
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
    for name in hop {
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
    let forwarding = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &FORWARDED,
    ];
    if !origin.trusted && headers.keys().any(|k| forwarding.contains(&k)) {
        for name in forwarding {
            headers.remove(name);
        }
    }
    // Up to four headers more: room for all of them at once. hyper sizes a connection's
    // first request map for the headers it parsed, so a short request grew (and
    // rehashed) its map more than once here. A map that cannot grow fails the same way at
    // the first insert below.
    let _ = headers.try_reserve(4);
    if headers.contains_key(&X_FORWARDED_FOR) {
        append(headers, &X_FORWARDED_FOR, origin.for_ip.as_bytes());
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), origin.for_ip.clone());
    }
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
    let host = host.and_then(|h| h.to_str().ok());
    let mut element = String::with_capacity(
        "for=;host=\"\";proto=".len()
            + origin.for_node.len()
            + host.map_or(0, |h| 2 * h.len())
            + origin.proto.len(),
    );
    element.push_str("for=");
    element.push_str(&origin.for_node);
    if let Some(host) = host {
        element.push_str(";host=");
        push_quoted(&mut element, host);
    }
    element.push_str(";proto=");
    element.push_str(origin.proto);
    if headers.contains_key(FORWARDED) {
        append(headers, &FORWARDED, element.as_bytes());
    } else if let Ok(v) = HeaderValue::try_from(element) {
        headers.insert(FORWARDED, v);
    }
}

/// The request's host: the target's authority if it has one, or else `Host`. The
/// authority wins wherever both came: RFC 9112 §3.2.2 has a server ignore the Host of an
/// absolute-form request (`GET http://a.test/ HTTP/1.1`) and use the target's, RFC 9113
/// §8.3.1 has an intermediary make an HTTP/2 request's Host from `:authority`, and a
/// CONNECT's authority-form target is its host by definition (§3.2.3).
pub fn host_of(headers: &HeaderMap, uri: &hyper::Uri) -> Option<HeaderValue> {
    uri.authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| headers.get(HOST).cloned())
}

/// Appends `value` to the (comma-separated) header `name`, merging repeated fields.
fn append(headers: &mut HeaderMap, name: &HeaderName, value: &[u8]) {
    let mut joined = Vec::new();
    for v in headers.get_all(name).iter().filter(|v| v.to_str().is_ok()) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value);
    if let Ok(v) = HeaderValue::try_from(joined) {
        headers.insert(name.clone(), v);
    }
}

/// `ip` as text. IPv4 by hand: the formatter's padding machinery made `to_string` the
/// largest cost of a new client connection after the syscalls.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// Pushes `value` as an RFC 7230 token if it is one, else as a quoted-string.
fn push_quoted(out: &mut String, value: &str) {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.is_empty() && value.bytes().all(is_tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(client: &str, trusted: bool) -> Origin {
        Origin::new(client.parse().unwrap(), "http", trusted)
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
    fn several_hosts_are_refused() {
        // Found by fuzz/fuzz_targets/http_request.rs: the backend saw both Host fields
        // while X-Forwarded-Host named the first.
        let mut req = Request::new(());
        let h = req.headers_mut();
        h.append(HOST, HeaderValue::from_static("first.test"));
        h.append(HOST, HeaderValue::from_static("second.test:8443"));
        assert_eq!(check_host(&req), Err(BadHost::Several));
        // The same name twice is still two fields.
        let mut req = Request::new(());
        req.headers_mut()
            .append(HOST, HeaderValue::from_static("a"));
        req.headers_mut()
            .append(HOST, HeaderValue::from_static("a"));
        assert_eq!(check_host(&req), Err(BadHost::Several));
    }

    #[test]
    fn one_valid_host_is_required_in_http_1_1() {
        let with = |version, host: Option<&'static [u8]>| {
            let mut req = Request::new(());
            *req.version_mut() = version;
            if let Some(h) = host {
                req.headers_mut()
                    .insert(HOST, HeaderValue::from_bytes(h).unwrap());
            }
            check_host(&req)
        };
        assert_eq!(with(Version::HTTP_11, None), Err(BadHost::Missing));
        assert_eq!(with(Version::HTTP_10, None), Ok(()));
        assert_eq!(with(Version::HTTP_2, None), Ok(()));
        for good in [
            &b"example.test"[..],
            b"example.test:8443",
            b"127.0.0.1:80",
            b"[2001:db8::1]:443",
            b"[::1]",
            b"[v7.x:y]",
            b"xn--caf-dma.test",
            b"a:",
            b"",
        ] {
            assert_eq!(with(Version::HTTP_11, Some(good)), Ok(()), "{good:?}");
        }
        for bad in [
            &b"user@example.test"[..],
            b"a b",
            b"a\"b",
            b"caf\xe9",
            b"a/b",
            b"a:b",
            b"a:123456",
            b"a:1:2",
            b"[2001:db8::1",
            b"[not-v6]",
            b"[::1]x",
            b"a%2E",
            b"a%zz",
        ] {
            assert_eq!(
                with(Version::HTTP_11, Some(bad)),
                Err(BadHost::Invalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_asterisk_form_is_for_options_only() {
        use hyper::Uri;
        let req = |method: Method, uri: &'static str| {
            let mut r = Request::new(());
            *r.method_mut() = method;
            *r.uri_mut() = Uri::from_static(uri);
            r.headers_mut()
                .insert(HOST, HeaderValue::from_static("a.test"));
            r
        };
        assert_eq!(check_target(&req(Method::OPTIONS, "*")), Ok(()));
        assert_eq!(
            check_target(&req(Method::GET, "*")),
            Err(BadTarget::Asterisk)
        );
        assert_eq!(check_target(&req(Method::GET, "/")), Ok(()));
        // `*` goes on untouched (client::origin_form then leaves it as it is).
        let mut r = req(Method::OPTIONS, "*");
        rewrite_request(&mut r, &origin("10.0.0.7:5000", false), false);
        assert_eq!(r.uri(), "*");
    }

    /// `method target`, as hyper hands it over (`Host: other.test` unless `host` is None),
    /// rewritten and then made origin-form as [`super::super::client::Balance`] sends it.
    fn forwarded(
        method: Method,
        target: &str,
        version: Version,
        host: Option<&'static str>,
    ) -> Request<()> {
        let mut r = Request::new(());
        *r.method_mut() = method;
        // From bytes, as hyper parses a request line (a `Bytes` of the whole head).
        *r.uri_mut() = hyper::Uri::try_from(target.as_bytes()).unwrap();
        *r.version_mut() = version;
        if let Some(h) = host {
            r.headers_mut().insert(HOST, HeaderValue::from_static(h));
        }
        rewrite_request(&mut r, &origin("10.0.0.7:5000", false), false);
        super::super::client::origin_form(&mut r);
        r
    }

    #[test]
    fn an_absolute_form_target_names_the_host() {
        // RFC 9112 §3.2.2: the target's authority, not the client's Host, is the host;
        // the backend gets it as Host, and the path and query in origin-form.
        let r = forwarded(
            Method::GET,
            "http://example.com:8080/path?q=1",
            Version::HTTP_11,
            Some("other.test"),
        );
        assert_eq!(r.uri(), "/path?q=1");
        assert_eq!(r.headers().get_all(HOST).iter().count(), 1);
        assert_eq!(r.headers()[HOST], "example.com:8080");
        assert_eq!(r.headers()[&X_FORWARDED_HOST], "example.com:8080");
        assert_eq!(
            r.headers()[FORWARDED],
            "for=10.0.0.7;host=\"example.com:8080\";proto=http"
        );
        // HTTP/1.0 may send no Host: the authority still becomes one.
        let r = forwarded(Method::GET, "http://a.test/", Version::HTTP_10, None);
        assert_eq!(r.uri(), "/");
        assert_eq!(r.headers()[HOST], "a.test");
        // `Connection: host` takes the client's Host, never the target's.
        let mut r = Request::new(());
        *r.uri_mut() = hyper::Uri::from_static("http://a.test/x");
        r.headers_mut()
            .insert(HOST, HeaderValue::from_static("other.test"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("host"));
        rewrite_request(&mut r, &origin("10.0.0.7:5000", false), false);
        assert_eq!(r.headers()[HOST], "a.test");
        // Origin-form keeps the client's Host (the HTTP/1.1 case of every browser).
        let r = forwarded(Method::GET, "/p", Version::HTTP_11, Some("other.test"));
        assert_eq!(r.uri(), "/p");
        assert_eq!(r.headers()[HOST], "other.test");
    }

    #[test]
    fn absolute_form_hosts_are_checked_as_any_and_userinfo_is_refused() {
        let req = |target: &'static str, host: Option<&'static str>| {
            let mut r = Request::new(());
            *r.uri_mut() = hyper::Uri::from_static(target);
            if let Some(h) = host {
                r.headers_mut().insert(HOST, HeaderValue::from_static(h));
            }
            r
        };
        // Host is still required, once and valid (RFC 9112 §3.2, as nginx), but a Host
        // other than the authority is no error: it is replaced.
        assert_eq!(check_host(&req("http://a.test/", Some("b.test"))), Ok(()));
        assert_eq!(
            check_host(&req("http://a.test/", None)),
            Err(BadHost::Missing)
        );
        assert_eq!(
            check_host(&req("http://a.test/", Some("b c"))),
            Err(BadHost::Invalid)
        );
        // The authority becomes the Host sent on, so it must be a valid one.
        assert_eq!(
            check_target(&req("http://a.test:81/", Some("a.test"))),
            Ok(())
        );
        assert_eq!(
            check_target(&req("http://[::1]:81/", Some("a.test"))),
            Ok(())
        );
        assert_eq!(
            check_target(&req("http://user@a.test/", Some("a.test"))),
            Err(BadTarget::Authority)
        );
        assert_eq!(
            check_target(&req("http://user:pw@a.test/", Some("a.test"))),
            Err(BadTarget::Authority)
        );
    }

    #[test]
    fn options_with_an_empty_path_goes_on_as_asterisk() {
        // RFC 9112 §3.2.4: `OPTIONS http://h:80` is `OPTIONS *` to the origin server, and
        // `OPTIONS http://h:80/` stays `/`.
        let options = |target| forwarded(Method::OPTIONS, target, Version::HTTP_11, Some("x"));
        let r = options("http://h.test:80");
        assert_eq!(r.uri(), "*");
        assert_eq!(r.headers()[HOST], "h.test:80");
        assert_eq!(options("http://h.test:80/").uri(), "/");
        assert_eq!(options("http://h.test:80?q").uri(), "/?q");
        assert_eq!(options("http://h.test:80/p?q").uri(), "/p?q");
        assert_eq!(options("*").uri(), "*");
        assert_eq!(options("/").uri(), "/");
        let r = forwarded(Method::OPTIONS, "http://h.test", Version::HTTP_10, None);
        assert_eq!(r.uri(), "*");
        // Only OPTIONS: any other method's empty path is `/`.
        let r = forwarded(Method::GET, "http://h.test:80", Version::HTTP_11, Some("x"));
        assert_eq!(r.uri(), "/");
        // HTTP/2 sends `:path: *` for that and `:path: /` for `/`: its `/` stays.
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(hyper::http::uri::Scheme::HTTPS);
        parts.authority = Some(hyper::http::uri::Authority::from_static("h.test"));
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
        let mut r = Request::new(());
        *r.method_mut() = Method::OPTIONS;
        *r.uri_mut() = hyper::Uri::from_parts(parts).unwrap();
        *r.version_mut() = Version::HTTP_2;
        rewrite_request(&mut r, &origin("10.0.0.7:5000", false), false);
        super::super::client::origin_form(&mut r);
        assert_eq!(r.uri(), "/");
    }

    #[test]
    fn an_empty_path_is_told_from_a_slash_however_the_uri_was_parsed() {
        // What `sent_without_path` leans on (the `http` crate's slicing), from each way a
        // URI is parsed from bytes.
        for target in ["http://h.test:80", "https://[::1]", "http://h.test#f"] {
            assert!(
                sent_without_path(&hyper::Uri::try_from(target).unwrap()),
                "{target}"
            );
            let owned = hyper::Uri::try_from(target.as_bytes().to_vec()).unwrap();
            assert!(sent_without_path(&owned), "{target}");
        }
        for target in [
            "http://h.test:80/",
            "http://h.test/?",
            "http://h.test?q",
            "/",
            "*",
            "h.test:443",
        ] {
            assert!(
                !sent_without_path(&hyper::Uri::try_from(target).unwrap()),
                "{target}"
            );
            let owned = hyper::Uri::try_from(target.as_bytes().to_vec()).unwrap();
            assert!(!sent_without_path(&owned), "{target}");
        }
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
    fn ipv4_text_matches_the_standard_formatter() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.99.100.255",
            "255.255.255.255",
            "127.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_text(v6), "2001:db8::1");
    }

    #[test]
    fn a_host_with_quotes_is_escaped_in_forwarded() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("a\"b\\c");
        set_forwarded(&mut h, &origin("10.0.0.7:5000", false), Some(&host));
        assert_eq!(h[FORWARDED], "for=10.0.0.7;host=\"a\\\"b\\\\c\";proto=http");
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
