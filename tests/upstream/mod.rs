//! Remote backends (#11): `--upstream` addresses and DNS names in the rotation, with real
//! backends on 127.0.0.x and a real DNS server on 127.0.0.1 whose answers the tests change.

mod first_byte;
mod retire_http;
mod servers;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::helper::*;
use servers::{backends_on_one_port, Backend, Dns, Echo, Mode};

/// From start to the first backend up: one check, at once, on loopback.
const UP: Duration = Duration::from_secs(15);
/// How soon a change of records must be followed ("within a few seconds"): the lookup
/// interval is 1 s here, the first check of a new address is immediate.
const FOLLOW: Duration = Duration::from_secs(8);
/// Time for a flip: `--health-fall 2` at `--health-interval 200ms`, with slack for a
/// loaded machine.
const FLIP: Duration = Duration::from_secs(10);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The body of one `GET /`: the tag of the backend that answered.
fn tag(addr: SocketAddr) -> String {
    get_ok(addr, "/")
}

/// Waits for `upstream backend up` for `backend` at or after line `from`.
fn expect_up(b: &Balancer, from: usize, backend: SocketAddr, timeout: Duration) -> usize {
    let want = backend.to_string();
    b.expect_line(
        from,
        &format!("`upstream backend up` for {want}"),
        timeout,
        |l| is_event(l, "upstream backend up") && field(l, "addr") == Some(want.as_str()),
    )
    .0
}

/// The admin endpoint's address, from its log line.
fn admin_addr(b: &Balancer) -> SocketAddr {
    let (_, line) = b.expect_line(0, "the admin line", UP, |l| {
        is_event(l, "admin endpoint listening")
    });
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"))
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let body = get_ok(admin, "/status");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// Sends `n` requests; returns the tags that answered, panicking on any failure.
fn tags(addr: SocketAddr, n: usize) -> HashSet<String> {
    (0..n).map(|_| tag(addr)).collect()
}

/// Like [`tags`], `None` if any request failed: while a whole set of records is replaced,
/// the old addresses leave at once and the new ones join after their first check.
fn try_tags(addr: SocketAddr, n: usize) -> Option<HashSet<String>> {
    (0..n)
        .map(|_| match get(addr, "/") {
            Ok((200, body)) => Some(body),
            _ => None,
        })
        .collect()
}

#[test]
fn pure_reverse_proxy_survives_a_backend_dying_and_takes_it_back() {
    let a = Backend::start(SocketAddr::new(ip(2), 0), "a").unwrap();
    let b = Backend::start(SocketAddr::new(ip(3), 0), "b").unwrap();
    let (a_addr, b_addr) = (a.addr, b.addr);
    let bal = Balancer::start(&[
        "--cpus",
        "0",
        "--upstream",
        &a_addr.to_string(),
        "--upstream",
        &b_addr.to_string(),
        "--health-interval",
        "200ms",
        "--health-fall",
        "2",
        "--health-rise",
        "2",
    ]);
    let addr = bal.addr();
    expect_up(&bal, 0, a_addr, UP);
    expect_up(&bal, 0, b_addr, UP);
    assert_eq!(
        tags(addr, 4),
        HashSet::from(["a".to_owned(), "b".to_owned()])
    );

    // A dies: every request from now on is served (a refused connect goes to the next).
    let mark = bal.lines().len();
    drop(a);
    for i in 0..20 {
        assert_eq!(tag(addr), "b", "request {i} after a died");
    }
    let want = a_addr.to_string();
    let (down, _) = bal.expect_line(mark, "`upstream backend down` for a", FLIP, |l| {
        is_event(l, "upstream backend down") && field(l, "addr") == Some(want.as_str())
    });
    for i in 0..10 {
        assert_eq!(tag(addr), "b", "request {i} while a is down");
    }

    // A comes back on the same address: it returns after `rise` passing checks.
    let a = Backend::start(a_addr, "a").unwrap();
    let (up, line) = bal.expect_line(down, "`upstream backend up` for a again", FLIP, |l| {
        is_event(l, "upstream backend up") && field(l, "addr") == Some(want.as_str())
    });
    assert_eq!(
        field(&line, "reason"),
        Some("health checks passing"),
        "{line}"
    );
    assert_eq!(
        tags(addr, 4),
        HashSet::from(["a".to_owned(), "b".to_owned()])
    );
    // One line per flip: exactly one down and one up for a since it died.
    let flips = bal.lines()[mark..=up]
        .iter()
        .filter(|l| field(l, "addr") == Some(want.as_str()))
        .filter(|l| is_event(l, "upstream backend down") || is_event(l, "upstream backend up"))
        .count();
    assert_eq!(flips, 2, "{}", bal.dump());
    assert!(
        !bal.lines().iter().any(|l| looks_like_panic(l)),
        "{}",
        bal.dump()
    );
    drop((a, b));
}

#[test]
fn mixed_pool_balances_over_workers_and_an_upstream() {
    let remote = Backend::start(SocketAddr::new(ip(6), 0), "remote").unwrap();
    // HTTP checks for all three: the workers' /healthz, and the remote backend's.
    let bal = Balancer::start(&[
        "--cpus",
        "2",
        "--upstream",
        &remote.addr.to_string(),
        "--health-http",
        "/healthz",
    ]);
    let addr = bal.addr();
    wait_all_ready(&bal, 2);
    expect_up(&bal, 0, remote.addr, UP);
    // Round-robin over three backends: three requests in a row reach all three.
    let answers: Vec<String> = (0..3).map(|_| tag(addr)).collect();
    assert_eq!(
        answers.iter().filter(|t| *t == "remote").count(),
        1,
        "{answers:?}"
    );
    let workers: HashSet<u32> = answers
        .iter()
        .filter(|t| *t != "remote")
        .map(|body| body_pid(body))
        .collect();
    assert_eq!(workers.len(), 2, "{answers:?}");
}

#[test]
fn dns_records_are_followed_and_the_last_good_set_kept() {
    let dns = Dns::start();
    dns.set("app.test", &[ip(2)]);
    let backends = backends_on_one_port(&[ip(2), ip(3), ip(4)]);
    let port = backends[0].addr.port();
    let upstream = format!("app.test:{port}");
    let bal = Balancer::start(&[
        "--cpus",
        "0",
        "--upstream",
        &upstream,
        "--resolver",
        &dns.addr.to_string(),
        "--resolve-interval",
        "1s",
        "--health-interval",
        "200ms",
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = bal.addr();
    let admin = admin_addr(&bal);
    expect_up(&bal, 0, SocketAddr::new(ip(2), port), UP);
    assert_eq!(tags(addr, 3), HashSet::from(["127.0.0.2".to_owned()]));

    // The records change: .2 leaves, .3 and .4 join, within a few seconds.
    let mark = bal.lines().len();
    let changed = Instant::now();
    dns.set("app.test", &[ip(3), ip(4)]);
    let want: HashSet<String> = HashSet::from(["127.0.0.3".into(), "127.0.0.4".into()]);
    let followed = wait_until(FOLLOW, || try_tags(addr, 6).as_ref() == Some(&want));
    assert!(
        followed,
        "records not followed within {FOLLOW:?}:\n{}",
        bal.dump()
    );
    eprintln!("records followed after {:?}", changed.elapsed());
    bal.expect_line(mark, "`upstream records changed`", FOLLOW, |l| {
        is_event(l, "upstream records changed")
    });
    bal.expect_line(mark, "`upstream backend retired` for .2", FOLLOW, |l| {
        is_event(l, "upstream backend retired")
            && field(l, "addr") == Some(&*format!("127.0.0.2:{port}"))
    });

    // The name stops resolving (NXDOMAIN): the last good set keeps serving.
    let (failing, line) = {
        dns.mode(Mode::NxDomain);
        bal.expect_line(mark, "`lookup failing` (NXDOMAIN)", FOLLOW, |l| {
            is_event(l, "upstream name lookup failing")
        })
    };
    assert!(line.contains("no such name"), "{line}");
    assert_eq!(tags(addr, 6), want, "the last good set after NXDOMAIN");

    // A silent server: a new state, logged once; still served.
    dns.mode(Mode::Silent);
    let (silent, line) =
        bal.expect_line(failing + 1, "`lookup failing` (timeout)", FOLLOW * 2, |l| {
            is_event(l, "upstream name lookup failing")
        });
    assert!(line.contains("timed out"), "{line}");
    assert_eq!(tags(addr, 6), want, "the last good set while DNS is silent");

    // Garbage answers: nothing crashes or hangs; still served.
    let before = dns.queries();
    dns.mode(Mode::Garbage);
    assert!(
        wait_until(FOLLOW * 2, || dns.queries() >= before + 2),
        "no lookups in garbage mode:\n{}",
        bal.dump()
    );
    assert_eq!(
        tags(addr, 6),
        want,
        "the last good set while DNS answers garbage"
    );
    let s = status(admin);
    assert_eq!(s["upstreams"]["names"][0]["resolution"], "failing", "{s:#}");
    let up: Vec<&str> = s["upstreams"]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|b| b["state"] == "up")
        .map(|b| b["addr"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(up.len(), 2, "{s:#}");
    assert!(
        s["upstreams"]["backends"][0]["source"] == upstream.as_str(),
        "{s:#}"
    );
    // One line per change of state: the same failure again is not logged again.
    let timeouts = bal.lines()[silent..]
        .iter()
        .filter(|l| is_event(l, "upstream name lookup failing") && l.contains("timed out"))
        .count();
    assert_eq!(timeouts, 1, "{}", bal.dump());
    // The resolver's own complaints about each bad packet stay out of the log.
    assert!(
        !bal.lines().iter().any(|l| l.contains("wrong message id")),
        "{}",
        bal.dump()
    );

    // It resolves again, to .2 only.
    dns.set("app.test", &[ip(2)]);
    dns.mode(Mode::Records(1));
    bal.expect_line(silent, "`upstream name resolved` again", FOLLOW * 2, |l| {
        is_event(l, "upstream name resolved")
    });
    let only_2 = HashSet::from(["127.0.0.2".to_owned()]);
    let back = wait_until(FOLLOW, || try_tags(addr, 3).as_ref() == Some(&only_2));
    assert!(back, "not back to .2:\n{}", bal.dump());
    let metrics = get_ok(admin, "/metrics");
    assert!(
        metrics.contains(&format!(
            "balancer_upstream_resolved{{upstream=\"{upstream}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        !bal.lines().iter().any(|l| looks_like_panic(l)),
        "{}",
        bal.dump()
    );
}

/// `hold.test` resolving to an echo backend on .7, a backend on the same port on .8 for the
/// record to move to, and a master following the name every second with `extra` flags.
fn start_hold(extra: &[&str]) -> (Dns, Echo, Backend, Balancer) {
    let dns = Dns::start();
    dns.set("hold.test", &[ip(7)]);
    let echo = Echo::start(SocketAddr::new(ip(7), 0)).unwrap();
    let port = echo.addr.port();
    let next = Backend::start(SocketAddr::new(ip(8), port), "127.0.0.8")
        .expect("the same port on 127.0.0.8");
    let upstream = format!("hold.test:{port}");
    let resolver = dns.addr.to_string();
    let mut args = vec![
        "--cpus",
        "0",
        "--upstream",
        &upstream,
        "--resolver",
        &resolver,
        "--resolve-interval",
        "1s",
        "--health-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let bal = Balancer::start(&args);
    (dns, echo, next, bal)
}

/// A client connection through the master to the echo backend, checked with one echo;
/// reads time out after 20 s.
fn echoing(addr: SocketAddr) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut open = std::net::TcpStream::connect(addr).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut echoed = [0u8; 4];
    open.write_all(b"ping").unwrap();
    open.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping");
    open
}

/// Moves `hold.test` to .8 and waits for the master to retire `old`; returns the index and
/// text of its `upstream backend retired` line.
fn move_record(bal: &Balancer, dns: &Dns, old: SocketAddr) -> (usize, String) {
    dns.set("hold.test", &[ip(8)]);
    let want = old.to_string();
    bal.expect_line(0, "`upstream backend retired` for .7", FOLLOW, |l| {
        is_event(l, "upstream backend retired") && field(l, "addr") == Some(want.as_str())
    })
}

/// `open` ends in EOF or a reset, with nothing more to read, not in its read timeout:
/// balancer closed it.
fn assert_closed_by_balancer(open: &mut std::net::TcpStream) {
    use std::io::Read;
    let mut rest = Vec::new();
    if let Err(e) = open.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the retired backend's connection was not closed: {e}"
        );
    }
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_vanished_record_drains_its_open_connections_within_grace() {
    use std::io::{Read, Write};
    let (dns, echo, next, bal) = start_hold(&["--grace", "2s"]);
    let addr = bal.addr();
    expect_up(&bal, 0, echo.addr, UP);
    let mut open = echoing(addr);
    let mut echoed = [0u8; 4];

    // The record moves to .8: .7 leaves rotation at once, its open connection goes on.
    let (retired, line) = move_record(&bal, &dns, echo.addr);
    assert_eq!(field(&line, "open_connections"), Some("1"), "{line}");
    expect_up(&bal, 0, next.addr, FOLLOW);
    assert_eq!(tags(addr, 3), HashSet::from(["127.0.0.8".to_owned()]));
    open.write_all(b"more").unwrap();
    open.read_exact(&mut echoed).unwrap();
    assert_eq!(
        &echoed, b"more",
        "the retired backend's connection still works"
    );

    // After --grace it is closed.
    bal.expect_line(retired, "the grace line", FOLLOW, |l| {
        is_event(
            l,
            "grace period over; closing the retired backend's connections",
        )
    });
    assert_closed_by_balancer(&mut open);
    drop((echo, next));
}

#[test]
fn a_retired_upstream_gets_the_grace_in_force_after_a_sighup() {
    // Started with a 60 s grace, re-read as 1 s: the retired backend's open connection is
    // closed after 1 s, not after the grace the master started with.
    let dir = TempDir::new("upstream-grace-reread");
    let file = dir.path().join("balancer.toml");
    std::fs::write(&file, "grace = \"60s\"\n").unwrap();
    let (dns, echo, next, bal) = start_hold(&["--config", file.to_str().expect("UTF-8 path")]);
    let addr = bal.addr();
    expect_up(&bal, 0, echo.addr, UP);
    std::fs::write(&file, "grace = \"1s\"\n").unwrap();
    send_signal(bal.pid(), libc::SIGHUP);
    bal.expect_line(0, "`SIGHUP: configuration re-read`", FOLLOW, |l| {
        is_event(l, "SIGHUP: configuration re-read")
    });
    let mut open = echoing(addr);

    let (retired, _) = move_record(&bal, &dns, echo.addr);
    let (_, line) = bal.expect_line(retired, "the grace line", FOLLOW, |l| {
        is_event(
            l,
            "grace period over; closing the retired backend's connections",
        )
    });
    assert_eq!(field(&line, "grace"), Some("1s"), "{line}");
    assert_closed_by_balancer(&mut open);
    drop((echo, next));
}

#[test]
fn a_short_ttl_brings_lookups_sooner_but_never_more_than_once_a_second() {
    let dns = Dns::start();
    dns.set("ttl.test", &[ip(9)]);
    let backends = backends_on_one_port(&[ip(9), ip(10)]);
    let port = backends[0].addr.port();
    // A 60 s interval: only the records' 1 s TTL can make the change show within seconds.
    let bal = Balancer::start(&[
        "--cpus",
        "0",
        "--upstream",
        &format!("ttl.test:{port}"),
        "--resolver",
        &dns.addr.to_string(),
        "--resolve-interval",
        "60s",
        "--health-interval",
        "200ms",
    ]);
    let addr = bal.addr();
    expect_up(&bal, 0, backends[0].addr, UP);
    dns.set("ttl.test", &[ip(10)]);
    let only_10 = HashSet::from(["127.0.0.10".to_owned()]);
    assert!(
        wait_until(FOLLOW, || try_tags(addr, 3).as_ref() == Some(&only_10)),
        "a 1 s TTL not followed under a 60 s interval:\n{}",
        bal.dump()
    );

    // TTL 0: lookups at most once a second (one lookup is an A and an AAAA query).
    dns.mode(Mode::Records(0));
    let (before, started) = (dns.queries(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (queries, took) = (dns.queries() - before, started.elapsed());
    let most = 2 * (took.as_secs() + 2);
    assert!(
        queries <= most,
        "{queries} queries in {took:?} with TTL 0 (at most {most})"
    );
    assert!(queries >= 2, "no lookups at all in {took:?} with TTL 0");
}

#[test]
fn a_name_that_does_not_resolve_at_start_is_not_fatal() {
    let dns = Dns::start();
    dns.mode(Mode::NxDomain);
    let backend = Backend::start(SocketAddr::new(ip(5), 0), "late").unwrap();
    let mut bal = Balancer::start(&[
        "--cpus",
        "0",
        "--upstream",
        &format!("late.test:{}", backend.addr.port()),
        "--resolver",
        &dns.addr.to_string(),
        "--admin",
        "127.0.0.1:0",
    ]);
    let addr = bal.addr();
    let admin = admin_addr(&bal);
    bal.expect_line(0, "`does not resolve yet`", UP, |l| {
        is_event(l, "upstream name does not resolve yet")
    });
    assert_eq!(
        get(admin, "/healthz").expect("GET /healthz"),
        (503, "no backend in rotation\n".to_owned())
    );
    // A client is closed, not served and not left hanging.
    assert!(
        !matches!(get(addr, "/"), Ok((200, _))),
        "served with no backend"
    );
    assert!(bal.is_running());

    // The application's name appears: balancer follows within a lookup or two.
    dns.set("late.test", &[ip(5)]);
    dns.mode(Mode::Records(1));
    expect_up(&bal, 0, backend.addr, FOLLOW);
    assert_eq!(get(admin, "/healthz").expect("GET /healthz").0, 200);
    assert_eq!(tag(addr), "late");
}

#[test]
fn upstreams_come_from_a_config_file_too() {
    let dir = TempDir::new("upstream-config");
    let file = dir.path().join("balancer.toml");
    std::fs::write(
        &file,
        "cpus = 0\nupstream = [\"127.0.0.2:8080\", \"app:80\"]\nresolve-interval = \"2s\"\n",
    )
    .unwrap();
    let mut b = Balancer::start_exact(&["--config", file.to_str().unwrap(), "--check"]);
    let exit = b.expect_exit(Duration::from_secs(15));
    assert!(exit.success(), "{exit:?}:\n{}", b.dump());
    assert!(
        b.stdout_lines()
            .iter()
            .any(|l| l.contains("configuration ok")),
        "{:?}",
        b.stdout_lines()
    );
}

#[test]
fn bad_upstream_input_gets_one_line() {
    for (args, wanted) in [
        (&["--cpus", "0"][..], "--upstream"),
        (&["--cpus", "0", "--upstream", "app"][..], "no port"),
        (&["--cpus", "0", "--upstream", "app:0"][..], "1 to 65535"),
        (
            &["--cpus", "0", "--upstream", "app:65536"][..],
            "1 to 65535",
        ),
        (
            &["--cpus", "0", "--upstream", "10.0.0.5:99999"][..],
            "1 to 65535",
        ),
        (&["--cpus", "0", "--upstream", "::1:80"][..], "brackets"),
        (
            &["--cpus", "0", "--upstream", "bad name:80"][..],
            "DNS name",
        ),
        (
            &["--cpus", "0", "--upstream", "app:80", "--resolver", "nope"][..],
            "--resolver",
        ),
        (
            &[
                "--cpus",
                "0",
                "--upstream",
                "app:80",
                "--resolve-interval",
                "0s",
            ][..],
            "--resolve-interval",
        ),
        (
            &["--mode", "shared", "--upstream", "app:80"][..],
            "--mode proxy",
        ),
    ] {
        let line = crate::fatal_error_loopback(args);
        assert!(line.contains(wanted), "{args:?}: {line}");
    }
}
