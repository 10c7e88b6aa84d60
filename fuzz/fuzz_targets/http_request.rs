//! Fuzzes what the HTTP path (`--protocol http`) does to a request between hyper's parser
//! and the backend: `headers::check_target` (the 400 for `*` but with OPTIONS, and for a
//! target's authority that cannot be a Host) and
//! `headers::check_host` (the 400 for several, invalid or, in HTTP/1.1, missing Host
//! fields), then on the requests it lets through `upgrade::requested`,
//! `headers::rewrite_request` (Host from the
//! target's authority, `OPTIONS *` for an absolute-form OPTIONS with no path, hop-by-hop and `Connection`-named headers removed, `Upgrade` kept for an
//! upgrade, `X-Forwarded-*` and `Forwarded` set, trusted or not), `client::origin_form`
//! (the URI sent to the backend), and `headers::strip_hop_by_hop` on the same headers as a
//! backend's response.
//!
//! Input: byte 0 holds flags (bit 0: the peer is a trusted proxy; bits 1–2: the client
//! address, IPv4, IPv6, IPv4-mapped or loopback; bit 3: https; bit 4: the response is a
//! 101). The rest is a request head as text: `METHOD URI VERSION` on the first line
//! (`HTTP/1.0`, `HTTP/2`; anything else is HTTP/1.1), then `name: value` lines (`\r`
//! optional). A method, URI, name or value that `http` refuses is left out, as hyper would
//! never hand it over.
//!
//! Checks besides "no panic", against the head as sent:
//! - `check_target` refuses exactly the asterisk form with a method other than OPTIONS
//!   and a target whose authority `headers::is_host` refuses; an authority it lets through
//!   has no userinfo and reads back as the authority of an `http://AUTHORITY/` URI;
//! - `check_host` refuses every request with more than one Host field and every HTTP/1.1
//!   request with none, and lets through HTTP/1.0 and HTTP/2 ones with none; a single
//!   Host it lets through reads back as the authority of an `http://HOST/` URI with no
//!   userinfo; nothing else is checked on a refused request (it gets a 400, never
//!   reaching a backend);
//! - no hop-by-hop header and no header named in any `Connection` field survives (but
//!   `Upgrade` with `Connection: upgrade` on an upgrade), and every other header is
//!   passed on unchanged;
//! - `Host` is the target's authority if it has one (RFC 9112 §3.2.2), or else the
//!   client's `Host`;
//! - `X-Forwarded-For` is one field ending in the client address, replacing a client's
//!   own or appended to a trusted proxy's; `X-Forwarded-Proto` likewise;
//! - `Forwarded` ends in an element for the client whose `host=` reads back to the host;
//! - the request-target sent on is origin-form with the path and query kept, or `*` and
//!   CONNECT's authority as sent, or `*` for an HTTP/1 OPTIONS whose absolute-form target
//!   had nothing after the authority (but a fragment) in the bytes sent.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderName, HeaderValue, CONNECTION, FORWARDED, HOST, UPGRADE};
use hyper::{HeaderMap, Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use proxy::http::client;
use proxy::http::headers::{self, Origin, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use proxy::http::upgrade;

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
/// Headers the rewrite sets itself, whatever the client named in `Connection`.
const SET_BY_US: [&str; 5] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];
const CLIENTS: [&str; 4] = [
    "192.0.2.10:40000",
    "[2001:db8::7]:40000",
    "[::ffff:198.51.100.3]:40000",
    "127.0.0.1:1",
];

/// The request-target's bytes in the head's first line.
fn raw_target(head: &[u8]) -> &[u8] {
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    first.splitn(3, |&b| b == b' ').nth(1).unwrap_or_default()
}

/// Whether `uri`, parsed from `raw`, is absolute-form with nothing after its authority in
/// the bytes themselves (a fragment aside, which is no part of a path): what RFC 9112
/// §3.2.4 sends on as `OPTIONS *`. Read from the bytes, not from `uri` (which shows `/`).
fn raw_path_empty(uri: &Uri, raw: &[u8]) -> bool {
    let (Some(_), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return false;
    };
    let Some(start) = raw.windows(3).position(|w| w == b"://") else {
        return false;
    };
    let rest = &raw[start + 3..];
    let authority = authority.as_str().as_bytes();
    assert!(rest.starts_with(authority), "authority {authority:?} not at {rest:?}");
    let after = &rest[authority.len()..];
    after.is_empty() || after[0] == b'#'
}

/// The request hyper would have handed over for this head.
fn request(head: &[u8]) -> Request<()> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut req = Request::new(());
    if let Some(first) = lines.next() {
        let mut parts = first.splitn(3, |&b| b == b' ');
        if let Some(m) = parts.next().and_then(|m| Method::from_bytes(m).ok()) {
            *req.method_mut() = m;
        }
        if let Some(u) = parts.next().and_then(|u| Uri::try_from(u).ok()) {
            *req.uri_mut() = u;
        }
        *req.version_mut() = match parts.next() {
            Some(b"HTTP/1.0") => Version::HTTP_10,
            Some(b"HTTP/2") => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    req
}

/// The header names listed in the `Connection` fields (RFC 9110 §7.6.1), read from the
/// raw bytes: a field the rewrite cannot read as text still names headers.
fn named_in_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect()
}

fn values(h: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    h.get_all(name).iter().cloned().collect()
}

/// The comma-joined text of the fields of `name` the rewrite can read as text.
fn joined_text(h: &HeaderMap, name: &HeaderName) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect()
}

/// Checks that hop-by-hop headers are gone from `after` and the rest kept from `before`.
fn check_hop_by_hop(before: &HeaderMap, after: &HeaderMap, upgrade: bool, exempt: &[&str]) {
    let named = named_in_connection(before);
    let upgrade_kept = upgrade && before.contains_key(UPGRADE);
    for name in after.keys() {
        let s = name.as_str();
        if exempt.contains(&s) {
            continue;
        }
        if upgrade_kept && (name == UPGRADE || name == CONNECTION) {
            continue;
        }
        assert!(!HOP_BY_HOP.contains(&s), "hop-by-hop {s} survived");
        assert!(!named.contains(name), "{s}, named in Connection, survived");
    }
    if upgrade_kept {
        assert_eq!(after.get_all(UPGRADE).iter().count(), 1);
        assert_eq!(after.get(UPGRADE), before.get(UPGRADE));
        assert_eq!(values(after, &CONNECTION), [HeaderValue::from_static("upgrade")]);
    }
    for name in before.keys() {
        let s = name.as_str();
        if HOP_BY_HOP.contains(&s) || named.contains(name) || exempt.contains(&s) {
            continue;
        }
        assert_eq!(values(before, name), values(after, name), "{s} changed");
    }
}

/// The value of `host=` in a `Forwarded` element, unquoted.
fn forwarded_host(element: &str) -> Option<String> {
    let start = element.find(";host=")? + ";host=".len();
    let rest = &element[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(rest.split(';').next()?.to_owned())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let trusted = flags & 1 != 0;
    let client: SocketAddr = CLIENTS[usize::from(flags >> 1) & 3].parse().unwrap();
    let proto = if flags & 8 != 0 { "https" } else { "http" };
    let switching = flags & 16 != 0;
    let origin = Origin::new(client, proto, trusted);
    let ip = match client.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client.ip(), IpAddr::V4),
        v4 => v4,
    };

    let original = request(head);
    let before = original.headers().clone();

    // The asterisk form: only OPTIONS; an authority: only one that can be the Host (a 400
    // otherwise, never reaching a backend).
    let asterisk = original.uri().authority().is_none() && original.uri().path() == "*";
    let authority = original.uri().authority().map(|a| a.as_str().to_owned());
    let bad_authority = authority.as_ref().is_some_and(|a| !headers::is_host(a.as_bytes()));
    match headers::check_target(&original) {
        Err(headers::BadTarget::Asterisk) => {
            assert!(asterisk && original.method() != Method::OPTIONS, "refused {}", original.uri());
            return;
        }
        Err(headers::BadTarget::Authority) => {
            assert!(bad_authority, "refused {}", original.uri());
            return;
        }
        Ok(()) => {
            assert!(!asterisk || original.method() == Method::OPTIONS);
            assert!(!bad_authority, "let through {}", original.uri());
            if let Some(a) = &authority {
                assert!(!a.contains('@'), "userinfo in the authority let through: {a:?}");
                let uri = Uri::try_from(format!("http://{a}/"))
                    .unwrap_or_else(|e| panic!("authority {a:?} let through is no Host: {e}"));
                assert_eq!(uri.authority().map(|x| x.as_str()), Some(a.as_str()));
            }
        }
    }

    // Host fields: what is refused never reaches the rewrite.
    let hosts = values(&before, &HOST);
    match headers::check_host(&original) {
        Err(e) => {
            let expected = match hosts.len() {
                0 => headers::BadHost::Missing,
                1 => headers::BadHost::Invalid,
                _ => headers::BadHost::Several,
            };
            assert_eq!(e, expected, "refused with {hosts:?}");
            if hosts.is_empty() {
                assert_eq!(original.version(), Version::HTTP_11, "refused with no Host");
            }
            return;
        }
        Ok(()) => {
            assert!(hosts.len() <= 1, "several Host fields let through: {hosts:?}");
            assert!(
                !hosts.is_empty() || original.version() != Version::HTTP_11,
                "an HTTP/1.1 request with no Host let through"
            );
            if let Some(h) = hosts.first().filter(|h| !h.is_empty()) {
                let text = h.to_str().expect("a valid Host is text");
                assert!(!text.contains('@'), "userinfo in Host let through: {text:?}");
                let uri = Uri::try_from(format!("http://{text}/"))
                    .unwrap_or_else(|e| panic!("Host {text:?} let through is no authority: {e}"));
                assert_eq!(uri.authority().map(|a| a.as_str()), Some(text));
            }
        }
    }
    let named = named_in_connection(&before);
    let kept = |n: &HeaderName| trusted && !named.contains(n);
    let host = authority
        .as_ref()
        .and_then(|a| HeaderValue::from_str(a).ok())
        .or_else(|| before.get(HOST).cloned());
    let to_asterisk = original.method() == Method::OPTIONS
        && original.version() != Version::HTTP_2
        && raw_path_empty(original.uri(), raw_target(head));

    let mut req = request(head);
    let upgrading = upgrade::requested(&req);
    headers::rewrite_request(&mut req, &origin, upgrading);
    let after = req.headers();
    assert_eq!(req.version(), Version::HTTP_11);
    assert_eq!(req.method(), original.method());
    if to_asterisk {
        assert_eq!(req.uri(), "*", "OPTIONS {}", original.uri());
    } else {
        assert_eq!(req.uri(), original.uri());
    }
    check_hop_by_hop(&before, after, upgrading, &SET_BY_US);

    // Host.
    assert_eq!(after.get(HOST), host.as_ref(), "Host is not the target's or the client's");
    if let Some(h) = &host {
        assert_eq!(after.get_all(HOST).iter().count(), 1);
        if !kept(&X_FORWARDED_HOST) || !before.contains_key(&X_FORWARDED_HOST) {
            assert_eq!(values(after, &X_FORWARDED_HOST), [h.clone()]);
        }
    }

    // X-Forwarded-For: one field, ending in the client.
    let xff = values(after, &X_FORWARDED_FOR);
    assert_eq!(xff.len(), 1, "X-Forwarded-For fields: {xff:?}");
    let xff = xff[0].to_str().expect("X-Forwarded-For is text");
    let mut expected = if kept(&X_FORWARDED_FOR) {
        joined_text(&before, &X_FORWARDED_FOR)
    } else {
        Vec::new()
    };
    expected.push(ip.to_string());
    assert_eq!(xff, expected.join(", "), "X-Forwarded-For");

    // X-Forwarded-Proto: a trusted proxy's is kept, anyone else's replaced.
    let xfp = values(after, &X_FORWARDED_PROTO);
    if kept(&X_FORWARDED_PROTO) && before.contains_key(&X_FORWARDED_PROTO) {
        assert_eq!(xfp, values(&before, &X_FORWARDED_PROTO));
    } else {
        assert_eq!(xfp, [HeaderValue::from_static(proto)]);
    }

    // Forwarded: one field, the client's element last, its host reading back.
    let fwd = values(after, &FORWARDED);
    assert_eq!(fwd.len(), 1, "Forwarded fields: {fwd:?}");
    let fwd = fwd[0].to_str().expect("Forwarded is text");
    let prior = if kept(&FORWARDED) {
        joined_text(&before, &FORWARDED)
    } else {
        Vec::new()
    };
    let prefix: String = prior.iter().map(|p| format!("{p}, ")).collect();
    let element = fwd
        .strip_prefix(prefix.as_str())
        .unwrap_or_else(|| panic!("Forwarded {fwd:?} does not start with {prefix:?}"));
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    assert!(element.starts_with(&format!("for={node}")), "{element:?}");
    assert!(element.ends_with(&format!(";proto={proto}")), "{element:?}");
    let host_text = host.as_ref().and_then(|h| h.to_str().ok());
    let without_proto = &element[..element.len() - ";proto=".len() - proto.len()];
    assert_eq!(
        forwarded_host(without_proto).as_deref(),
        host_text,
        "Forwarded host= of {element:?}"
    );

    // The request-target sent to the backend: origin-form (the path and query), but `*`
    // and CONNECT's authority-form as they came.
    client::origin_form(&mut req);
    let uri = original.uri();
    if to_asterisk {
        assert_eq!(req.uri(), "*");
    } else if uri.authority().is_none() || original.method() == Method::CONNECT {
        assert_eq!(req.uri(), uri);
    } else {
        assert!(req.uri().scheme().is_none() && req.uri().authority().is_none(), "{}", req.uri());
        assert_eq!(
            req.uri().path_and_query().map(|p| p.as_str()),
            Some(uri.path_and_query().map_or("/", |p| p.as_str()))
        );
    }

    // The same headers as a backend's response.
    let mut response = before.clone();
    headers::strip_hop_by_hop(&mut response, switching);
    check_hop_by_hop(&before, &response, switching, &[]);
});
