#!/usr/bin/env bash
# Runs the compose demo for real and checks what the README promises (CI calls it from
# .ci/run): up; traffic from the host through the edge reaches every app container; scaling
# app 3 -> 5 -> 2 is followed by the edge; `docker kill` of one app container under a bounded
# load costs at most the requests in flight; `down` leaves no container and no network.
#
# Where no Docker daemon answers, it says so and exits 0 without testing anything (CI
# machines have one; a laptop may not).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if ! docker info >/dev/null 2>&1; then
  echo "demo-test: SKIPPED: no Docker daemon answers (docker info failed); the compose demo was not tested"
  exit 0
fi

# A project and a host port of its own, so it can run beside a user's demo or another run.
export COMPOSE_PROJECT_NAME=balancer-demotest-$$
export BALANCER_DEMO_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
demo=$here/demo.sh
label=com.docker.compose.project=$COMPOSE_PROJECT_NAME
started=$SECONDS

step() { echo "demo-test: [$((SECONDS - started))s] $*"; }
fail() { echo "demo-test: FAILED: $*" >&2; "$demo" logs --tail 40 >&2 || true; exit 1; }

leftovers() {
  docker ps -aq --filter "label=$label"
  docker network ls -q --filter "label=$label"
}
cleanup() {
  local rc=$?
  if [ -n "$(leftovers)" ]; then
    "$demo" down >/dev/null 2>&1 || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "demo-test: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# The app containers' host names (what the built-in worker puts in its answer), comma-separated.
app_hosts() {
  local ids
  ids=$("$demo" ps -q app)
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086
  docker inspect -f '{{if .State.Running}}{{.Config.Hostname}}{{end}}' $ids | grep . | sort | paste -sd, -
}
count() { tr ',' '\n' <<<"$1" | grep -c .; }
# The first app container's id (read whole: `| head` would cut compose off with SIGPIPE,
# which pipefail turns into a failure).
first_app() { local ids; ids=$("$demo" ps -q app); echo "${ids%%$'\n'*}"; }
follow() {
  python3 "$here/traffic.py" follow --port "$BALANCER_DEMO_PORT" --hosts "$1" --timeout 45 \
    || fail "the edge did not follow to $(count "$1") app containers"
}

step "up (project $COMPOSE_PROJECT_NAME, port $BALANCER_DEMO_PORT)"
"$demo" up >/dev/null

# The image: FROM scratch, a few MB, an unprivileged numeric user.
size=$(docker image inspect -f '{{.Size}}' "${BALANCER_IMAGE:-balancer:latest}")
user=$(docker image inspect -f '{{.Config.User}}' "${BALANCER_IMAGE:-balancer:latest}")
layers=$(docker image inspect -f '{{len .RootFS.Layers}}' "${BALANCER_IMAGE:-balancer:latest}")
[ "$size" -lt $((16 * 1024 * 1024)) ] || fail "the image is $size bytes"
[ "$user" = "65534:65534" ] || fail "the image runs as '$user'"
[ "$layers" -eq 1 ] || fail "the image has $layers layers (FROM scratch + one COPY has 1)"
step "image: $((size / 1024)) KiB, $layers layer, user $user"

hosts=$(app_hosts)
[ "$(count "$hosts")" -eq 3 ] || fail "expected 3 app containers, found: $hosts"
# --cpus auto in each app container: as many workers as its `cpus: 2` limit allows here.
log=$(docker logs "$(first_app)" 2>&1)
workers=$(sed -n 's/.*listening.* workers=\([0-9]*\).*/\1/p' <<<"$log")
workers=${workers%%$'\n'*}
expect=$(( $(nproc) < 2 ? $(nproc) : 2 ))
[ "$workers" = "$expect" ] || fail "app runs $workers workers; its cpu limit allows $expect"
step "3 app containers, $workers workers each (cpus: 2 limit, $(nproc) host CPUs)"
follow "$hosts"

step "scale app to 5"
"$demo" scale 5 >/dev/null 2>&1
hosts=$(app_hosts)
[ "$(count "$hosts")" -eq 5 ] || fail "expected 5 app containers, found: $hosts"
follow "$hosts"

step "scale app to 2"
"$demo" scale 2 >/dev/null 2>&1
hosts=$(app_hosts)
[ "$(count "$hosts")" -eq 2 ] || fail "expected 2 app containers, found: $hosts"
follow "$hosts"

step "scale app to 3, then kill one app container under load"
"$demo" scale 3 >/dev/null 2>&1
hosts=$(app_hosts)
follow "$hosts"
victim=$(first_app)
python3 "$here/traffic.py" kill --port "$BALANCER_DEMO_PORT" --victim "$victim" \
  --concurrency 8 --requests 3000 --seconds 15 \
  || fail "killing one app container cost more than the requests in flight on it"
rest=$(app_hosts)
[ "$(count "$rest")" -eq 2 ] || fail "expected 2 running app containers after the kill, found: $rest"
follow "$rest"

step "down"
"$demo" down >/dev/null 2>&1
left=$(leftovers)
[ -z "$left" ] || fail "down left behind: $left"
step "PASSED: up, spread over 3, scaled 3 -> 5 -> 2, kill under load, down left nothing"
