//! `--config FILE` and `--check` (issue 14): a TOML file runs balancer, flags override it,
//! and `--check` judges it without binding or starting anything.

use std::net::TcpListener;

use super::*;

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("writing the config file");
    path.display().to_string()
}

#[test]
fn a_toml_file_runs_balancer_and_the_command_line_overrides_it() {
    let dir = TempDir::new("ops-config-run");
    let file = write(
        &dir,
        "balancer.toml",
        "# a config file\nlisten = \"127.0.0.1:0\"\ncpus = 3\nadmin = \"127.0.0.1:0\"\n\
         ready_timeout = \"20s\"\nbalance = \"least-conn\"\n",
    );
    let b = Balancer::start_exact(&["--config", &file, "--cpus", "2"]);
    let (_, line) = b.expect_line(0, "`listening`", STARTUP, |l| is_event(l, "listening"));
    assert_eq!(field(&line, "workers"), Some("2"), "{line}");
    assert!(
        field(&line, "addr").is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{line}"
    );
    wait_all_ready(&b, 2);
    // The file's admin endpoint is up, and serves.
    let admin = admin_addr(&b);
    assert!(get_ok(admin, "/status").contains("\"workers\""));
}

#[test]
fn check_judges_flags_and_file_without_binding_anything() {
    let dir = TempDir::new("ops-config-check");
    // The file names a port this test holds: a check that bound it would fail.
    let held = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = held.local_addr().expect("its address").port();
    let good = write(
        &dir,
        "good.toml",
        &format!(
            "listen = \"127.0.0.1:{port}\"\ncpus = 2\ncommand = [\"sh\", \"-c\", \"sleep 1\"]\n"
        ),
    );
    for flag in ["--check", "-t"] {
        let run = run_client(&["--config", &good, flag]);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.stdout, "configuration ok\n", "{run:?}");
        assert!(run.stderr.is_empty(), "{run:?}");
    }
    // Flags alone are judged too.
    let run = run_client(&["--cpus", "0", "--check"]);
    assert_one_error_line(&run, "--cpus 0");

    let unknown = write(
        &dir,
        "unknown.toml",
        "cpus = 2\n\nlisten_address = \":80\"\n",
    );
    let run = run_client(&["--config", &unknown, "--check"]);
    assert_one_error_line(&run, "line 3: unknown key `listen_address`");

    let wrong_type = write(&dir, "type.toml", "cpus = 2\nhealth-rise = [1, 2]\n");
    let run = run_client(&["--config", &wrong_type, "--check"]);
    assert_one_error_line(&run, "line 2: key `health-rise`: found a list");

    let bad_value = write(&dir, "value.toml", "grace = \"soon\"\n");
    let run = run_client(&["--config", &bad_value, "-t"]);
    assert_one_error_line(&run, "line 1: key `grace`");

    let no_program = write(
        &dir,
        "program.toml",
        "command = [\"definitely-not-a-program-xyz\"]\n",
    );
    let run = run_client(&["--config", &no_program, "--check"]);
    assert_one_error_line(&run, "not found in PATH");

    let broken = write(&dir, "broken.toml", "cpus = 2\nlisten = \"unterminated\n");
    let run = run_client(&["--config", &broken, "--check"]);
    assert_one_error_line(&run, "line 2");

    let run = run_client(&["--config", "/nonexistent/balancer.toml", "--check"]);
    assert_one_error_line(&run, "/nonexistent/balancer.toml");
    drop(held);
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_text_fields() {
    let b = Balancer::start(&["--cpus", "1", "--log-format", "json"]);
    let parsed = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok();
    let ready = b.wait_for_line(READY_TIMEOUT, |l| {
        parsed(l).is_some_and(|v| v["message"] == "all workers ready")
    });
    assert!(
        ready.is_some(),
        "no JSON `all workers ready`:\n{}",
        b.dump()
    );
    let lines = b.lines();
    let objects: Vec<serde_json::Value> = lines.iter().filter_map(|l| parsed(l)).collect();
    let listening = objects
        .iter()
        .find(|v| v["message"] == "listening")
        .unwrap_or_else(|| panic!("no JSON `listening`:\n{}", b.dump()));
    for key in ["timestamp", "level", "addr", "workers", "mode", "max_conns"] {
        assert!(
            listening.get(key).is_some(),
            "`listening` without {key}: {listening}"
        );
    }
    assert!(listening["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("127.0.0.1:")));
    let spawned = objects
        .iter()
        .find(|v| v["message"] == "worker spawned")
        .expect("a JSON `worker spawned`");
    assert!(
        spawned["pid"].as_u64().is_some() && spawned["slot"] == 0,
        "{spawned}"
    );
    // Nothing of the master's own is in the text format.
    assert!(
        !lines
            .iter()
            .any(|l| is_event(l, "listening") || is_event(l, "worker spawned")),
        "text lines in a JSON log:\n{}",
        b.dump()
    );
}
