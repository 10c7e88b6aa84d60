//! TLS termination: HTTP/2 and HTTP/1.1 over TLS with curl, the certificate reloaded on
//! SIGHUP while a python `ssl` keep-alive connection stays open, a bad file keeping the old
//! pair, TLS in tcp mode, and bad files at start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::*;

/// A self-signed pair for `localhost`, written as `NAME.crt` and `NAME.key` in `dir`.
fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// `curl` to `https://localhost:PORT/` trusting `ca`, with `flags`; returns (exit code,
/// stdout). `--resolve` keeps every connection on loopback.
fn curl(port: u16, ca: &Path, flags: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(flags)
        .arg(format!("https://localhost:{port}/"))
        .stdin(Stdio::null())
        .output()
        .expect("curl is needed for the TLS tests (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A python `ssl` client on one keep-alive connection: a GET, then another each time a
/// line arrives on stdin. Prints `LOCALPORT STATUS BODY` per request.
const TLS_CLIENT: &str = r#"
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
c = http.client.HTTPSConnection("localhost", int(sys.argv[1]), context=ctx, timeout=20)
def get():
    c.request("GET", "/")
    r = c.getresponse()
    print(c.sock.getsockname()[1], r.status, r.read().decode().strip(), flush=True)
get()
for _ in sys.stdin:
    get()
"#;

#[test]
fn https_serves_http2_and_http1_and_reloads_its_certificate_on_sighup() {
    let dir = TempDir::new("https");
    let (first_cert, first_key) = pair(dir.path(), "first");
    // The master reads live.crt/live.key; a reload copies a new pair over them.
    let (cert, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&first_cert, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--protocol",
        "http",
        "--tls-cert",
        cert_s,
        "--tls-key",
        key_s,
    ]);
    wait_all_ready(&b, 1);
    let port = b.addr().port();
    let (code, out) = curl(port, &cert, &["--http2", "-w", "\n%{http_version}"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("child worker run") && out.ends_with("\n2"),
        "{out:?}"
    );
    let (code, out) = curl(port, &cert, &["--http1.1", "-w", "\n%{http_version}"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("\n1.1"), "{out:?}");

    // A keep-alive connection opened with the first certificate...
    let mut client = Reaped(
        Command::new(python3())
            .arg("-c")
            .arg(TLS_CLIENT)
            .arg(port.to_string())
            .arg(&cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let lines = LineReader::new(client.0.stdout.take().unwrap());
    let first = lines.next();
    assert!(first.contains(" 200 "), "{first}");

    // ...survives a SIGHUP that brings in a second one (same file names, new contents).
    let (cert2, key2) = pair(dir.path(), "second");
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let from = b.lines().len();
    b.signal(libc::SIGHUP);
    b.wait_for_line_from(from, STEP, |l| {
        is_event(l, "SIGHUP: TLS certificate reloaded")
    })
    .unwrap_or_else(|| panic!("no reload line:\n{}", b.dump()));
    let mut stdin = client.0.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let second = lines.next();
    let port_of = |l: &str| l.split(' ').next().unwrap().to_owned();
    assert_eq!(
        port_of(&first),
        port_of(&second),
        "the same connection: {second}"
    );
    assert!(second.contains(" 200 "), "{second}");
    // New handshakes get the new certificate; the old one is no longer accepted by curl.
    assert_eq!(curl(port, &cert2, &["--http2"]).0, 0);
    assert_ne!(curl(port, &first_cert, &[]).0, 0);

    // A bad key file keeps the second pair serving, with one error line.
    std::fs::write(&key, "not a key").unwrap();
    let from = b.lines().len();
    b.signal(libc::SIGHUP);
    b.wait_for_line_from(from, STEP, |l| {
        is_event(l, "SIGHUP: TLS certificate not reloaded; the old one stays")
    })
    .unwrap_or_else(|| panic!("no refusal line:\n{}", b.dump()));
    assert_eq!(curl(port, &cert2, &[]).0, 0);
    drop(stdin);
}

#[test]
fn tls_terminates_in_tcp_mode_too() {
    let dir = TempDir::new("tls-tcp");
    let (cert, key) = pair(dir.path(), "tcp");
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    wait_all_ready(&b, 1);
    let (code, out) = curl(b.addr().port(), &cert, &["--http1.1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("child worker run"), "{out}");
}

/// A blocking TLS connection to `addr` (as `localhost`) trusting the PEM certificate `ca`.
fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).expect("reading the certificate"))
        .expect("trusting the certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
    let tcp = TcpStream::connect(addr).expect("connecting");
    tcp.set_read_timeout(Some(STEP)).expect("read timeout");
    rustls::StreamOwned::new(tls, tcp)
}

/// Sends `GET /` on `s` and reads one whole `Content-Length` response, the connection kept.
fn get(s: &mut impl ReadWriteTls) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("sending a request");
    s.flush().expect("sending a request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if length.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        let n = s.read(&mut buf).expect("reading the response");
        assert!(n > 0, "closed before a whole response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A client stream.
trait ReadWriteTls: Read + Write {}
impl<T: Read + Write> ReadWriteTls for T {}

/// `--idle-timeout` holds on a TLS listener in tcp mode as on a plain one: an answered,
/// then silent keep-alive connection is closed after it, with a `close_notify` (rustls reads
/// `Ok` to the end only after one; a bare FIN is an `UnexpectedEof` error). Before, the TLS
/// path watched no timeout and the connection stayed open.
#[test]
fn tls_in_tcp_mode_closes_an_idle_connection_after_the_idle_timeout() {
    let dir = TempDir::new("tls-idle");
    let (cert, key) = pair(dir.path(), "idle");
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--idle-timeout",
        "1s",
    ]);
    wait_all_ready(&b, 1);
    let mut s = tls_connect(b.addr(), &cert);
    // Before the request: the proxy's idle clock starts when it moves the answer, which is
    // before the client has it, so timing from here never reads short.
    let since = Instant::now();
    let answer = get(&mut s);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    let idle = since.elapsed();
    end.unwrap_or_else(|e| panic!("not closed with a close_notify within {STEP:?}: {e}"));
    assert!(rest.is_empty(), "{rest:?}");
    // Accurate to 1/16 of the timeout; the rest is slack for a loaded machine.
    assert!(
        idle >= Duration::from_millis(950) && idle <= Duration::from_secs(3),
        "--idle-timeout 1s closed after {idle:?}"
    );
}

/// A client that connects to a TLS listener in tcp mode and never sends its ClientHello is
/// closed after `--tls-handshake-timeout`, and its connection permit (`--max-conns 1`: the
/// only one) is free again: the next client is served.
#[test]
fn tls_in_tcp_mode_closes_a_client_that_never_says_hello() {
    let dir = TempDir::new("tls-hello");
    let (cert, key) = pair(dir.path(), "hello");
    let b = Balancer::start(&[
        "--cpus",
        "1",
        "--max-conns",
        "1",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-handshake-timeout",
        "500ms",
    ]);
    wait_all_ready(&b, 1);
    // Before the connect: the proxy's handshake clock starts at its accept, which may come
    // before `connect` returns here.
    let since = Instant::now();
    let mut silent = TcpStream::connect(b.addr()).expect("connecting");
    silent.set_read_timeout(Some(STEP)).expect("read timeout");
    let mut byte = [0u8; 1];
    match silent.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the silent client was not closed within {STEP:?}: {other:?}"),
    }
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited <= Duration::from_secs(3),
        "--tls-handshake-timeout 500ms closed after {waited:?}"
    );
    let mut next = tls_connect(b.addr(), &cert);
    let answer = get(&mut next);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn tls_handshake_timeout_is_refused_in_http_mode() {
    let dir = TempDir::new("tls-hello-http");
    let (cert, key) = pair(dir.path(), "http");
    let out = Command::new(env!("CARGO_BIN_EXE_balancer"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cpus",
            "1",
            "--protocol",
            "http",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(["--tls-handshake-timeout", "1s"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--tls-handshake-timeout is for --protocol tcp"),
        "{err}"
    );
}

#[test]
fn missing_or_unparsable_tls_files_are_one_error_line() {
    let dir = TempDir::new("tls-bad");
    let (cert, _) = pair(dir.path(), "ok");
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nnot base64\n").unwrap();
    let missing = dir.path().join("missing.crt");
    for (c, k) in [(&missing, &garbage), (&cert, &garbage)] {
        let out = Command::new(env!("CARGO_BIN_EXE_balancer"))
            .args(["--listen", "127.0.0.1:0", "--cpus", "1", "--tls-cert"])
            .arg(c)
            .arg("--tls-key")
            .arg(k)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("balancer: error:"))
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains("loading --tls-cert/--tls-key"), "{err}");
        assert!(
            !err.contains("worker spawned"),
            "no worker before the files load: {err}"
        );
    }
}

/// A child started by the test, killed and reaped when the test ends, pass or fail.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
