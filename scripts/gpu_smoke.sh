#!/usr/bin/env bash
# The one-shot GPU smoke run for a lent GPU machine (docs/gpu.md): every GPU path once, each step
# PASS / FAIL / SKIP with its seconds, a JSON summary in $OUT (or --out DIR, else the current folder).
#   scripts/gpu_smoke.sh            # on the GPU machine (well under 10 minutes)
#   scripts/gpu_smoke.sh --cpu      # the steps that make sense without a GPU; CI runs this
# The steps are in scripts/gpu_smoke.py; this wrapper picks the repository's virtual environment and
# bounds the whole run (SMOKE_TIMEOUT_S, default 540 s).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}" MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec timeout --signal=TERM "${SMOKE_TIMEOUT_S:-540}" "$python" "$here/scripts/gpu_smoke.py" "$@"
