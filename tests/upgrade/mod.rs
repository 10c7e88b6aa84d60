//! In-place master upgrade (#14): SIGUSR2 and `balancer upgrade` re-execute the binary in
//! the same pid, keeping the listeners and the workers. Each test runs a copy of the binary
//! under test from its own directory, so it can replace the file on disk as a deployment
//! would (a new file renamed over the old one), or break it.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::helper::*;
use crate::ops::{assert_one_error_line, run_client};

/// How long one upgrade may take: the pre-flight runs the (debug) binary with `--check`,
/// then the drain and the new image's start, on a loaded 2-core machine.
const UPGRADE: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing left to drain may take.
const EXIT: Duration = Duration::from_secs(15);
/// Pause between two requests of one load thread: a few hundred new connections a second
/// over the two threads, without filling the host's table of TIME_WAIT entries.
const PACE: Duration = Duration::from_millis(2);
/// How long a hesitant load thread waits between its connect and its request: its
/// connection is accepted and silent for most of its life, as a distant client's is for a
/// round trip, so an upgrade's stop nearly always finds one such connection. Longer than
/// the tcp drain's look for idle connections (`proxy::quiesce::LOOK`, 25 ms).
const HESITATE: Duration = Duration::from_millis(50);

/// A directory with a copy of the binary under test at `balancer`.
struct Install {
    dir: TempDir,
}

impl Install {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        std::fs::copy(BIN, dir.path().join("balancer")).expect("copying the binary");
        Install { dir }
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("balancer")
    }

    fn admin(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Replaces the binary the way a deployment does: a new file renamed over it (the
    /// running master's `/proc/self/exe` then says `(deleted)`).
    fn replace(&self, contents: Replacement) {
        let next = self.dir.path().join("balancer.next");
        match contents {
            Replacement::Same => {
                std::fs::copy(BIN, &next).expect("copying the binary");
            }
            Replacement::NotExecutable => {
                std::fs::copy(BIN, &next).expect("copying the binary");
                std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod 644");
            }
            Replacement::Failing => {
                std::fs::write(&next, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n")
                    .expect("writing the failing binary");
                std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod 755");
            }
        }
        std::fs::rename(&next, self.bin()).expect("renaming the new binary into place");
    }

    fn start(&self, args: &[&str]) -> Balancer {
        let admin = self.admin();
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--admin",
            admin.to_str().expect("UTF-8 temp path"),
        ];
        all.extend_from_slice(args);
        Balancer::start_program(&self.bin(), &all)
    }
}

/// What to put in place of the binary.
enum Replacement {
    /// A fresh copy of the binary under test.
    Same,
    /// The binary without its execute bits.
    NotExecutable,
    /// A program that fails at once (its `--check` exits 3).
    Failing,
}

/// Background clients, each sending `GET /` on a new connection per request until stopped
/// (some of them [`HESITATE`] after their connect).
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `prompt` threads that send at once, and `hesitant` ones that send [`HESITATE`]
    /// after their connect.
    fn mixed(addr: std::net::SocketAddr, prompt: usize, hesitant: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..prompt + hesitant)
            .map(|i| {
                let (stop, sent, failures) =
                    (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failures));
                let hesitate = if i < prompt { Duration::ZERO } else { HESITATE };
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        match get_hesitant(addr, "/", hesitate) {
                            Ok((200, _)) => {}
                            other => failures.lock().unwrap().push(format!(
                                "after {:?} (hesitating {hesitate:?}): {other:?}",
                                at.elapsed()
                            )),
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(PACE);
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failures,
            threads,
        }
    }

    /// Stops the clients; returns how many requests they sent and the failures.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits for the log line of the new image's `n`th upgrade; returns its index.
fn expect_upgraded(b: &Balancer, n: u64) -> usize {
    let (at, _) = b.expect_line(0, &format!("upgrade {n}"), UPGRADE, |l| {
        is_event(
            l,
            "upgraded in place: adopting the previous image's listeners and workers",
        ) && field(l, "upgrades") == Some(n.to_string().as_str())
    });
    at
}

/// `/status` over the admin socket, parsed.
fn status(admin: &Path) -> serde_json::Value {
    let admin = admin.to_str().expect("UTF-8 temp path");
    let run = run_client(&["status", "--json", "--admin", admin]);
    assert_eq!(run.code, Some(0), "{run:?}");
    serde_json::from_str(&run.stdout).expect("/status is JSON")
}

/// The worker pids `/status` lists.
fn status_pids(admin: &Path) -> HashSet<u32> {
    let s = status(admin);
    (s["workers"].as_array().expect("workers"))
        .iter()
        .map(|w| w["pid"].as_u64().expect("pid") as u32)
        .collect()
}

#[test]
fn five_upgrades_under_load_fail_no_request_and_keep_every_pid() {
    let install = Install::new("upgrade-five");
    let mut b = install.start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();
    let workers: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(workers.len(), 2, "{}", b.dump());

    // The hesitant thread's connections are accepted and silent when a drain begins.
    let load = Load::mixed(addr, 2, 1);
    assert!(
        wait_until(Duration::from_secs(10), || load
            .sent
            .load(Ordering::Relaxed)
            > 50),
        "the load never got going"
    );
    let started = Instant::now();
    for n in 1..=5 {
        install.replace(Replacement::Same);
        let before = load.sent.load(Ordering::Relaxed);
        b.signal(libc::SIGUSR2);
        expect_upgraded(&b, n);
        // Traffic flows through the new image before the next upgrade.
        assert!(
            wait_until(Duration::from_secs(10), || load
                .sent
                .load(Ordering::Relaxed)
                > before + 100),
            "no requests after upgrade {n}"
        );
        assert!(b.is_running(), "the master exited at upgrade {n}");
        assert_eq!(status_pids(&install.admin()), workers, "after upgrade {n}");
    }
    let elapsed = started.elapsed();
    let (sent, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed over 5 upgrades: {failures:?}\nlog:\n{}",
        failures.len(),
        b.dump()
    );
    eprintln!("5 upgrades in {elapsed:?} under load: {sent} requests, 0 failed");

    let s = status(&install.admin());
    assert_eq!(s["pid"].as_u64(), Some(u64::from(master)));
    assert_eq!(s["upgrades"].as_u64(), Some(5));
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["state"], "ready", "{s:#}");
        assert_eq!(w["restarts"].as_u64(), Some(0), "{s:#}");
    }
    // Every request was served by the original workers.
    let answering: HashSet<u32> = (0..4).map(|_| body_pid(&get_ok(addr, "/"))).collect();
    assert!(
        answering.is_subset(&workers),
        "{answering:?} vs {workers:?}"
    );
    assert_eq!(b.pid(), master);
    assert_no_panic(&b);
    b.signal(libc::SIGTERM);
    assert_eq!(b.expect_exit(EXIT).code(), Some(0), "{}", b.dump());
}

#[test]
fn a_missing_execute_bit_or_a_failing_binary_is_refused_and_the_old_master_serves_on() {
    let install = Install::new("upgrade-refused");
    let mut b = install.start(&["--cpus", "1"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let workers = status_pids(&install.admin());

    install.replace(Replacement::NotExecutable);
    b.signal(libc::SIGUSR2);
    let (at, line) = b.expect_line(0, "`upgrade refused` (not executable)", UPGRADE, |l| {
        l.contains("upgrade refused")
    });
    assert!(line.contains("is not executable"), "{line}");
    assert_eq!(get(addr, "/").expect("GET / after the refusal").0, 200);

    install.replace(Replacement::Failing);
    let admin = install.admin();
    let run = run_client(&["upgrade", "--admin", admin.to_str().expect("UTF-8")]);
    assert_one_error_line(&run, "--check failed");
    assert!(run.stderr.contains("broken build"), "{run:?}");
    b.expect_line(at + 1, "a second `upgrade refused`", UPGRADE, |l| {
        l.contains("upgrade refused") && l.contains("--check failed")
    });

    // The old master serves on, with the same workers, and was never replaced.
    assert!(b.is_running());
    assert_eq!(get(addr, "/").expect("GET / after the refusals").0, 200);
    assert_eq!(status_pids(&install.admin()), workers);
    assert_eq!(status(&install.admin())["upgrades"].as_u64(), Some(0));
    assert!(
        b.wait_for_line(Duration::ZERO, |l| is_event(l, "executing the new binary"))
            .is_none(),
        "{}",
        b.dump()
    );
    assert_no_panic(&b);
}

#[test]
fn balancer_upgrade_over_the_unix_socket_then_supervision_and_stop_still_work() {
    let install = Install::new("upgrade-client");
    let mut b = install.start(&["--cpus", "2"]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let master = b.pid();
    let workers = status_pids(&install.admin());

    install.replace(Replacement::Same);
    let admin = install.admin();
    let admin_arg = admin.to_str().expect("UTF-8 temp path");
    let run = run_client(&["upgrade", "--admin", admin_arg]);
    assert_eq!(run.code, Some(0), "{run:?}\n{}", b.dump());
    assert_eq!(
        run.stdout,
        format!("upgraded in place (pid {master}, upgrade 1)\n"),
        "{run:?}"
    );
    let upgraded_at = expect_upgraded(&b, 1);
    // The socket file survived the exec (nothing unlinked it), and the new image serves it.
    assert!(admin.exists(), "the admin socket is gone");
    assert_eq!(status_pids(&admin), workers);

    // A killed worker is still noticed (by pidfd) and replaced.
    let victim = *workers.iter().next().expect("a worker");
    send_signal(victim, libc::SIGKILL);
    b.expect_line(
        upgraded_at,
        "`worker exited` for the victim",
        UPGRADE,
        |l| is_event(l, "worker exited") && field_u32(l, "pid") == Some(victim),
    );
    b.expect_line(upgraded_at, "a replacement `worker ready`", UPGRADE, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid").is_some_and(|p| !workers.contains(&p))
    });
    assert!(
        wait_until(UPGRADE, || {
            let now = status_pids(&admin);
            now.len() == 2 && !now.contains(&victim)
        }),
        "the victim was not replaced:\n{}",
        b.dump()
    );
    assert_eq!(get(addr, "/").expect("GET / after the replacement").0, 200);

    // SIGTERM stops cleanly: every worker (adopted or new) is stopped, none outlives it,
    // and the socket file goes.
    b.signal(libc::SIGTERM);
    assert_eq!(b.expect_exit(EXIT).code(), Some(0), "{}", b.dump());
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
    assert!(!admin.exists(), "the admin socket was left behind");
    assert_no_panic(&b);
}

#[test]
fn killing_an_upgraded_master_still_kills_its_workers() {
    let install = Install::new("upgrade-kill9");
    let mut b = install.start(&["--cpus", "2"]);
    b.addr();
    wait_all_ready(&b, 2);
    let workers = status_pids(&install.admin());
    b.signal(libc::SIGUSR2);
    expect_upgraded(&b, 1);
    assert_eq!(status_pids(&install.admin()), workers);

    // PR_SET_PDEATHSIG was armed by the old image's main thread, which the exec kept.
    b.signal(libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(5), || !workers
            .iter()
            .any(|&p| pid_alive(p))),
        "workers {workers:?} outlived the killed master"
    );
}

#[test]
fn a_request_in_flight_at_the_upgrade_finishes_before_the_exec() {
    let install = Install::new("upgrade-inflight");
    // The single-threaded worker answers no health check while it computes: checks far
    // apart keep it from being replaced for that on a loaded machine.
    let b = install.start(&["--cpus", "1", "--health-interval", "60s"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let worker = *status_pids(&install.admin())
        .iter()
        .next()
        .expect("a worker");
    let before = proc_stat(worker).expect("worker stat").cpu_ticks;
    let slow = thread::spawn(move || {
        get_with_timeout(
            addr,
            &format!("/sum?n={}", crate::SLOW_SUM_N),
            Duration::from_secs(30),
        )
    });
    // In flight once the single-threaded worker is burning CPU on it.
    assert!(
        wait_until(Duration::from_secs(10), || {
            proc_stat(worker).is_some_and(|s| s.cpu_ticks >= before + 5)
        }),
        "the worker never started computing"
    );
    install.replace(Replacement::Same);
    let mut b = b;
    b.signal(libc::SIGUSR2);
    b.expect_line(
        0,
        "`upgrading in place` with one open connection",
        UPGRADE,
        |l| l.contains("upgrading in place") && field(l, "open_connections") == Some("1"),
    );
    let (status, body) = slow
        .join()
        .expect("request thread")
        .expect("the in-flight request completes");
    assert_eq!(status, 200, "{body}");
    assert!(body.trim().parse::<u64>().is_ok(), "a sum, got {body:?}");
    expect_upgraded(&b, 1);
    assert_eq!(status_pids(&install.admin()), HashSet::from([worker]));
    assert_no_panic(&b);
}

/// Two upgrades under load with `args` (a mode, a protocol), which must fail no request.
/// In shared and reuseport modes the workers accept themselves, so the exec never stops
/// them; in http mode the master's data path is paused and drained as in tcp. One load
/// thread hesitates after its connects, so each upgrade's stop finds a connection that is
/// accepted and has not sent its request yet (which an http-mode drain once closed unread).
fn upgrades_with(tag: &str, args: &[&str]) {
    let install = Install::new(&format!("upgrade-{tag}"));
    let mut all = vec!["--cpus", "2"];
    all.extend_from_slice(args);
    let mut b = install.start(&all);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let workers = status_pids(&install.admin());
    let load = Load::mixed(addr, 2, 1);
    for n in 1..=2 {
        install.replace(Replacement::Same);
        let before = load.sent.load(Ordering::Relaxed);
        b.signal(libc::SIGUSR2);
        expect_upgraded(&b, n);
        assert!(
            wait_until(Duration::from_secs(10), || load
                .sent
                .load(Ordering::Relaxed)
                > before + 50),
            "no requests after upgrade {n}"
        );
        assert_eq!(status_pids(&install.admin()), workers, "after upgrade {n}");
    }
    let (sent, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{args:?}: {} of {sent} requests failed: {failures:?}\n{}",
        failures.len(),
        b.dump()
    );
    assert_no_panic(&b);
    b.signal(libc::SIGTERM);
    assert_eq!(b.expect_exit(EXIT).code(), Some(0), "{}", b.dump());
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
}

#[test]
fn shared_mode_upgrades_in_place_under_load() {
    upgrades_with("shared", &["--mode", "shared"]);
}

#[test]
fn reuseport_mode_upgrades_in_place_under_load() {
    upgrades_with("reuseport", &["--mode", "reuseport"]);
}

#[test]
fn http_protocol_upgrades_in_place_under_load() {
    upgrades_with("http", &["--protocol", "http"]);
}

#[test]
fn handoff_mode_is_refused_with_one_line() {
    let install = Install::new("upgrade-handoff");
    let mut b = install.start(&["--cpus", "1", "--mode", "handoff"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    b.signal(libc::SIGUSR2);
    let (_, line) = b.expect_line(0, "`upgrade refused` for handoff", UPGRADE, |l| {
        l.contains("upgrade refused")
    });
    assert!(line.contains("--mode handoff"), "{line}");
    assert_eq!(get(addr, "/").expect("GET / after the refusal").0, 200);
    assert!(b.is_running());
}

/// A deployment renames a new (here: broken) binary over the master's path and no upgrade
/// follows yet: a built-in worker that dies is still replaced, from the master's own image
/// (not from the path, which now holds a program that fails at once).
#[test]
fn a_replaced_binary_on_disk_does_not_stop_builtin_workers_being_respawned() {
    let install = Install::new("upgrade-respawn-after-replace");
    let mut b = install.start(&["--cpus", "1"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let first = ready_pids(&b);
    assert_eq!(first.len(), 1, "{}", b.dump());

    install.replace(Replacement::Failing);
    send_signal(first[0], libc::SIGKILL);
    let replaced = wait_until(READY_TIMEOUT, || {
        let now = ready_pids(&b);
        now.len() == 1 && now[0] != first[0]
    });
    assert!(
        replaced,
        "no replacement worker became ready:\n{}",
        b.dump()
    );
    assert_eq!(get(addr, "/").expect("GET / from the replacement").0, 200);
    assert!(
        !b.lines().iter().any(|l| l.contains("broken build")),
        "a worker ran the replaced file:\n{}",
        b.dump()
    );
    b.signal(libc::SIGTERM);
    assert!(b.expect_exit(EXIT).success(), "{}", b.dump());
    assert_no_panic(&b);
}

/// An idle keep-alive client does not hold the upgrade's drain for its bound (10 s, while
/// new clients wait in the backlog): its connection, answered and silent, is closed at once,
/// as any server closes an idle keep-alive connection, and the upgrade goes on.
#[test]
fn an_idle_keep_alive_connection_does_not_hold_the_upgrade() {
    idle_keep_alive_does_not_hold_the_upgrade(&[]);
}

#[test]
fn an_idle_keep_alive_connection_does_not_hold_the_upgrade_epoll() {
    idle_keep_alive_does_not_hold_the_upgrade(&["--engine", "epoll"]);
}

/// The same with TLS terminated by the master (tcp mode, `copy_bidirectional` over rustls):
/// the idle connection is ended with a `close_notify` (a clean TLS close, not a truncation).
#[test]
fn an_idle_tls_keep_alive_connection_does_not_hold_the_upgrade() {
    let install = Install::new("upgrade-tls-keepalive");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let (cert, key) = (
        install.dir.path().join("tls.crt"),
        install.dir.path().join("tls.key"),
    );
    std::fs::write(&cert, ck.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("writing the key");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ck.cert.der().clone())
        .expect("trusting the certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connect = move |tcp: std::net::TcpStream| -> Box<dyn ReadWrite> {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let tls = rustls::ClientConnection::new(Arc::clone(&config), name).expect("TLS client");
        Box::new(rustls::StreamOwned::new(tls, tcp))
    };
    idle_keep_alive_does_not_hold_the_upgrade_with(
        &install,
        &[
            "--tls-cert",
            cert.to_str().expect("UTF-8 temp path"),
            "--tls-key",
            key.to_str().expect("UTF-8 temp path"),
        ],
        &connect,
    );
}

/// A client that connects to a TLS listener (tcp mode) and never sends its ClientHello does
/// not hold the upgrade's drain for the 10 s handshake timeout: nothing moved on it yet, so
/// it gets the 1 s a plain connection gets for its first bytes, then is closed. Before, the
/// handshake was left to run out and the drain took its whole bound.
#[test]
fn a_tls_client_that_never_says_hello_does_not_hold_the_upgrade() {
    use std::io::Read;
    let install = Install::new("upgrade-tls-hello");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let (cert, key) = (
        install.dir.path().join("tls.crt"),
        install.dir.path().join("tls.key"),
    );
    std::fs::write(&cert, ck.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("writing the key");
    let mut b = install.start(&[
        "--cpus",
        "1",
        "--tls-cert",
        cert.to_str().expect("UTF-8 temp path"),
        "--tls-key",
        key.to_str().expect("UTF-8 temp path"),
    ]);
    wait_all_ready(&b, 1);
    let mut silent = std::net::TcpStream::connect(b.addr()).expect("connecting");
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    install.replace(Replacement::Same);
    b.signal(libc::SIGUSR2);
    let (_, line) = b.expect_line(0, "`executing the new binary`", UPGRADE, |l| {
        is_event(l, "executing the new binary")
    });
    let drained_in = field(&line, "drained_in")
        .and_then(parse_debug_duration)
        .unwrap_or_else(|| panic!("no drained_in in {line}"));
    assert!(drained_in < Duration::from_secs(5), "{line}");
    let mut byte = [0u8; 1];
    match silent.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the silent client was not closed: {other:?}"),
    }
    expect_upgraded(&b, 1);
    b.signal(libc::SIGTERM);
    assert!(b.expect_exit(EXIT).success(), "{}", b.dump());
    assert_no_panic(&b);
}

/// A client stream, plain or TLS.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// An idle keep-alive connection is closed by the upgrade's drain, with `extra` flags.
fn idle_keep_alive_does_not_hold_the_upgrade(extra: &[&str]) {
    let install = Install::new("upgrade-keepalive");
    idle_keep_alive_does_not_hold_the_upgrade_with(&install, extra, &|tcp| Box::new(tcp));
}

/// An idle keep-alive connection (made by `connect` over a fresh TCP connection) is closed
/// by the upgrade's drain, with `extra` flags. A TLS stream reads its end as `Ok(0)` only
/// after a `close_notify` (a bare FIN is an `UnexpectedEof` error).
fn idle_keep_alive_does_not_hold_the_upgrade_with(
    install: &Install,
    extra: &[&str],
    connect: &dyn Fn(std::net::TcpStream) -> Box<dyn ReadWrite>,
) {
    use std::io::{Read, Write};
    let mut args = vec!["--cpus", "1"];
    args.extend_from_slice(extra);
    let mut b = install.start(&args);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let tcp = std::net::TcpStream::connect(addr).expect("connecting");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut client = connect(tcp);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("sending a request");
    client.flush().expect("sending a request");
    // One whole response (headers and a Content-Length body), the connection kept open.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse::<usize>().ok());
        length.is_some_and(|n| body.len() >= n)
    };
    while !complete(&got) {
        let n = client.read(&mut buf).expect("reading the response");
        assert!(n > 0, "closed before a whole response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    install.replace(Replacement::Same);
    b.signal(libc::SIGUSR2);
    let (_, line) = b.expect_line(0, "`executing the new binary`", UPGRADE, |l| {
        is_event(l, "executing the new binary")
    });
    let drained_in = field(&line, "drained_in")
        .and_then(parse_debug_duration)
        .unwrap_or_else(|| panic!("no drained_in in {line}"));
    assert!(drained_in < Duration::from_secs(5), "{line}");
    // The idle connection was closed by the master (EOF, or a reset; with TLS a
    // close_notify), not left open.
    let tls = !extra.is_empty() && extra.contains(&"--tls-cert");
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the idle connection got bytes: {:?}", &buf[..n]),
        Err(e) => assert!(!tls, "no close_notify: {e}"),
    }
    expect_upgraded(&b, 1);
    // A new connection (TLS too, when it is TLS) is served by the new image.
    let tcp = std::net::TcpStream::connect(addr).expect("connecting after the upgrade");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut after = connect(tcp);
    after
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("sending a request after the upgrade");
    after.flush().expect("sending a request after the upgrade");
    let mut got = Vec::new();
    while !complete(&got) {
        let n = after
            .read(&mut buf)
            .expect("reading the response after the upgrade");
        assert!(n > 0, "closed before a whole response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Closed before the stop, so that neither holds its drain.
    drop((after, client));
    b.signal(libc::SIGTERM);
    assert!(b.expect_exit(EXIT).success(), "{}", b.dump());
    assert_no_panic(&b);
}

/// Clients that each keep one connection and send `GET /` on it back to back, as a busy
/// keep-alive client does: the connection is never silent for long, so it is never idle.
struct BusyKeepAlive {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<KeepAliveTally>>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// What the busy keep-alive clients saw.
#[derive(Debug, Default)]
struct KeepAliveTally {
    /// Whole 200 responses.
    answered: u64,
    /// Connections the master ended between two responses (EOF or reset before any byte of
    /// the next one): the client sends that request again on a new connection.
    closed_between: u64,
    /// Anything else: a response cut short, a status that is not 200, a failed connect.
    wrong: Vec<String>,
}

impl BusyKeepAlive {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(KeepAliveTally::default()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        keep_alive_client(addr, &stop, &tally);
                    }
                })
            })
            .collect();
        BusyKeepAlive {
            stop,
            tally,
            threads,
        }
    }

    fn answered(&self) -> u64 {
        self.tally.lock().unwrap().answered
    }

    fn finish(mut self) -> KeepAliveTally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

impl Drop for BusyKeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection of [`BusyKeepAlive`], until the master ends it or `stop` is set.
fn keep_alive_client(addr: std::net::SocketAddr, stop: &AtomicBool, tally: &Mutex<KeepAliveTally>) {
    use std::io::{Read, Write};
    let wrong = |what: String| tally.lock().unwrap().wrong.push(what);
    let mut conn = match std::net::TcpStream::connect(addr) {
        Ok(c) => c,
        Err(e) => return wrong(format!("connect: {e}")),
    };
    // Well past the drain bound: a request that waits is seen waiting, not dropped.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        if conn
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .is_err()
        {
            tally.lock().unwrap().closed_between += 1;
            return;
        }
        let mut got: Vec<u8> = Vec::new();
        loop {
            let n = match conn.read(&mut buf) {
                Ok(n) => n,
                Err(e) if got.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return wrong(format!("reading after {} bytes: {e}", got.len())),
            };
            if n == 0 {
                if got.is_empty() {
                    tally.lock().unwrap().closed_between += 1;
                } else {
                    wrong(format!(
                        "cut after {} bytes: {:?}",
                        got.len(),
                        String::from_utf8_lossy(&got)
                    ));
                }
                return;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head.lines().find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            match length {
                Some(n) if body.len() > n => {
                    return wrong(format!("bytes past the response: {text:?}"))
                }
                Some(n) if body.len() == n => {
                    if !head.starts_with("HTTP/1.1 200") {
                        return wrong(format!("not 200: {head:?}"));
                    }
                    tally.lock().unwrap().answered += 1;
                    break;
                }
                Some(_) => {}
                None => return wrong(format!("no Content-Length: {head:?}")),
            }
        }
    }
}

/// A keep-alive client that sends its next request as soon as it has the last answer is
/// never silent, so waiting for it to go idle held the upgrade's drain for its whole bound
/// (10 s) while new clients waited in the backlog (the chaos soak's 17 timeouts, #16).
/// While quiescing, the master now forwards no new request on a connection that owes
/// nothing and closes it once the last answer is delivered: each client gets every answer
/// whole, then an end before any byte of its next one, and sends that one again on a new
/// connection, which the new image serves.
#[test]
fn busy_keep_alive_clients_do_not_hold_the_upgrade() {
    busy_keep_alive_does_not_hold_the_upgrade(&[]);
}

#[test]
fn busy_keep_alive_clients_do_not_hold_the_upgrade_epoll() {
    busy_keep_alive_does_not_hold_the_upgrade(&["--engine", "epoll"]);
}

/// Busy keep-alive clients end at a request boundary at the upgrade's drain, with `extra`.
fn busy_keep_alive_does_not_hold_the_upgrade(extra: &[&str]) {
    let install = Install::new("upgrade-busy-keepalive");
    let mut args = vec!["--cpus", "2"];
    args.extend_from_slice(extra);
    let mut b = install.start(&args);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let clients = BusyKeepAlive::start(addr, 4);
    assert!(
        wait_until(Duration::from_secs(20), || clients.answered() >= 200),
        "the keep-alive clients got {} answers",
        clients.answered()
    );
    install.replace(Replacement::Same);
    b.signal(libc::SIGUSR2);
    let (at, line) = b.expect_line(0, "`executing the new binary`", UPGRADE, |l| {
        is_event(l, "executing the new binary")
    });
    let drained_in = field(&line, "drained_in")
        .and_then(parse_debug_duration)
        .unwrap_or_else(|| panic!("no drained_in in {line}"));
    expect_upgraded(&b, 1);
    // The clients go on with the new image.
    let before = clients.answered();
    assert!(
        wait_until(Duration::from_secs(20), || clients.answered()
            >= before + 200),
        "the keep-alive clients got {} answers after the upgrade",
        clients.answered() - before
    );
    let tally = clients.finish();
    assert!(
        drained_in < Duration::from_secs(5),
        "busy keep-alive connections held the drain: {line}\n{}",
        b.lines()[..at].join("\n")
    );
    assert!(tally.wrong.is_empty(), "{:?}", tally.wrong);
    assert!(tally.closed_between >= 1, "{tally:?}");
    b.signal(libc::SIGTERM);
    assert!(b.expect_exit(EXIT).success(), "{}", b.dump());
    assert_no_panic(&b);
}
