#!/usr/bin/env bash
# Checks the units with `systemd-analyze verify` (no running systemd needed): any complaint,
# even one systemd would only warn about and ignore, fails. The units name the installed
# binary, so the check runs on a copy pointing at the one built here.
set -euo pipefail
cd "$(dirname "$0")"
bin=${1:-../../target/debug/balancer}
[ -x "$bin" ] || { echo "systemd: error: no balancer binary at $bin (cargo build first)" >&2; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp balancer.socket balancer.service "$dir/"
sed -i "s#/usr/local/bin/balancer#$bin#" "$dir/balancer.service"
out=$(systemd-analyze verify "$dir/balancer.socket" "$dir/balancer.service" 2>&1) || true
if [ -n "$out" ]; then
  echo "systemd: error: systemd-analyze verify complains:" >&2
  echo "$out" >&2
  exit 1
fi
echo "systemd: balancer.socket and balancer.service verify clean"
