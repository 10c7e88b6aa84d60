//! Scenario 9: SIGTERM with requests in flight: a request shorter than `--grace` completes;
//! one longer than `--grace` does not keep the master from exiting within `grace` plus the
//! stop timeout.

use super::*;

// ---------------------------------------------------------------------------------------------
// 9. SIGTERM with requests in flight.

/// A `GET /sleep?s=N` for the [`python::SLEEPY`] worker.
fn sleep_request(secs: u32) -> Vec<u8> {
    format!("GET /sleep?s={secs} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

/// SIGTERM while a 3-second request is in flight (`--grace 10s`): the request completes with
/// its answer, new connects are refused while it runs (the listener is closed first), and
/// the master exits 0 right after the request is done.
#[test]
fn sigterm_lets_a_3_second_request_finish() {
    const SECS: u32 = 3;
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--grace",
        "10s",
        "--",
        python::python(),
        "-c",
        python::SLEEPY,
        "polite",
    ]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let slow =
        thread::spawn(move || load::request(addr, &sleep_request(SECS), Duration::from_secs(30)));
    b.expect_line(0, "the worker's `sleeping 3`", READY, |l| {
        l.contains("stdout] sleeping 3")
    });
    let signalled = Instant::now();
    b.signal(libc::SIGTERM);
    b.expect_line(0, "`stopping` with one open connection", EXIT, |l| {
        is_event(l, "stopping: draining connections") && field(l, "open_connections") == Some("1")
    });
    // The listener closes right after that line (a connect in between may still be served,
    // or reset if it was queued when the listener closed): poll until connects are refused.
    let mut probes = 0;
    let refusing = wait_until(Duration::from_secs(2), || {
        probes += 1;
        matches!(
            std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    let refused_at = Instant::now();
    let attempt = slow.join().expect("the slow client panicked");
    let exit = b.expect_exit(EXIT);
    let took = signalled.elapsed();
    summary(
        "sigterm_inflight",
        &[
            ("request_s", SECS.to_string()),
            ("grace_s", "10".to_string()),
            ("inflight_outcome", attempt.outcome.name().to_string()),
            ("connects_until_refused", probes.to_string()),
            ("exit_after_ms", took.as_millis().to_string()),
            (
                "exit_code",
                exit.code().map_or("none".to_owned(), |c| c.to_string()),
            ),
        ],
    );
    assert_eq!(
        attempt.outcome,
        Outcome::Ok,
        "the in-flight request: {attempt:?}\n{}",
        b.dump()
    );
    assert!(refusing, "new connects still accepted while draining");
    assert!(
        attempt.end > refused_at,
        "the listener was closed only after the in-flight request ended"
    );
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert!(
        attempt.end <= signalled + Duration::from_secs(u64::from(SECS)) + Duration::from_secs(2),
        "the request took too long"
    );
    // It waited for the request, and not much longer.
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}");
    assert!(
        took <= Duration::from_secs(u64::from(SECS) + 4),
        "exited after {took:?}"
    );
    for pid in b.worker_pids() {
        assert!(!pid_alive(pid), "worker {pid} outlived the master");
    }
    assert_no_panic(&b);
}

/// SIGTERM with `--grace 1s` while a 30-second request is in flight, and a worker that
/// ignores `shutdown` and SIGTERM: the client's connection is closed at the end of the grace
/// period, the worker gets SIGKILL after the stop timeout, and the master exits within
/// `grace` + 2 s (`shutdown` patience) + 5 s (SIGTERM to SIGKILL) + slack — the bound
/// `docs/LIFECYCLE.md` gives ("at most --grace + 7 s + about 1 s").
#[test]
fn sigterm_with_a_request_longer_than_grace_exits_within_grace_plus_stop_timeout() {
    const GRACE: Duration = Duration::from_secs(1);
    /// `shutdown` patience (2 s) + SIGTERM to SIGKILL (5 s).
    const STOP_TIMEOUT: Duration = Duration::from_secs(7);
    /// "about 1 s" in the docs, plus scheduling on a busy machine.
    const SLACK: Duration = Duration::from_secs(2);

    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--grace",
        "1s",
        "--",
        python::python(),
        "-c",
        python::SLEEPY,
        "stubborn",
    ]);
    let addr = b.addr();
    wait_in_rotation(&b, 1, READY);
    let worker = rotation(&b.lines()).into_keys().next().expect("a worker");
    let slow =
        thread::spawn(move || load::request(addr, &sleep_request(30), Duration::from_secs(40)));
    b.expect_line(0, "the worker's `sleeping 30`", READY, |l| {
        l.contains("stdout] sleeping 30")
    });
    let signalled = Instant::now();
    b.signal(libc::SIGTERM);
    let attempt = slow.join().expect("the slow client panicked");
    let cut_after = attempt.end.saturating_duration_since(signalled);
    let exit = b.expect_exit(GRACE + STOP_TIMEOUT + SLACK + Duration::from_secs(5));
    let took = signalled.elapsed();
    let lines = b.lines();
    let (_, stopped) = b.expect_line(0, "the worker's end", Duration::ZERO, |l| {
        is_event(l, "worker stopped") && field_u32(l, "pid") == Some(worker)
    });
    summary(
        "sigterm_over_grace",
        &[
            ("request_s", "30".to_string()),
            ("grace_s", GRACE.as_secs().to_string()),
            ("inflight_outcome", attempt.outcome.name().to_string()),
            ("client_cut_after_ms", cut_after.as_millis().to_string()),
            ("exit_after_ms", took.as_millis().to_string()),
            (
                "bound_ms",
                (GRACE + STOP_TIMEOUT + SLACK).as_millis().to_string(),
            ),
            ("worker_end", format!("{:?}", exit_status(&stopped))),
            (
                "exit_code",
                exit.code().map_or("none".to_owned(), |c| c.to_string()),
            ),
        ],
    );
    assert_ne!(
        attempt.outcome,
        Outcome::Ok,
        "a 30 s request cannot have finished"
    );
    assert!(
        cut_after >= GRACE && cut_after <= GRACE + SLACK,
        "the client was cut off {cut_after:?} after SIGTERM"
    );
    assert!(
        events(&lines, "grace period over; closing open connections").count() == 1,
        "{}",
        b.dump()
    );
    assert!(
        events(&lines, "worker ignored SIGTERM; sending SIGKILL").count() == 1,
        "{}",
        b.dump()
    );
    assert!(stopped.contains("signal 9 (SIGKILL)"), "{stopped}");
    assert!(
        took <= GRACE + STOP_TIMEOUT + SLACK,
        "the master exited {took:?} after SIGTERM, more than {:?}",
        GRACE + STOP_TIMEOUT + SLACK
    );
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
    assert!(!pid_alive(worker), "the worker outlived the master");
    assert_no_panic(&b);
}
