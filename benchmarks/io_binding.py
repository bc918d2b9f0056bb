"""ONNX Runtime IO binding against plain `run` for the policy step, on this machine's CPU (under a minute).

    .venv/bin/python benchmarks/io_binding.py                  # tiny, batch 1 and 32, 1 thread
    .venv/bin/python benchmarks/io_binding.py --preset small --rounds 20

Builds the preset (random weights), exports it (`export_model`, legacy exporter: seconds), opens the
step graph as `onnx-cpu` serves it (`load_backend`, ORT_ENABLE_ALL, `--threads` intra-op threads)
and times, interleaved round by round, `session.run` against `onnx_backend.run_bound` (host inputs
bound, outputs bound to the CPU, copied out) on the same feeds; medians. Prints JSON and writes
benchmarks/results/io_binding.json. Decides whether the CPU path should bind (issue 20: it stays on
plain `run` unless binding pays there); the CUDA side needs a GPU (scripts/gpu_smoke.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bench_machine import machine
from inference import time_variants

RESULTS = Path(__file__).resolve().parent / "results" / "io_binding.json"


def step_feeds(backend, batch: int) -> dict[str, np.ndarray]:
    """The step graph's feeds for `batch` robots on real frames, as the backend builds them."""
    from mobile_vla.export import parity

    captured = {}
    step = backend._step
    backend._step = lambda feeds: captured.update(feeds) or step(feeds)
    try:
        frames = parity.parity_frames(batch, backend.image_size).images  # [B, H, W, 3] uint8
        backend.predict(frames, np.zeros((batch, backend.state_dim), np.float32), ["go to the red box"] * batch)
    finally:
        del backend._step
    return captured


def build_and_export(preset: str, folder: Path) -> None:
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import save_random_policy

    save_random_policy(preset, folder)
    export_model(folder, exporter="legacy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (a serving replica's default: 1)")
    args = parser.parse_args(argv)

    from mobile_vla.runtime.backends import load_backend
    from mobile_vla.runtime.onnx_backend import run_bound

    load_before = os.getloadavg()
    result = {"preset": args.preset, "threads": args.threads, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_and_export(args.preset, folder)
        backend = load_backend(folder, prefer=("onnx-cpu",), threads=args.threads, spinning=False)
        session = backend.session
        names = [o.name for o in session.get_outputs()]
        for batch in args.batches:
            feeds = step_feeds(backend, batch)
            plain, bound = session.run(names, feeds), run_bound(session, names, feeds, "cpu")
            identical = all(np.array_equal(a, b) for a, b in zip(plain, bound, strict=True))
            stats = time_variants(
                {
                    "run": lambda f=feeds: session.run(names, f),
                    "io_binding": lambda f=feeds: run_bound(session, names, f, "cpu"),
                },
                args.rounds,
            )
            stats["io_binding_over_run"] = round(stats["io_binding"]["p50_ms"] / stats["run"]["p50_ms"], 3)
            stats["identical_outputs"] = identical
            result["batches"][str(batch)] = stats
            print(
                f"batch {batch}: run {stats['run']['p50_ms']:.2f} ms, "
                f"io_binding {stats['io_binding']['p50_ms']:.2f} ms "
                f"(x{stats['io_binding_over_run']}), identical {identical}",
                flush=True,
            )
        backend.close()
    result["machine"] = machine(load_before)
    loads = result["machine"]["load_avg_before"][:2] + result["machine"]["load_avg_after"][:2]
    result["label"] = "quiet" if max(loads) < 1.0 else "LOADED"  # 1- and 5-minute load averages
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
