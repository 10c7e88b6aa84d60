#!/usr/bin/env python3
"""The seed problem, measured: one long computation blocks a single-threaded worker.

Runs balancer with 2 built-in workers, keeps one of them busy with back-to-back `/sum`
requests, and meanwhile sends sequential `GET /` requests, for `--balance round-robin` and
`--balance least-conn` side by side. Prints p50/p99 of `/` for each, as a Markdown table.

    python3 bench/blocking.py [--requests 200] [--sum-n 800000000] [--binary target/release/balancer]
    python3 bench/blocking.py --keep-alive   # #12: keep-alive clients, tcp vs --protocol http

With `--keep-alive` (issue 12), every client keeps one connection open, as browsers do: 4
clients send sequential `GET /` beside one client sending `/sum` back to back, with
`--balance least-conn`, for `--protocol tcp` (the connection is the unit: a client stays on
its worker) and `--protocol http` (each request is balanced).

Loopback only; every run is bounded in count and time; every process is stopped by pid.
"""

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def get(addr, path, timeout=30.0):
    """One HTTP/1.1 request with Connection: close; returns the body."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


def start(binary, policy, extra=()):
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--cpus", "2", "--balance", policy, *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    addr, ready = None, 0
    deadline = time.time() + 20
    while time.time() < deadline and ready < 2:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening addr=([\d.]+):(\d+)", line)
        if m:
            addr = (m.group(1), int(m.group(2)))
        if "worker ready" in line:
            ready += 1
    if addr is None or ready < 2:
        proc.kill()
        raise SystemExit(f"balancer did not start ({policy})")
    # Keep draining stderr so the master never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, addr


def measure(binary, policy, requests, sum_n):
    proc, addr = start(binary, policy)
    stop = threading.Event()

    def busy():
        end = time.time() + 120
        while not stop.is_set() and time.time() < end:
            try:
                get(addr, f"/sum?n={sum_n}")
            except OSError:
                return  # the master is stopping

    t = threading.Thread(target=busy, daemon=True)
    try:
        t.start()
        time.sleep(0.2)  # let the first /sum reach a worker
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            get(addr, "/")
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1]
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t.join(timeout=5)


def measure_keepalive(binary, protocol, requests, sum_n, clients=4):
    """p50/p99/max of `GET /` from `clients` keep-alive clients beside one keep-alive
    client running `/sum` back to back, with least-conn and `--protocol protocol`."""
    proc, addr = start(binary, "least-conn", ["--protocol", protocol])
    stop = threading.Event()

    def busy():
        c = http.client.HTTPConnection(*addr, timeout=60)
        end = time.time() + 120
        while not stop.is_set() and time.time() < end:
            try:
                c.request("GET", f"/sum?n={sum_n}")
                c.getresponse().read()
            except OSError:
                return

    lat, lock = [], threading.Lock()

    def client():
        c = http.client.HTTPConnection(*addr, timeout=60)
        for _ in range(requests // clients):
            t0 = time.perf_counter()
            c.request("GET", "/")
            c.getresponse().read()
            with lock:
                lat.append((time.perf_counter() - t0) * 1000)
        c.close()

    t = threading.Thread(target=busy, daemon=True)
    try:
        t.start()
        time.sleep(0.2)  # let the first /sum reach a worker
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
        lat.sort()
        return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1]
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t.join(timeout=5)


def main_keepalive(args):
    rows = [(p, *measure_keepalive(args.binary, p, args.requests, args.sum_n)) for p in ("tcp", "http")]
    print(f"`GET /` latency from 4 keep-alive clients while a fifth keep-alive client runs "
          f"`/sum?n={args.sum_n}` back to back, 2 workers, --balance least-conn "
          f"({args.requests} requests, {time.strftime('%Y-%m-%d')}):\n")
    print("| --protocol | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for protocol, p50, p99, worst in rows:
        print(f"| {protocol} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")
    print(f"\np99 tcp / http: {rows[0][2] / rows[1][2]:.1f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sum-n", type=int, default=800_000_000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "balancer"))
    ap.add_argument("--keep-alive", action="store_true", help="keep-alive clients, --protocol tcp vs http (#12)")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    if args.keep_alive:
        return main_keepalive(args)
    rows = []
    for policy in ("round-robin", "least-conn"):
        p50, p99, worst = measure(args.binary, policy, args.requests, args.sum_n)
        rows.append((policy, p50, p99, worst))
    print(f"`GET /` latency while one of 2 workers runs `/sum?n={args.sum_n}` back to back "
          f"({args.requests} sequential requests, {time.strftime('%Y-%m-%d')}):\n")
    print("| --balance | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for policy, p50, p99, worst in rows:
        print(f"| {policy} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
