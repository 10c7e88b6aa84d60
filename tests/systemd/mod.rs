//! systemd (issue 13): the master socket-activated by `systemd-socket-activate` (which binds
//! the port, waits for the first connection, then execs balancer with the socket as fd 3),
//! and its `sd_notify` messages, read from a notify socket (a Unix datagram socket) the test
//! makes, with the sender's pid checked through `SCM_CREDENTIALS`.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr,
};

use crate::helper::*;

/// How long the master may take from exec to `READY=1`: workers started and admitted (debug
/// build, busy 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop with nothing to drain may take.
const EXIT: Duration = Duration::from_secs(15);
/// The watchdog interval the test asks for: the master must ping at least every half.
const WATCHDOG_USEC: u64 = 400_000;

/// The test's end of `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: TempDir,
}

/// One notification: its `KEY=VALUE` lines, and the pid of the process that sent it.
#[derive(Debug)]
struct Notification {
    pid: Option<u32>,
    fields: HashMap<String, String>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        setsockopt(&socket, PassCred, &true).expect("SO_PASSCRED");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// The next notification, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Notification> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .ok()?;
        let pid = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(cred) => u32::try_from(cred.pid()).ok(),
            _ => None,
        });
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Notification { pid, fields })
    }

    /// Waits for a notification carrying `key`; returns it and every one received before it.
    fn expect(&self, key: &str, timeout: Duration) -> (Notification, Vec<Notification>) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(n) if n.fields.contains_key(key) => return (n, before),
                Some(n) => before.push(n),
                None => break,
            }
        }
        panic!("no {key} notification within {timeout:?}; received: {before:?}");
    }
}

/// A loopback port nobody listens on right now (`systemd-socket-activate` takes no port 0).
fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("addr").port()
}

/// `systemd-socket-activate -l 127.0.0.1:PORT -E NOTIFY_SOCKET=... [-E ...] balancer ARGS`.
fn activated(port: u16, notify: &NotifySocket, env: &[&str], args: &[&str]) -> Balancer {
    let listen = format!("127.0.0.1:{port}");
    let notify_env = format!("NOTIFY_SOCKET={}", notify.path().display());
    let mut wrapper = vec!["systemd-socket-activate", "-l", &listen, "-E", &notify_env];
    for e in env {
        wrapper.extend_from_slice(&["-E", e]);
    }
    Balancer::start_wrapped(&wrapper, args)
}

/// The microseconds of CLOCK_MONOTONIC now, as `MONOTONIC_USEC` counts them.
fn monotonic_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000
}

#[test]
fn socket_activated_master_serves_the_activating_connection_and_notifies_systemd() {
    let notify = NotifySocket::new();
    // `--listen` names a port the test holds: binding it would fail, so an answer proves the
    // master served on the socket it was passed.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let port = free_port();
    let watchdog = format!("WATCHDOG_USEC={WATCHDOG_USEC}");
    let mut b = activated(
        port,
        &notify,
        &[watchdog.as_str()],
        &["--cpus", "2", "--listen", &taken],
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    b.expect_line(0, "`Listening on`", STARTUP, |l| {
        l.starts_with("Listening on")
    });

    // This connection makes systemd-socket-activate exec balancer: it waits in the backlog
    // until a worker is ready, then is served.
    let body = get_ok(addr, "/");
    let first = body_pid(&body);
    let (ready, before) = notify.expect("READY", READY_TIMEOUT);
    assert_eq!(ready.fields["READY"], "1");
    assert_eq!(
        ready.pid,
        Some(b.pid()),
        "READY=1 from another process: {ready:?}"
    );
    assert!(
        before.iter().all(|n| !n.fields.contains_key("STOPPING")),
        "{before:?}"
    );
    let (_, listening) = b.expect_line(0, "`listening`", STARTUP, |l| is_event(l, "listening"));
    assert_eq!(
        field(&listening, "socket_activated"),
        Some("true"),
        "{listening}"
    );
    assert_eq!(field(&listening, "addr"), Some(addr.to_string().as_str()));
    wait_all_ready(&b, 2);

    // The watchdog: pings from the master at least every half interval.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let (ping, _) = notify.expect("WATCHDOG", Duration::from_micros(WATCHDOG_USEC));
        assert_eq!(ping.fields["WATCHDOG"], "1");
        assert_eq!(ping.pid, Some(b.pid()));
        pings += 1;
    }
    assert!(started.elapsed() < Duration::from_micros(3 * WATCHDOG_USEC));

    // Neither the activation variables nor the notify socket reach the workers.
    for pid in ready_pids(&b) {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        for var in [
            "LISTEN_FDS=",
            "LISTEN_PID=",
            "NOTIFY_SOCKET=",
            "WATCHDOG_USEC=",
        ] {
            assert!(
                !environ
                    .split(|&c| c == 0)
                    .any(|e| e.starts_with(var.as_bytes())),
                "worker {pid} has {var}"
            );
        }
    }

    // SIGHUP: RELOADING=1 with this moment's monotonic time, then READY=1 once every slot
    // has its new worker.
    let before_reload = monotonic_usec();
    b.signal(libc::SIGHUP);
    let (reloading, _) = notify.expect("RELOADING", READY_TIMEOUT);
    let after_reload = monotonic_usec();
    let stamp: u64 = reloading.fields["MONOTONIC_USEC"]
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (before_reload..=after_reload).contains(&stamp),
        "MONOTONIC_USEC {stamp} not within {before_reload}..={after_reload}"
    );
    let (ready_again, _) = notify.expect("READY", READY_TIMEOUT);
    assert_eq!(ready_again.pid, Some(b.pid()));
    b.expect_line(0, "`rolling reload done`", READY_TIMEOUT, |l| {
        is_event(l, "rolling reload done")
    });
    let after = body_pid(&get_ok(addr, "/"));
    assert_ne!(after, first, "still the pre-reload worker");

    // SIGTERM: STOPPING=1, then a clean exit.
    b.signal(libc::SIGTERM);
    let (stopping, _) = notify.expect("STOPPING", EXIT);
    assert_eq!(stopping.pid, Some(b.pid()));
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "log:\n{}", b.dump());
}

#[test]
fn socket_activation_in_reuseport_mode_is_one_error_line() {
    let notify = NotifySocket::new();
    let port = free_port();
    let mut b = activated(port, &notify, &[], &["--cpus", "1", "--mode", "reuseport"]);
    b.expect_line(0, "`Listening on`", STARTUP, |l| {
        l.starts_with("Listening on")
    });
    // The activating connection: it is closed unanswered when the master refuses to start.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let _ = get(addr, "/");
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(1), "log:\n{}", b.dump());
    let errors: Vec<String> = b
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("balancer: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "log:\n{}", b.dump());
    assert!(
        errors[0].contains("socket activation cannot serve --mode reuseport"),
        "{errors:?}"
    );
    assert!(!b.lines().iter().any(|l| looks_like_panic(l)));
    assert!(notify.recv(Duration::from_millis(100)).is_none());
}
