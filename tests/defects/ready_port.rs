//! Item 6: with `--ready port --health-check http`, a worker passes one HTTP check before its
//! first client. One that accepts and never answers is never admitted, and fails its start
//! at the ready timeout, respawned with growing backoff.

use std::time::Duration;

use crate::helper::*;

/// How long workers may take from spawn to rotation on a busy machine.
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop may take.
const EXIT: Duration = Duration::from_secs(15);

/// Accepts on `PORT` and never answers (holding every connection open).
const SILENT: &str = r#"
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
held = []
while True:
    held.append(s.accept()[0])
"#;

fn python() -> &'static str {
    python3().to_str().expect("UTF-8 python path")
}

#[test]
fn ready_port_worker_that_never_answers_http_is_not_admitted_and_backs_off() {
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready",
        "port",
        "--health-check",
        "http",
        "--health-timeout",
        "300ms",
        "--ready-timeout",
        "1s",
        "--",
        python(),
        "-c",
        SILENT,
    ]);
    b.addr();
    let mut delays = Vec::new();
    for n in 1..=3u32 {
        let (_, line) = b.expect_line(0, &format!("backoff failures={n}"), READY, |l| {
            is_event(
                l,
                "worker failed before becoming ready; respawning after backoff",
            ) && field_u32(l, "failures") == Some(n)
        });
        delays.push(
            field(&line, "delay")
                .and_then(parse_debug_duration)
                .expect("delay"),
        );
    }
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
    assert!(
        !b.lines().iter().any(|l| is_event(l, "worker ready")),
        "a worker that never answers HTTP entered rotation:\n{}",
        b.dump()
    );
    assert!(
        b.lines().iter().any(|l| is_event(
            l,
            "worker did not become ready within --ready-timeout; replacing it"
        )),
        "{}",
        b.dump()
    );
    assert!(
        b.lines()
            .iter()
            .filter(|l| is_event(l, "worker exited"))
            .all(|l| l.contains("status=signal 15 (SIGTERM)")),
        "the silent worker runs until it is replaced:\n{}",
        b.dump()
    );
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}

#[test]
fn ready_port_worker_that_answers_http_is_admitted() {
    let mut b = Balancer::start(&[
        "--cpus",
        "1",
        "--ready",
        "port",
        "--health-check",
        "http",
        "--health-http",
        "/",
        "--",
        python(),
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "{port}",
    ]);
    let addr = b.addr();
    wait_all_ready(&b, 1);
    let (status, _) = get(addr, "/").expect("GET /");
    assert_eq!(status, 200, "{}", b.dump());
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}
