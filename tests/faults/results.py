#!/usr/bin/env python3
"""Turns the output of the fault suite into tests/faults/RESULTS.md.

    cargo nextest run --test tests faults --run-ignored all --no-capture --no-fail-fast 2>&1 \
        | python3 tests/faults/results.py > tests/faults/RESULTS.md

Each fault test prints one `faults: scenario=NAME key=value ...` line (values with spaces are
quoted). With --no-capture nextest runs the tests one at a time, so a summary line belongs
to the test whose START line came last; its PASS or FAIL line says how it ended.
"""

import glob
import os
import re
import shlex
import sys

# The numbering of the scenarios.
NUMBER = {
    "kill9": 1, "three_refusing": 1, "sigstop": 2, "reload": 3, "reload_bound": 3,
    "crash_loop": 4, "one_shot_deaths": 5, "low_fd_limit": 6,
    "low_fd_limit_default_cap": 6, "low_fd_limit_hold": 6, "max_conns_1": 6, "idle_slow": 7, "sigterm_inflight": 9,
    "sigterm_over_grace": 9,
}
LOAD_KEYS = [
    "workers", "slots", "threads", "connections", "kills", "reloads", "nofile", "max_conns",
    "idle_clients_held", "burst_clients", "later_connections", "idle_clients", "slow_clients",
    "lines", "bad_lines", "messages_with_fds", "fds_sent", "refusing", "request_s", "grace_s",
    "idle_timeout_ms", "served", "worker_deaths", "spawns",
]


def is_failure_key(key):
    return "failed" in key or key.endswith("_kinds") or key.startswith("inflight")


def ignored_tests():
    """Names of the fault tests marked #[ignore] (each shows a product bug)."""
    names = set()
    here = os.path.dirname(os.path.abspath(__file__))
    for path in glob.glob(os.path.join(here, "*.rs")):
        text = open(path, encoding="utf-8").read()
        names.update(re.findall(r"#\[ignore[^\n]*\n\s*fn (\w+)", text))
    return names


def main():
    ignored = ignored_tests()
    current = None
    results = {}  # test -> {"fields": ..., "status": ...}
    order = []
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        m = re.search(r"\bSTART\s+\[.*?\]\s+\(\s*\d+/\d+\)\s+\S+\s+(faults::\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"\b(PASS|FAIL|SIGSEGV|ABORT|TIMEOUT)\s+\[.*?\]\s+\(\s*\d+/\d+\)\s+\S+\s+(faults::\S+)", line)
        if m and m.group(2) in results:
            results[m.group(2)]["status"] = m.group(1).lower()
            continue
        if line.startswith("faults: scenario="):
            fields = {}
            for token in shlex.split(line[len("faults: "):]):
                key, _, value = token.partition("=")
                fields[key] = value
            test = current or fields["scenario"]
            results[test] = {"fields": fields, "status": "?"}
            order.append(test)

    def row(test):
        fields = dict(results[test]["fields"])
        scenario = fields.pop("scenario")
        number = NUMBER.get(scenario, 8 if scenario.startswith("ipc") else "")
        load = ", ".join(f"{k}={fields.pop(k)}" for k in LOAD_KEYS if k in fields)
        failures = ", ".join(f"{k}={fields.pop(k)}" for k in list(fields) if is_failure_key(k))
        other = ", ".join(f"{k}={v}" for k, v in fields.items())
        name = test.split("::", 1)[1]
        bug = name.rsplit("::", 1)[-1] in ignored
        status = results[test]["status"]
        if bug:
            status = f"{status} (product bug, `#[ignore]`)"
        text = f"| {number} | `{scenario}` | `{name}` | {status} | {load} | {failures or '-'} | {other} |"
        return (str(number), bug, name), text

    rows = sorted((row(t) for t in order), key=lambda r: r[0])
    print("| # | scenario | test | result | load | failures (by kind) | other figures |")
    print("|---|---|---|---|---|---|---|")
    for _, text in rows:
        print(text)


if __name__ == "__main__":
    main()
