//! Scenarios 4 and 5: workers that die young or die often. A command that exits at once
//! is respawned with growing backoff, without CPU spin, descriptor or child pile-up; hundreds
//! of one-request workers leave no descriptor and no zombie behind.

use super::*;

// ---------------------------------------------------------------------------------------------
// 4. A worker command that exits at once.

/// A worker that exits at once (`sh -c 'exit 3'`), in two slots, for about 7 s (until each
/// slot has failed 7 times: 0.1 + 0.2 + … + 3.2 s of backoff): the respawns back off (the
/// gaps between a slot's spawns, read from the log timestamps, grow about twofold each
/// time), the master uses little CPU, and its descriptors and children do not pile up.
#[test]
fn crashing_worker_backs_off_without_spinning_or_leaking() {
    const SLOTS: usize = 2;
    const FAILURES: u32 = 7;
    /// The master's share of one core over the window; a spinning respawn loop takes 100 %.
    const CPU_BOUND: f64 = 0.10;

    let mut b = Balancer::start(&["--cpus", "2", "--", "sh", "-c", "exit 3"]);
    b.addr();
    let master = b.pid();
    let cpu = CpuWatch::start(master);
    let started = Instant::now();
    let backoff_line = |l: &str, n: u32| {
        is_event(
            l,
            "worker failed before becoming ready; respawning after backoff",
        ) && field_u32(l, "failures") == Some(n)
    };
    for slot in 0..SLOTS as u32 {
        b.expect_line(0, "the first backoff", READY, |l| {
            backoff_line(l, 1) && field_u32(l, "slot") == Some(slot)
        });
    }
    // No worker runs most of the time: the fewest descriptors over a moment is the count
    // with none alive.
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    let stop_sampling = AtomicBool::new(false);
    let sampled = thread::scope(|s| {
        let sampler =
            s.spawn(|| sample_children(master, || b.worker_pids(), &stop_sampling, READY));
        let _stop = StopOnDrop(&stop_sampling);
        for slot in 0..SLOTS as u32 {
            b.expect_line(0, &format!("backoff failures={FAILURES}"), READY, |l| {
                backoff_line(l, FAILURES) && field_u32(l, "slot") == Some(slot)
            });
        }
        stop_sampling.store(true, Ordering::Relaxed);
        sampler.join().expect("the sampler thread panicked")
    });
    let window = started.elapsed();
    let (cpu_used, cpu_share) = cpu.read();
    // Every slot now waits 6.4 s or more: nothing runs.
    let fds_after = steady_fd_count(master, Duration::from_millis(300));
    assert!(
        wait_until(Duration::from_secs(5), || zombies(master).is_empty()),
        "unreaped workers: {:?}",
        zombies(master)
    );
    let children_after = children(master).len();

    // Gaps between the spawns of each slot, from the log's own timestamps.
    let lines = b.lines();
    let mut gaps_by_slot = Vec::new();
    for slot in 0..SLOTS as u32 {
        let times: Vec<f64> = events(&lines, "worker spawned")
            .filter(|l| field_u32(l, "slot") == Some(slot))
            .filter_map(|l| log_time(l))
            .take(FAILURES as usize)
            .collect();
        let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        gaps_by_slot.push(gaps);
    }
    let shown: Vec<String> = gaps_by_slot
        .iter()
        .map(|g| {
            g.iter()
                .map(|s| format!("{:.0}", s * 1000.0))
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    summary(
        "crash_loop",
        &[
            ("slots", SLOTS.to_string()),
            (
                "spawns",
                events(&lines, "worker spawned").count().to_string(),
            ),
            ("window_ms", window.as_millis().to_string()),
            ("spawn_gaps_ms", shown.join(";")),
            ("master_cpu_ms", cpu_used.as_millis().to_string()),
            ("master_cpu_pct", format!("{:.1}", cpu_share * 100.0)),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("max_children", sampled.max_alive.to_string()),
            ("children_after", children_after.to_string()),
        ],
    );
    for gaps in &gaps_by_slot {
        assert_eq!(gaps.len(), FAILURES as usize - 1, "{gaps:?}");
        assert!(gaps[0] >= 0.1, "first respawn after {:.3} s", gaps[0]);
        // Each delay is 2× the last with up to 25 % jitter: at least 1.6× apart, less the
        // few milliseconds a spawn and an exit take.
        assert!(
            gaps.windows(2).all(|w| w[1] >= w[0] * 1.4),
            "gaps must grow about twofold: {gaps:?}"
        );
    }
    assert!(
        cpu_share < CPU_BOUND,
        "the master used {cpu_used:?} of CPU in {window:?}"
    );
    assert!(
        fds_after <= fds_before + 1,
        "descriptors {fds_before} -> {fds_after}: {}",
        fd_list(master)
    );
    assert!(sampled.max_alive <= SLOTS, "{sampled:?}");
    assert!(children_after <= SLOTS, "{:?}", children(master));
    assert!(b.is_running(), "the master died:\n{}", b.dump());
    assert_no_panic(&b);
}

// ---------------------------------------------------------------------------------------------
// 5. Many worker deaths in a row.

/// Four slots of a python worker that serves exactly one request and exits ([`python::ONE_SHOT`]);
/// one client sends requests back to back for up to 10 s or 500 requests: each answered
/// request is one worker death and one respawn. Afterwards the master holds no more
/// descriptors than it did with its first four workers, and has no unreaped child.
///
/// The pace is the python start: ~80 ms on an idle machine, 400 ms and more on a loaded one
/// (a median of 373 ms from `worker spawned` to `worker ready` at a load of 18 on 2 cores, for
/// 21 ms from `worker exited` to the respawn). So when the 10 s are over with fewer than the
/// 100 deaths the test is about, it goes on until it has them, up to 60 s in all.
///
/// Client failures are reported, not asserted: with one-request workers the four slots are
/// often all dead or starting at once (a python start takes ~80 ms), and then there is no
/// healthy worker and the promise does not apply. The master's own counters say which:
/// `no_backend` (none in rotation) or `connect_failed` (every worker offered refused).
/// Mid-stream failures (`reset`) must not happen: a one-shot worker stops listening before
/// it answers, so no connection waits in the queue of a worker that is exiting.
#[test]
fn hundreds_of_worker_deaths_leak_no_fd_and_no_zombie() {
    const WORKERS: usize = 4;
    const MAX_DEATHS: usize = 500;
    const MIN_DEATHS: usize = 100;
    const FOR: Duration = Duration::from_secs(10);
    const AT_MOST: Duration = Duration::from_secs(60);

    let b = Balancer::start(&[
        "--cpus",
        "4",
        "--admin",
        "127.0.0.1:0",
        "--",
        python::python(),
        "-S",
        "-c",
        python::ONE_SHOT,
    ]);
    let addr = b.addr();
    let admin = admin_addr(&b);
    wait_in_rotation(&b, WORKERS, READY);
    let master = b.pid();
    let fds_before = steady_fd_count(master, Duration::from_millis(300));

    // One client, requests back to back; after a failure (no worker in rotation) it pauses
    // a moment so that the 500 are spent on deaths, not on failures.
    let started = Instant::now();
    let mut report = load::Report::default();
    let mut served = 0;
    while served < MAX_DEATHS
        && (started.elapsed() < FOR || served < MIN_DEATHS)
        && started.elapsed() < AT_MOST
    {
        let attempt = load::request(addr, load::REQUEST, Duration::from_secs(5));
        report.attempts.push(attempt);
        if attempt.outcome == Outcome::Ok {
            served += 1;
        } else {
            thread::sleep(Duration::from_millis(5));
        }
    }

    let spent = started.elapsed();
    wait_in_rotation(&b, WORKERS, READY);
    let ok = wait_until(Duration::from_secs(5), || zombies(master).is_empty());
    assert!(ok, "zombies: {:?}", zombies(master));
    let fds_after = expect_fds_at_most(
        master,
        fds_before,
        Duration::from_secs(5),
        "after the deaths",
    );
    let lines = b.lines();
    let deaths = events(&lines, "worker exited").count();
    let m = metrics(admin);
    let failed = report.failed_kinds();
    summary(
        "one_shot_deaths",
        &[
            ("workers", WORKERS.to_string()),
            ("threads", "1".to_string()),
            ("connections", report.len().to_string()),
            ("secs", format!("{:.1}", spent.as_secs_f64())),
            ("served", served.to_string()),
            ("worker_deaths", deaths.to_string()),
            ("failed", failed.total().to_string()),
            ("failed_kinds", failed.to_string()),
            (
                "master_no_backend",
                metric(&m, "balancer_connections_no_backend_total").to_string(),
            ),
            (
                "master_connect_failed",
                metric(&m, "balancer_connections_connect_failed_total").to_string(),
            ),
            (
                "master_reset",
                metric(&m, "balancer_connections_reset_total").to_string(),
            ),
            ("fds", format!("{fds_before}->{fds_after}")),
            ("zombies", zombies(master).len().to_string()),
        ],
    );
    assert!(deaths >= MIN_DEATHS, "only {deaths} deaths:\n{}", b.dump());
    assert!(deaths >= served, "{deaths} deaths, {served} answers");
    assert_eq!(
        metric(&m, "balancer_connections_reset_total"),
        0,
        "mid-stream failures: {m:?}"
    );
    assert!(b.lines().iter().all(|l| !looks_like_panic(l)));
}
