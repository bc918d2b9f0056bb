"""Inference benchmark: torch eager vs ONNX Runtime fp32 vs fp16, one recurrent step, on the real classes.

    .venv/bin/python benchmarks/inference.py                            # tiny and small, batch 1 8 32
    .venv/bin/python benchmarks/inference.py --presets small --batches 1 --rounds 50

Writes benchmarks/results/inference.json. Per preset: build it (random weights), save it, export it
with `export_model` (the same path as `mobile-vla export`, parity checks included), then time the
step graph that serving runs - one frame per robot, CLIP text precomputed, LSTM state in and out:
- `torch`: `policy.step` under inference_mode (eager, fp32);
- `onnx_fp32` / `onnx_fp16`: ONNX Runtime CPU sessions on model.onnx / model.fp16.onnx (ORT_ENABLE_ALL);
- `backend_onnx_cpu` / `backend_torch`: the whole `Backend.predict` (validation, cached tokens,
  state scaling, de-normalisation) at batch 1, what a serving replica pays per call.
Variants are timed interleaved, round by round, so a change of machine load hits all of them alike;
the load average is recorded too. Target: on `small`, ONNX Runtime fp32 >= 2x torch eager at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_machine import machine

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
TARGET_SPEEDUP = 2.0


def build_and_export(preset: str, folder: Path) -> dict:
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import save_random_policy

    model = save_random_policy(preset, folder)
    result = export_model(folder, fp16=True)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "export_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "exporter": "dynamo" if result.signature.exporter.dynamo else "legacy",
        "parity": result.signature.parity.model_dump(),
        "onnx_mb": {k: round(g.bytes / 1e6, 2) for k, g in result.signature.graphs.items()},
    }


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_variants(variants: dict, rounds: int, warmup: int = 3) -> dict:
    """Interleaved timing: each round calls every variant once. -> per-variant latency stats (ms)."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: _stats(values) for name, values in samples.items()}


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "min_ms": round(ordered[0], 3),
        "n": len(ordered),
    }


def measure_preset(preset: str, batches: list[int], rounds: int, threads: int) -> dict:
    import numpy as np
    import torch

    from mobile_vla.export import parity
    from mobile_vla.policy import load_policy
    from mobile_vla.runtime.backends import load_backend

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        info = build_and_export(preset, folder)
        model, preprocessing = load_policy(folder)
        sessions = {
            "onnx_fp32": _session(folder / "onnx" / "model.onnx", threads),
            "onnx_fp16": _session(folder / "onnx" / "model.fp16.onnx", threads),
        }
        frames = parity.parity_frames(max(batches), seed=3).images
        result = {"preset": preset, **info, "torch_threads": torch.get_num_threads(), "batches": {}}
        for batch in batches:
            feeds = parity.step_feeds(model, preprocessing, frames[:batch], parity.PARITY_INSTRUCTIONS, seed=batch)
            variants = {
                "torch": lambda f=feeds: parity.torch_step(model, f),
                "onnx_fp32": lambda f=feeds: sessions["onnx_fp32"].run(None, f),
                "onnx_fp16": lambda f=feeds: sessions["onnx_fp16"].run(None, f),
            }
            stats = time_variants(variants, rounds if batch < 32 else max(5, rounds // 4))
            for row in stats.values():
                row["throughput_per_s"] = round(batch / (row["mean_ms"] / 1e3), 1)
            stats["onnx_fp32_speedup_vs_torch_p50"] = round(stats["torch"]["p50_ms"] / stats["onnx_fp32"]["p50_ms"], 2)
            stats["onnx_fp16_speedup_vs_torch_p50"] = round(stats["torch"]["p50_ms"] / stats["onnx_fp16"]["p50_ms"], 2)
            result["batches"][str(batch)] = stats
            print(
                f"  {preset} batch {batch}: "
                + ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in stats.items() if isinstance(v, dict)),
                flush=True,
            )
        # The whole serving call at batch 1 (tokens cached after the first call).
        backends = {
            "backend_onnx_cpu": load_backend(folder, prefer=("onnx-cpu",), threads=threads),
            "backend_torch": load_backend(folder, prefer=("torch",)),
        }
        image = frames[:1]
        state = np.zeros((1, 3), np.float32)
        result["predict_batch_1"] = time_variants(
            {name: (lambda b=b: b.predict(image, state, ["go to the red box"])) for name, b in backends.items()},
            rounds,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per batch size (batch 32: a quarter)")
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0 = library default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import onnxruntime
    import torch

    load_before = os.getloadavg()
    report = {"benchmark": "inference", "machine": {}, "presets": {}}  # machine: filled in when the run ends
    for preset in args.presets:
        print(f"{preset}: build, export, parity ...", flush=True)
        report["presets"][preset] = measure_preset(preset, args.batches, args.rounds, args.threads)
    report["machine"] = machine(load_before, torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    small = report["presets"].get("small", {}).get("batches", {}).get("1")
    if small:
        speedup = small["onnx_fp32_speedup_vs_torch_p50"]
        report["target"] = {
            "small_batch_1_onnx_fp32_speedup": speedup,
            "required": TARGET_SPEEDUP,
            "met": speedup >= TARGET_SPEEDUP,
        }
        print(
            f"target (small, batch 1, ONNX Runtime fp32 >= {TARGET_SPEEDUP}x torch eager): {speedup}x "
            f"-> {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
