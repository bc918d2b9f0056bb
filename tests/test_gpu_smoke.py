"""`scripts/gpu_smoke.sh --cpu`: the prepared GPU smoke run, kept from rotting on the CPU (CI runs it).

The real script in a child process: the CPU steps (train steps of tiny, export with int8, requests
through the backend chain) pass, the GPU steps say SKIP and why, and the JSON summary lists them all.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_STEPS = {"train_steps", "export", "serve_requests"}
GPU_STEPS = {"gpu_name", "torch_cuda", "ort_cuda", "tensorrt_plan"}


def test_cpu_dry_run_passes_and_skips_the_gpu_steps(tmp_path):
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu_smoke.sh"), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_smoke.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {**dict.fromkeys(CPU_STEPS, "PASS"), **dict.fromkeys(GPU_STEPS, "SKIP")}
    assert summary["mode"] == "cpu" and summary["passed"]
    assert all(s["detail"] == "--cpu: a GPU step" for s in summary["steps"] if s["step"] in GPU_STEPS)
    serve = next(s["detail"] for s in summary["steps"] if s["step"] == "serve_requests")
    assert "IO binding None vs cpu" in serve  # the bound step answered like the plain one
    for step in GPU_STEPS | CPU_STEPS:  # one line per step on stdout, as a person reads it
        assert any(line.split()[1:2] == [step] for line in done.stdout.splitlines()), done.stdout
