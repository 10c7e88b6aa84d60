//! A backend that closes before a byte either way (a worker killed between the master's
//! connect and the client's first bytes): the master connects to the next backend, and a
//! client that was slow to write never sees the reset of a request it had not sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::helper::*;

use super::servers::{Backend, Resetter};
use super::{ip, UP};

/// How long each client waits between its connect and its request: the descheduled client
/// thread of the soak's one failure (the reset reaches the master first).
const SLOW_WRITER: Duration = Duration::from_millis(100);

#[test]
fn tcp_mode_moves_a_client_to_the_next_backend_when_one_resets_before_a_byte() {
    let resetter = Resetter::start(SocketAddr::new(ip(15), 0)).expect("binding 127.0.0.15");
    let good = Backend::start(SocketAddr::new(ip(16), 0), "127.0.0.16").expect("binding .16");
    let bal = Balancer::start(&[
        "--cpus",
        "0",
        "--upstream",
        &resetter.addr.to_string(),
        "--upstream",
        &good.addr.to_string(),
        "--health-check",
        "tcp",
        // One check each at start, then none for the test's length: every later connection
        // the resetter accepts came through the proxy.
        "--health-interval",
        "60s",
        // Never out of rotation for its failures: each client meets it.
        "--health-fall",
        "1000",
    ]);
    let addr = bal.addr();
    for b in [resetter.addr, good.addr] {
        super::expect_up(&bal, 0, b, UP);
    }
    let checks = resetter.accepted();
    for i in 0..6 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::thread::sleep(SLOW_WRITER);
        let answer = c
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .and_then(|()| {
                let mut raw = String::new();
                c.read_to_string(&mut raw).map(|_| raw)
            });
        match answer {
            Ok(raw) => assert!(
                raw.starts_with("HTTP/1.1 200") && raw.ends_with("127.0.0.16"),
                "request {i}: {raw:?}"
            ),
            Err(e) => panic!("request {i}: {e}\n{}", bal.dump()),
        }
    }
    assert!(
        resetter.accepted() >= checks + 3,
        "round robin sent the resetter {} of 6 clients",
        resetter.accepted() - checks
    );
    assert_no_panic(&bal);
}
