"""What wrk is pointed at: one built-in worker directly (the ceiling), balancer, nginx
(`stream`, round-robin) and HAProxy (`mode tcp`, `balance roundrobin`), the last three in
front of the same two workers, each on its own free loopback port. Also balancer's log
format, which the bench reads to learn the workers' ports and their restarts."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from processes import ProcessSet, Started

#: How long balancer may take to listen and report every worker ready: under valgrind
#: (`http_cost.py --callgrind`) on a box shared by several builds, 30 s was not enough.
BALANCER_START_TIMEOUT = 90.0
#: How long nginx or HAProxy may take to accept connections on its port.
PROXY_START_TIMEOUT = 10.0
#: Timeout of quick helper commands (`--help`, `nginx -V`, `haproxy -c`).
COMMAND_TIMEOUT = 20.0

# ---------------------------------------------------------------------------------------
# balancer's log: tracing-subscriber's fmt output without ANSI colours, e.g.
# `2026-11-27T10:13:58.076635Z  INFO worker ready slot=0 pid=15772 addr=127.0.0.1:38369 in_rotation=1`

_LOG_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)\s+(?P<level>TRACE|DEBUG|INFO|WARN|ERROR)\s+(?P<rest>.*)$"
)
_FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")


@dataclass
class LogLine:
    #: Unix time of the event, from the line's own timestamp.
    ts: float
    level: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


def parse_log_line(text: str) -> LogLine | None:
    """One line of balancer's log; None for anything else (e.g. relayed worker output)."""
    m = _LOG_LINE.match(text)
    if not m:
        return None
    rest = m["rest"]
    first = _FIELD.search(rest)
    message = (rest[: first.start()] if first else rest).strip()
    fields = {k: v.strip('"') for k, v in _FIELD.findall(rest)}
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", m["ts"])  # Python reads at most microseconds
    return LogLine(datetime.fromisoformat(stamp).timestamp(), m["level"], message, fields)


def _message(msg: str) -> Callable[[str], LogLine | None]:
    def match(text: str) -> LogLine | None:
        line = parse_log_line(text)
        return line if line is not None and line.message == msg else None

    return match


@dataclass
class Balancer:
    """A running balancer master."""

    proc: Started
    #: Where clients connect, "127.0.0.1:PORT".
    listen: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready_workers(self) -> dict[int, tuple[int, str]]:
        """slot -> (pid, addr) of each worker in rotation now, according to the log."""
        slots: dict[int, tuple[int, str]] = {}
        for _, text in list(self.proc.lines):
            line = parse_log_line(text)
            if line is None or "slot" not in line.fields:
                continue
            slot = int(line.fields["slot"])
            if line.message == "worker ready":
                slots[slot] = (int(line.fields["pid"]), line.fields["addr"])
            elif line.message in ("worker out of rotation", "worker exited", "worker stopped"):
                if slot in slots and slots[slot][0] == int(line.fields.get("pid", -1)):
                    del slots[slot]
        return slots


def balancer_env() -> dict[str, str]:
    """Our environment without balancer's own variables, so the flags alone decide."""
    return {k: v for k, v in os.environ.items() if k not in ("BALANCER_LOG", "BALANCER_LISTEN", "BALANCER_CPUS")}


def start_balancer(
    procs: ProcessSet,
    binary: Path,
    tmp: Path,
    name: str,
    cpus: int,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Balancer:
    """Starts balancer on 127.0.0.1:0 with `cpus` built-in workers and waits until the log
    says every worker is ready. `env` adds variables to its environment."""
    argv = [str(binary), "--listen", "127.0.0.1:0", "--cpus", str(cpus), *(extra or [])]
    proc = procs.start(name, argv, tmp / f"{name}.log", env={**balancer_env(), **(env or {})})
    _, listening = proc.wait_for(_message("listening"), BALANCER_START_TIMEOUT)
    proc.wait_for(_message("all workers ready"), BALANCER_START_TIMEOUT)
    return Balancer(proc, listening.fields["addr"])


def has_flag(binary: Path, flag: str) -> bool:
    """Whether `balancer --help` lists `flag` (an older build measured with --binary may not)."""
    text = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    return re.search(rf"(^|\s){re.escape(flag)}\b", text, re.M) is not None


def balancer_modes(binary: Path) -> list[str]:
    """The values `--mode` takes, from `balancer --help`; [] when this version has no `--mode`."""
    text = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    m = re.search(r"^\s*(?:-\w, )?--mode\b(.*?)(?=^\s*(?:-\w, )?--[\w-]+|\Z)", text, re.M | re.S)
    if not m:
        return []
    section = m[1]
    listed = re.search(r"\[possible values: ([^\]]+)\]", section)
    if listed:
        return [v.strip() for v in listed[1].split(",")]
    found = re.findall(r"^\s*-\s+([\w-]+):", section, re.M)
    return found or [v for v in ("shared", "reuseport", "handoff") if v in section]


# ---------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str
    url: str
    #: The proxy's processes whose CPU is charged to it; empty for the direct target.
    proxy_pids: Callable[[], list[int]]


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: Started, port: int, timeout: float) -> None:
    """Waits until 127.0.0.1:`port` accepts a connection while `proc` still runs."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not listen on port {port} within {timeout:.0f}s; see {proc.log_path}")
            time.sleep(0.05)


def _nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nginx_load_stream() -> str:
    """The `load_module` line nginx needs for `stream`, or "" when it is built in."""
    info = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT).stderr
    if "--with-stream=dynamic" in info:
        for so in ("/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"):
            if Path(so).exists():
                return f"load_module {so};"
        raise RuntimeError("nginx builds stream as a module but ngx_stream_module.so is missing (apt-get install libnginx-mod-stream)")
    if re.search(r"--with-stream(\s|$)", info):
        return ""
    raise RuntimeError("this nginx has no stream module")


def start_nginx(
    procs: ProcessSet,
    tmp: Path,
    backends: list[str],
    worker_connections: int = 4096,
    backlog: int | None = None,
    connect_timeout: str = "2s",
    multi_accept: bool = False,
    worker_processes: str = "auto",
) -> Target:
    """nginx `stream` in front of `backends`. `worker_connections` counts both legs of a
    proxied connection, and one worker may take most connections (they race for accept).
    `backlog`: the listen queue; nginx's default is 511, balancer's 4096, HAProxy's its maxconn
    (all capped by net.core.somaxconn), and a burst of 10,000 connects overflows 511.
    `worker_processes`: nginx's own setting; "1" matches a one-thread proxy."""
    port = free_port()
    conf = tmp / "nginx.conf"
    servers = "\n".join(f"        server {b};" for b in backends)
    conf.write_text(
        f"""# written by bench/run.py
{_nginx_load_stream()}
daemon off;
master_process on;
worker_processes {worker_processes};
worker_rlimit_nofile {_nofile()};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections {worker_connections};{chr(10) + "    multi_accept on;" if multi_accept else ""}
}}
stream {{
    upstream workers {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port}{f" backlog={backlog}" if backlog else ""};
        proxy_pass workers;
        proxy_connect_timeout {connect_timeout};
    }}
}}
"""
    )
    argv = ["nginx", "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    proc = procs.start("nginx", argv, tmp / "nginx.out")
    wait_listening(proc, port, PROXY_START_TIMEOUT)
    return Target("nginx", f"http://127.0.0.1:{port}/", proc.pids)


def start_haproxy(
    procs: ProcessSet, tmp: Path, backends: list[str], threads: int, connect_timeout: str = "2s", maxaccept: int | None = None
) -> Target:
    """HAProxy `mode tcp` in front of `backends`. `maxaccept`: `tune.maxaccept`, how many
    connections a thread accepts in a row before it serves the others (-1: no limit)."""
    port = free_port()
    # Each proxied connection holds two fds; leave room for listeners, logs and pollers.
    maxconn = max(256, min(20_000, (_nofile() - 200) // 2))
    servers = "\n".join(f"    server w{i} {b}" for i, b in enumerate(backends))
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        f"""# written by bench/run.py
global
    nbthread {threads}
    maxconn {maxconn}{"" if maxaccept is None else f"{chr(10)}    tune.maxaccept {maxaccept}"}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect {connect_timeout}
    timeout client 60s
    timeout server 60s

frontend bench
    bind 127.0.0.1:{port}
    default_backend workers

backend workers
    balance roundrobin
{servers}
"""
    )
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejects {cfg}: {(check.stdout + check.stderr).strip()}")
    proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)], tmp / "haproxy.out")
    wait_listening(proc, port, PROXY_START_TIMEOUT)
    return Target("haproxy", f"http://127.0.0.1:{port}/", proc.pids)


def start_nginx_http(procs: ProcessSet, tmp: Path, backends: list[str]) -> Target:
    """nginx as an HTTP reverse proxy (#12): `proxy_pass` to an `upstream` with `keepalive`
    (HTTP/1.1 and an empty `Connection` header upstream, so backend connections are
    reused), round-robin over the same workers; access log off, like balancer's default."""
    port = free_port()
    conf = tmp / "nginx-http.conf"
    servers = "\n".join(f"        server {b};" for b in backends)
    conf.write_text(
        f"""# written by bench/targets.py
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {_nofile()};
pid {tmp}/nginx-http.pid;
error_log {tmp}/nginx-http-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    upstream workers {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""
    )
    argv = ["nginx", "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / "nginx-http-error.log")]
    proc = procs.start("nginx-http", argv, tmp / "nginx-http.out")
    wait_listening(proc, port, PROXY_START_TIMEOUT)
    return Target("nginx-http", f"http://127.0.0.1:{port}/", proc.pids)
