"""Benchmark `mobile-vla data generate`: wall time, frames, bytes per stored frame, expert success.

    .venv/bin/python benchmarks/data_generate.py [--episodes 200] [--seed 0] [--keep DIR]

Runs the real CLI in a subprocess (local Ray started by the command itself, as a user would run
it), then reads the manifest and the episode files. Writes benchmarks/results/data_generate.json.
The load average before and after is recorded (on a shared machine it explains slow runs), and so
is the CPU time the Ray workers spent simulating, rendering and compressing, which does not depend
on load: on an idle machine, wall time ~ worker CPU / cores + Ray start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_generate.json"
TARGET_TRAIN_SUCCESS = 0.90


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="generate into this folder and keep it")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_data_generate_"))
    out = args.keep or work / "dataset"
    cli = Path(sys.executable).with_name("mobile-vla")
    command = [
        str(cli),
        "data",
        "generate",
        "--out",
        str(out),
        "--episodes",
        str(args.episodes),
        "--seed",
        str(args.seed),
        "--no-progress",
    ]
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYOPENGL_PLATFORM": "egl",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_ADDRESS": "",
    }
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time of the command and the Ray processes it started (reaped descendants): unlike wall
    # time it does not depend on what else the machine runs.
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if completed.returncode != 0:
        print(completed.stdout[-3000:], completed.stderr[-3000:], sep="\n")
        return completed.returncode

    manifest = json.loads((out / "manifest.json").read_text())
    episode_bytes = sum(p.stat().st_size for p in out.glob("*.h5"))
    frames = manifest["counts"]["total"]["frames"]
    worker_cpu = sum(manifest["generator"]["worker_cpu_seconds"].values())
    # Failed tries are simulated too: frames attempted ~ kept frames / success rate (approximate).
    frames_attempted = sum(
        r["mean_frames_kept"] * r["kept"] / r["success_rate"] for r in manifest["expert_success"].values()
    )
    result = {
        "benchmark": "data_generate",
        "command": " ".join(["mobile-vla"] + command[1:]).replace(str(out), "DIR"),
        "machine": machine(load_before),
        "episodes": manifest["counts"]["total"]["episodes"],
        "frames": frames,
        "wall_seconds": round(seconds, 2),
        "frames_per_second": round(frames / seconds, 2),
        "driver_and_reaped_cpu_seconds": round(cpu_seconds, 1),
        "worker_cpu_seconds": round(worker_cpu, 1),
        "worker_cpu_ms_per_frame_attempted": round(1000 * worker_cpu / frames_attempted, 2),
        "seconds_per_episode": round(seconds / max(args.episodes, 1), 3),
        "bytes_per_frame": round(episode_bytes / frames, 1),
        "dataset_bytes": episode_bytes,
        "frame_shape": [224, 224, 3],
        "raw_bytes_per_frame": 224 * 224 * 3,
        "expert_success": manifest["expert_success"],
        "train_success_target": TARGET_TRAIN_SUCCESS,
        "train_success_met": manifest["expert_success"]["train"]["success_rate"] >= TARGET_TRAIN_SUCCESS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
