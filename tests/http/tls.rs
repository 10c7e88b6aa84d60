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
