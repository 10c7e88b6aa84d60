#!/usr/bin/env bash
# Validates deploy/k8s/*.yaml against the Kubernetes API schemas (kubernetes-validate ships
# them: no cluster and no network needed), strictly (unknown fields fail), for the oldest
# version the manifests need (1.30: the preStop sleep action) and the newest the tool knows.
# Then checks what no schema can: that the pod's termination grace period covers the
# preStop sleep, balancer's --grace and the worker stop timeout, and that the probes and the
# Service point at ports the container declares.
set -euo pipefail
cd "$(dirname "$0")"

# The module, not the script: pip may put the script where PATH does not look (pyenv shims).
validate() { python3 -m kubernetes_validate "$@"; }
if ! validate --version >/dev/null 2>&1; then
  echo "k8s: error: kubernetes-validate not found (python3 -m pip install kubernetes-validate)" >&2
  exit 1
fi

# The validator itself must reject a bad manifest, or a pass below means nothing.
bad=$(mktemp --suffix=.yaml)
trap 'rm -f "$bad"' EXIT
sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecondz:/' deployment.yaml >"$bad"
if validate --strict --quiet "$bad" >/dev/null 2>&1; then
  echo "k8s: error: kubernetes-validate accepted a manifest with an unknown field" >&2
  exit 1
fi

for version in 1.30.0 ""; do
  validate --strict --quiet ${version:+-k "$version"} ./*.yaml
done

python3 - <<'PY'
import sys, yaml

# After --grace, stopping the workers takes at most 7 s + about 1 s (docs/LIFECYCLE.md).
WORKER_STOP_TIMEOUT = 8

def seconds(text):
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    if text.endswith("s"):
        return int(text[:-1])
    raise SystemExit(f"k8s: error: cannot read duration {text!r}")

dep = yaml.safe_load(open("deployment.yaml"))
svc = yaml.safe_load(open("service.yaml"))
pod = dep["spec"]["template"]["spec"]
(c,) = pod["containers"]
args = c["args"]
grace = seconds(args[args.index("--grace") + 1])
pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
need = pre_stop + grace + WORKER_STOP_TIMEOUT
have = pod["terminationGracePeriodSeconds"]
if have < need:
    sys.exit(f"k8s: error: terminationGracePeriodSeconds {have} < preStop {pre_stop} + --grace {grace} + stop timeout {WORKER_STOP_TIMEOUT}")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
admin = int(args[args.index("--admin") + 1].rsplit(":", 1)[1])
listen = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
if ports.get("admin") != admin or ports.get("http") != listen:
    sys.exit(f"k8s: error: container ports {ports} do not match --listen {listen} / --admin {admin}")
for probe in ("readinessProbe", "livenessProbe"):
    get = c[probe]["httpGet"]
    if get["port"] != "admin" or get["path"] != "/healthz":
        sys.exit(f"k8s: error: {probe} is not GET /healthz on the admin port")
if c["resources"]["limits"].get("cpu") is None or "--cpus" not in args or args[args.index("--cpus") + 1] != "auto":
    sys.exit("k8s: error: the worker count must come from the cpu limit (--cpus auto + limits.cpu)")
env = {e["name"]: e for e in c.get("env", [])}
if not args[args.index("--admin") + 1].startswith("127.") and "BALANCER_ADMIN_TOKEN" not in env:
    sys.exit("k8s: error: a non-loopback --admin needs BALANCER_ADMIN_TOKEN (balancer refuses to start without it)")
if any(p["targetPort"] not in ports for p in svc["spec"]["ports"]):
    sys.exit("k8s: error: the Service targets a port the container does not declare")
print(f"k8s: terminationGracePeriodSeconds {have} >= {need} (preStop {pre_stop} + grace {grace} + stop {WORKER_STOP_TIMEOUT}); probes and ports agree")
PY
echo "k8s: manifests valid"
