#!/usr/bin/env python3
"""Traffic for the compose demo's test (deploy/demo-test.sh), from the host to the edge.

Every request is a new connection (`Connection: close`), so in tcp mode each one is balanced
afresh. Every loop here is bounded both in requests and in time.

  traffic.py follow --port P --hosts h1,h2,... [--timeout S]
      Sends rounds of requests until one round is answered by exactly those app hosts
      (every one of them, and no other), or fails after the timeout. Prints what it saw.
  traffic.py kill --port P --victim CONTAINER [--concurrency C] [--requests N] [--seconds S]
      Runs a bounded load and `docker kill`s the victim a third of the way in. Fails if any
      request that started after the kill failed, or if more failed than were in flight at
      the kill (at most C).
"""
import argparse
import http.client
import subprocess
import sys
import threading
import time

# One request's deadline: generous, since the edge may wait out a connect timeout (1 s) to a
# replica that vanished before trying the next.
REQUEST_TIMEOUT = 5.0
PREFIX = "child worker run, at pid: "


def get(port, path="/"):
    """One GET on a new connection: (host, pid) of the app worker that answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        res = conn.getresponse()
        body = res.read().decode("utf-8", "replace")
    finally:
        conn.close()
    if res.status != 200 or not body.startswith(PREFIX):
        raise RuntimeError(f"status {res.status}, body {body!r}")
    pid, _, host = body[len(PREFIX):].strip().partition(", host: ")
    return host, int(pid)


def follow(args):
    want = set(filter(None, args.hosts.split(",")))
    deadline = time.monotonic() + args.timeout
    rounds = errors = 0
    # Enough requests per round that round-robin over every replica and worker shows each.
    per_round = 4 * len(want) * 2 + 4
    seen = {}
    while time.monotonic() < deadline:
        rounds += 1
        seen = {}
        for _ in range(per_round):
            try:
                host, _ = get(args.port)
                seen[host] = seen.get(host, 0) + 1
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                errors += 1
                last_error = e
        if set(seen) == want:
            print(f"traffic: after {rounds} round(s) of {per_round} the edge reaches exactly "
                  f"{len(want)} app containers {dict(sorted(seen.items()))} ({errors} errors while it followed)")
            return 0
        time.sleep(0.2)
    print(f"traffic: error: after {args.timeout}s the edge reaches {dict(sorted(seen.items()))}, "
          f"expected exactly {sorted(want)}; {errors} errors", file=sys.stderr)
    if errors:
        print(f"traffic: last error: {last_error!r}", file=sys.stderr)
    return 1


def kill(args):
    lock = threading.Lock()
    results = []  # (start, end, ok, host, error)
    started = [0]
    stop_at = time.monotonic() + args.seconds
    kill_at = [None]

    def run():
        while True:
            with lock:
                if started[0] >= args.requests or time.monotonic() >= stop_at:
                    return
                started[0] += 1
            t0 = time.monotonic()
            try:
                host, _ = get(args.port)
                ok, err = True, None
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                host, ok, err = None, False, repr(e)
            with lock:
                results.append((t0, time.monotonic(), ok, host, err))

    threads = [threading.Thread(target=run) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    # A third of the way in, by requests or by time, whichever comes first.
    third_time = time.monotonic() + args.seconds / 3
    while time.monotonic() < third_time and started[0] < args.requests / 3:
        time.sleep(0.01)
    kill_at[0] = time.monotonic()
    subprocess.run(["docker", "kill", args.victim], check=True, stdout=subprocess.DEVNULL)
    killed_done = time.monotonic()
    for t in threads:
        t.join()

    k = kill_at[0]
    in_flight = [r for r in results if r[0] <= killed_done and r[1] >= k]
    failed = [r for r in results if not r[2]]
    failed_in_flight = [r for r in failed if r[0] <= killed_done and r[1] >= k]
    failed_after = [r for r in failed if r[0] > killed_done]
    failed_before = [r for r in failed if r[1] < k]
    hosts = {}
    for r in results:
        if r[2]:
            hosts[r[3]] = hosts.get(r[3], 0) + 1
    elapsed = max(r[1] for r in results) - min(r[0] for r in results)
    print(f"traffic: {len(results)} requests in {elapsed:.1f}s at concurrency {args.concurrency}; "
          f"killed {args.victim[:12]} after {sum(1 for r in results if r[0] < k)} had started; "
          f"`docker kill` took {(killed_done - k) * 1000:.0f} ms, and {len(in_flight)} requests "
          f"were in flight during it")
    print(f"traffic: failures: {len(failed)} in all, {len(failed_in_flight)} of them in flight during the kill, "
          f"{len(failed_after)} started after it, {len(failed_before)} ended before it")
    print(f"traffic: answers by host: {dict(sorted(hosts.items()))}")
    for r in failed[:5]:
        print(f"traffic:   failed at +{r[0] - k:.3f}s (kill = 0): {r[4]}")
    if failed_after or failed_before:
        print("traffic: error: requests failed that were not in flight on the killed container",
              file=sys.stderr)
        return 1
    if len(failed_in_flight) > args.concurrency:
        print("traffic: error: more failures than requests in flight", file=sys.stderr)
        return 1
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("follow")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--hosts", required=True)
    f.add_argument("--timeout", type=float, default=30)
    k = sub.add_parser("kill")
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--victim", required=True)
    k.add_argument("--concurrency", type=int, default=8)
    k.add_argument("--requests", type=int, default=3000)
    k.add_argument("--seconds", type=float, default=15)
    args = p.parse_args()
    return follow(args) if args.cmd == "follow" else kill(args)


if __name__ == "__main__":
    sys.exit(main())
