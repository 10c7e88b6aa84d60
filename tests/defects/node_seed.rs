//! Item 1: the seed's own Node worker, unchanged, under the default `--node-cluster auto`:
//! it calls `listen(randomPort)` and at once, synchronously, `process.send(`${randomPort}
//! ready`)`. balancer is its cluster primary, so its `listen()` is a `queryServer` that
//! balancer serves by hand-off; the `ready` that names the same port is the same server.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::compat::node;
use crate::helper::*;

/// How long workers may take from spawn to rotation (a Node start-up on a busy machine).
const READY: Duration = Duration::from_secs(30);
/// How long a graceful stop may take.
const EXIT: Duration = Duration::from_secs(15);

fn seed() -> String {
    fixture("seed_worker.js")
}

fn fixture(name: &str) -> String {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "defects",
        "fixtures",
        name,
    ]
    .iter()
    .collect();
    path.to_str().expect("UTF-8 path").to_owned()
}

/// The pid in the seed's answer: `child worker run, at pid: N`.
fn seed_pid(body: &str) -> u32 {
    body.strip_prefix("child worker run, at pid: ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("not the seed's answer: {body:?}"))
}

fn answers(b: &Balancer, addr: SocketAddr, n: usize) -> HashSet<u32> {
    (0..n)
        .map(|i| match get(addr, "/") {
            Ok((200, body)) => seed_pid(&body),
            other => panic!("request {i}: {other:?}\n{}", b.dump()),
        })
        .collect()
}

#[test]
fn seed_node_worker_serves_under_node_cluster_auto_and_heals_after_kill_9() {
    let script = seed();
    let mut b = Balancer::start(&["--cpus", "2", "--", node(), &script]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    for pid in &ready {
        assert!(
            b.lines()
                .iter()
                .any(|l| is_event(l, "node cluster worker online")
                    && field_u32(l, "pid") == Some(*pid)),
            "{pid} took the cluster path\n{}",
            b.dump()
        );
    }
    assert_eq!(answers(&b, addr, 4), ready, "{}", b.dump());
    assert!(
        !b.lines().iter().any(|l| l.contains("not admitted")),
        "a `ready` was refused:\n{}",
        b.dump()
    );

    // kill -9 one: it is replaced, and the replacement serves too.
    let victim = *ready.iter().next().expect("a worker");
    let (_, spawned) = b.expect_line(0, "the victim's `worker spawned`", READY, |l| {
        is_event(l, "worker spawned") && field_u32(l, "pid") == Some(victim)
    });
    let slot = field(&spawned, "slot").expect("slot").to_owned();
    send_signal(victim, libc::SIGKILL);
    let (exit_at, _) = b.expect_line(0, "`worker exited` for the victim", READY, |l| {
        is_event(l, "worker exited") && field_u32(l, "pid") == Some(victim)
    });
    let (_, respawned) = b.expect_line(exit_at, "the replacement's `worker spawned`", READY, |l| {
        is_event(l, "worker spawned") && field(l, "slot") == Some(slot.as_str())
    });
    let replacement = field_u32(&respawned, "pid").expect("pid");
    b.expect_line(exit_at, "`worker ready` for the replacement", READY, |l| {
        is_event(l, "worker ready") && field_u32(l, "pid") == Some(replacement)
    });
    let healed = answers(&b, addr, 4);
    assert!(healed.contains(&replacement), "{healed:?}\n{}", b.dump());
    assert!(!healed.contains(&victim), "{healed:?}");
    assert_eq!(healed.len(), 2, "{healed:?}");

    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}

/// The same worker with the two lines the other way round: `ready` before `listen()`.
#[test]
fn seed_node_worker_that_announces_before_listening_serves() {
    let script = fixture("seed_worker_send_first.js");
    let mut b = Balancer::start(&["--cpus", "2", "--", node(), &script]);
    let addr = b.addr();
    wait_all_ready(&b, 2);
    let ready: HashSet<u32> = ready_pids(&b).into_iter().collect();
    assert_eq!(ready.len(), 2, "{}", b.dump());
    assert_eq!(answers(&b, addr, 4), ready, "{}", b.dump());
    assert!(
        !b.lines().iter().any(|l| l.contains("not admitted")),
        "a `ready` was refused:\n{}",
        b.dump()
    );
    b.signal(libc::SIGTERM);
    let exit = b.expect_exit(EXIT);
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", b.dump());
}
