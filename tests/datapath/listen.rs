//! Issue 9 item 2: a second instance on the same `--listen` fails with "address in use",
//! and no foreign socket joins the `SO_REUSEPORT` group of the proxy threads' listeners.

use std::time::Duration;

use super::*;

/// Requests through `addr`, each answered by one of `workers` (pids), none lost elsewhere.
fn all_answered_by(addr: SocketAddr, workers: &[u32], requests: usize) {
    for i in 0..requests {
        let (status, body) = get_with_timeout(addr, "/", Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {i} through {addr} failed: {e}"));
        assert_eq!(status, 200, "request {i}: {body}");
        let pid = body_pid(&body);
        assert!(
            workers.contains(&pid),
            "request {i} answered by {pid}, not one of {workers:?}"
        );
    }
}

#[test]
fn a_second_instance_fails_with_address_in_use_and_the_first_keeps_all_traffic() {
    for mode in ["proxy", "handoff"] {
        let first = Balancer::start(&["--cpus", "1", "--mode", mode]);
        let addr = first.addr();
        wait_all_ready(&first, 1);
        let listen = addr.to_string();
        let mut second =
            Balancer::start_exact(&["--listen", &listen, "--cpus", "1", "--mode", mode]);
        let status = second.expect_exit(Duration::from_secs(15));
        assert!(
            !status.success(),
            "{mode}: a second instance on {addr} started:\n{}",
            second.dump()
        );
        let lines = second.lines();
        assert!(
            lines.len() == 1
                && lines[0].starts_with("balancer: error: ")
                && lines[0].to_lowercase().contains("address already in use"),
            "{mode}: not one `address in use` line:\n{}",
            second.dump()
        );
        all_answered_by(addr, &ready_pids(&first), 20);
    }
}

#[test]
fn a_foreign_reuseport_socket_gets_no_connections() {
    let b = Balancer::start(&["--cpus", "1"]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    // A socket of the same user with SO_REUSEPORT joins the group: the kernel allows it.
    let foreign = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    foreign.set_reuse_address(true).unwrap();
    foreign.set_reuse_port(true).unwrap();
    foreign
        .bind(&addr.into())
        .expect("joining the group (same uid)");
    foreign.listen(128).unwrap();
    foreign.set_nonblocking(true).unwrap();
    // Every connection reaches balancer (a share going to the foreign socket would hang in
    // its queue and time out) and none waits in the foreign socket's queue.
    all_answered_by(addr, &ready_pids(&b), 40);
    match foreign.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the foreign socket got a connection from {peer:?}"),
        Err(e) => panic!("accept on the foreign socket: {e}"),
    }
}

/// The master's proxy threads (named `balancer-proxy-N`), from /proc.
fn proxy_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|name| name.starts_with("balancer-proxy"))
        })
        .count()
}

#[test]
fn proxy_threads_sets_how_many_threads_accept_and_all_serve() {
    for (threads, mode) in [("1", "proxy"), ("3", "proxy"), ("3", "handoff")] {
        let b = Balancer::start(&["--cpus", "2", "--mode", mode, "--proxy-threads", threads]);
        let addr = b.addr();
        wait_all_ready(&b, 2);
        // Each thread names itself once it runs, a moment after `accepting` is logged.
        let named = wait_until(Duration::from_secs(10), || {
            proxy_threads(b.pid()).to_string() == threads
        });
        assert!(
            named,
            "{mode} --proxy-threads {threads}: {} proxy threads\n{}",
            proxy_threads(b.pid()),
            b.dump()
        );
        // New connections spread over every thread's listener: all of them are answered.
        all_answered_by(addr, &ready_pids(&b), 24);
    }
}

#[test]
fn proxy_threads_zero_is_refused_in_one_line() {
    let mut b = Balancer::start(&["--cpus", "1", "--proxy-threads", "0"]);
    let status = b.expect_exit(Duration::from_secs(15));
    assert!(
        !status.success(),
        "started with 0 proxy threads:\n{}",
        b.dump()
    );
    let lines = b.lines();
    assert!(
        lines.len() == 1
            && lines[0].starts_with("balancer: error: ")
            && lines[0].contains("--proxy-threads 0"),
        "not one line naming --proxy-threads:\n{}",
        b.dump()
    );
}
