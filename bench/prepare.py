"""Getting ready for a benchmark run: the tools (wrk, nginx with `stream`, HAProxy from apt;
matplotlib from pip), a release build of balancer, the open-file limit, and the versions and
machine the results are stamped with. Shared by run.py and cost_curve.py."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Timeouts of the setup commands.
APT_TIMEOUT = 900
BUILD_TIMEOUT = 1800
PIP_TIMEOUT = 600
#: The repository root.
REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_tools(no_install: bool) -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx"), ("haproxy", "haproxy")) if not shutil.which(tool)]
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    if no_install:
        sys.exit(f"missing: {' '.join(missing)} (and --no-install was given)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {' '.join(missing)} from apt")
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=APT_TIMEOUT, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, timeout=APT_TIMEOUT, env=env)


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        pass
    log("installing matplotlib with pip (for the chart)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], timeout=PIP_TIMEOUT)
    if done.returncode != 0:
        log("pip could not install matplotlib: no chart this time")
        return False
    return True


def build() -> Path:
    log("cargo build --release")
    subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True, timeout=BUILD_TIMEOUT)
    return binary()


def binary() -> Path:
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target_dir / "release" / "balancer"
    if not path.exists():
        sys.exit(f"{path} does not exist; build it or drop --no-build")
    return path


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one, for us and every process we start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def versions(bin_path: Path) -> dict[str, str]:
    git = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=10"])
    return {
        "balancer": f"{_first_line([str(bin_path), '--version']).replace('balancer ', '')} (commit {git})",
        "nginx": _first_line(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "haproxy": _first_line(["haproxy", "-v"]).replace("HAProxy version ", "").split(" ")[0],
        "wrk": _first_line(["wrk", "--version"]).replace("wrk ", "").split(" ")[0],
        "python": platform.python_version(),
    }


def machine_summary() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem_gib:.0f} GiB, Linux {platform.release()}"
