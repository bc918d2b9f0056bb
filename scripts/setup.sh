#!/usr/bin/env bash
# Sets up everything `make test` and `make demo` need, from nothing; quick when already done.
#   - Debian packages for headless MiniWorld rendering (Mesa EGL)
#   - a Python 3.11 virtual environment in $VENV (default .venv) with the package and its extras, and the
#     robot client (./client, package mobile-vla-client) the package depends on, both editable, every other
#     package at the version requirements/dev.lock.txt pins (the lock: docs/dependencies.md; scripts/lock.sh
#     remakes it after a change to pyproject.toml). Other EXTRAS than cpu,dev take the lock as constraints.
#   - the dev extra holds the test tools, Playwright among them: it drives the system's Chromium
#     (/usr/bin/chromium, Debian's chromium package, which .ci/run installs); never `playwright install`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,dev}
PYTHON=${PYTHON:-python3.11}
LOCK=${LOCK:-requirements/dev.lock.txt}

need_debs=()
for deb in libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa; do
  dpkg -s "$deb" >/dev/null 2>&1 || need_debs+=("$deb")
done
# Debian's python3.11 makes no venv without python3.11-venv (ensurepip is split out): install both if missing
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 && command -v dpkg >/dev/null; then
  command -v "$PYTHON" >/dev/null || need_debs+=("${PYTHON##*/}")
  need_debs+=("${PYTHON##*/}-venv")
fi
if [ ${#need_debs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_debs[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

stamp="$VENV/.mobile-vla-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt client/pyproject.toml ] && [ "$stamp" -nt "$LOCK" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
echo "setup: installing mobile-vla-client and mobile-vla[$EXTRAS] into $VENV (a few minutes the first time)"
# one resolve for both: the platform's dependency on mobile-vla-client is met by ./client, never a registry;
# the lock pins everything else (torch comes from wherever pip finds torch==2.14.1: PyPI, or a local index)
if [ "$EXTRAS" = "cpu,dev" ]; then lock_args=(-r "$LOCK"); else lock_args=(-c "$LOCK"); fi
"$VENV/bin/python" -m pip install -q "${lock_args[@]}" -e ./client -e ".[$EXTRAS]"
touch "$stamp"
