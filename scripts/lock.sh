#!/usr/bin/env bash
# Remakes the lock files in requirements/ after a change to pyproject.toml or client/pyproject.toml:
#   dev.lock.txt  the dev environment (scripts/setup.sh, CI): extras cpu,dev
#   cpu.lock.txt  the CPU image (docker/cpu.Dockerfile): extra cpu
#   gpu.lock.txt  the GPU image (docker/gpu.Dockerfile, deploy/kuberay/): onnxruntime-gpu, without tensorrt-cu13
# for Linux x86_64 (glibc 2.35 or newer: Ubuntu 22.04, Debian 12) and Python 3.11. Pins already in a lock are
# kept where they still fit (uv's preference for the output file's versions); to move one package:
#   UV_ARGS="--upgrade-package optuna" bash scripts/lock.sh
# Needs uv (https://docs.astral.sh/uv/, from PyPI): $UV, else `uv` on PATH, else one installed into
# $UV_VENV (default /tmp/mobile-vla-uv). Extra package sources (a local index) go in UV_EXTRA_INDEX_URL /
# UV_FIND_LINKS; they are not written into the locks.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || true)}
if [ -z "$UV" ]; then
  UV_VENV=${UV_VENV:-/tmp/mobile-vla-uv}
  [ -x "$UV_VENV/bin/uv" ] || { python3.11 -m venv "$UV_VENV" && "$UV_VENV/bin/pip" install -q "uv>=0.13,<0.14"; }
  UV="$UV_VENV/bin/uv"
fi
for name in dev cpu gpu; do
  # shellcheck disable=SC2086  # UV_ARGS is a list of flags
  "$UV" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_35 \
    --index-strategy unsafe-best-match --no-emit-package mobile-vla --no-emit-package mobile-vla-client \
    ${UV_ARGS:-} "requirements/$name.in" -o "requirements/$name.lock.txt"
  echo "lock: requirements/$name.lock.txt"
done
