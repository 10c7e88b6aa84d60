#!/usr/bin/env bash
# Builds the statically linked release binary on the host, checks that it is static, then
# builds the FROM scratch image around it.
#
#   deploy/build-image.sh [TAG]        (default tag: balancer:latest, or $BALANCER_IMAGE)
#
# The build context is a directory holding only the binary, so the image build sends a few
# MB to the daemon instead of the whole target/ directory.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-${BALANCER_IMAGE:-balancer:latest}}
target=x86_64-unknown-linux-gnu
bin=target/$target/release/balancer

echo "build-image: building the static binary ($target, +crt-static)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin balancer

# A static binary has no program interpreter (no dynamic loader) and needs no shared library.
if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
  echo "build-image: error: $bin is dynamically linked: $(file -L "$bin")" >&2
  ldd "$bin" >&2 || true
  exit 1
fi
echo "build-image: $(file -bL "$bin" | cut -d, -f1-4); ldd: $(ldd "$bin" 2>&1 | tr -d '\t')" >&2

context=target/docker-context
rm -rf "$context"
mkdir -p "$context"
cp "$bin" "$context/balancer"
# Debug info stays in target/ for the host's debugger; the image carries a stripped copy.
strip "$context/balancer" 2>/dev/null || true
chmod 0755 "$context/balancer"

echo "build-image: building image $tag" >&2
docker build --quiet -f deploy/Dockerfile -t "$tag" "$context" >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "build-image: $tag ($((size / 1024)) KiB)" >&2
