#!/usr/bin/env bash
# The compose demo: an edge balancer in front of 3 app containers.
#
#   deploy/demo.sh up      build the static binary and the image, start the demo, wait until
#                          the edge is healthy, print what to try
#   deploy/demo.sh down    remove every container and network the demo made
#   deploy/demo.sh ps|logs|scale N
#
# COMPOSE_PROJECT_NAME (default balancer-demo) and BALANCER_DEMO_PORT (default 8080) let
# several copies run side by side. BALANCER_IMAGE (default balancer:latest) names the image;
# BALANCER_DEMO_NO_BUILD=1 uses it as it is. Works with `docker compose` or `docker-compose`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-balancer-demo}
export BALANCER_DEMO_PORT=${BALANCER_DEMO_PORT:-8080}
export BALANCER_IMAGE=${BALANCER_IMAGE:-balancer:latest}
# How long `up` waits for the edge to report healthy.
UP_TIMEOUT=${BALANCER_DEMO_UP_TIMEOUT:-120}

die() { echo "demo: error: $*" >&2; exit 1; }

# The Compose command this machine has: the plugin (`docker compose`) or the standalone.
compose() {
  if [ -z "${compose_cmd:-}" ]; then
    if docker compose version >/dev/null 2>&1; then
      compose_cmd="docker compose"
    elif command -v docker-compose >/dev/null; then
      compose_cmd="docker-compose"
    else
      die "neither \`docker compose\` nor \`docker-compose\` is installed"
    fi
  fi
  $compose_cmd -p "$COMPOSE_PROJECT_NAME" -f "$here/compose/compose.yaml" "$@"
}

# The id of the edge container, once it exists.
edge_id() { local ids; ids=$(compose ps -q edge 2>/dev/null) || true; echo "${ids%%$'\n'*}"; }

wait_healthy() {
  local deadline=$((SECONDS + UP_TIMEOUT)) id status
  while [ $SECONDS -lt $deadline ]; do
    id=$(edge_id)
    if [ -n "$id" ]; then
      status=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo gone)
      case $status in
        healthy) return 0 ;;
        gone) die "the edge container disappeared" ;;
      esac
    fi
    sleep 1
  done
  compose logs --tail 30 >&2 || true
  die "the edge was not healthy within ${UP_TIMEOUT}s"
}

up() {
  docker info >/dev/null 2>&1 || die "no Docker daemon answers (is it running? may you use it?)"
  if [ -n "${BALANCER_DEMO_NO_BUILD:-}" ]; then
    docker image inspect "$BALANCER_IMAGE" >/dev/null 2>&1 || die "no image $BALANCER_IMAGE (unset BALANCER_DEMO_NO_BUILD to build it)"
  else
    "$here/build-image.sh" "$BALANCER_IMAGE"
  fi
  compose up -d --remove-orphans
  echo "demo: waiting for the edge to be healthy" >&2
  wait_healthy
  local port=$BALANCER_DEMO_PORT
  cat <<TRY
demo: up (project $COMPOSE_PROJECT_NAME): edge on localhost:$port, $(compose ps -q app | wc -l) app containers

Try:
  curl localhost:$port/                 # which app container (host) and worker (pid) answered
  for i in \$(seq 6); do curl -s localhost:$port/; done
  curl localhost:$port/sum &            # a long computation: it blocks one worker only
  curl localhost:$port/                 # ...while the others answer at once
  $0 scale 5                 # the edge finds the new replicas within a second
  docker kill \$($0 ps -q app | head -n1)   # costs at most the requests in flight on it
  $0 down                    # removes every container and network of the demo
TRY
}

down() {
  compose down --remove-orphans --volumes --timeout 20
}

case ${1:-} in
  up) up ;;
  down) down ;;
  ps) shift; compose ps "$@" ;;
  logs) shift; compose logs "$@" ;;
  scale)
    [ $# -eq 2 ] || die "usage: $0 scale N"
    compose up -d --no-recreate --scale "app=$2" app
    ;;
  *) die "usage: $0 up|down|ps|logs|scale N" ;;
esac
