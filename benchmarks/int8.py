"""int8 vs fp32 ONNX Runtime throughput on the CPU, one recurrent step at batch 1 and 32, in one run.

    .venv/bin/python benchmarks/int8.py                      # small, batch 1 and 32 (a few minutes)
    .venv/bin/python benchmarks/int8.py --rounds 10 --presets tiny

Writes benchmarks/results/int8.json. Per preset: build it (random weights; the head's last layer
re-drawn wider, as the tests do, so the parity figures measure something), export it with
`export_model(int8=True)` (the path of `mobile-vla export --int8`, parity checks included), then time
in-process ONNX Runtime CPU sessions (ORT_ENABLE_ALL, every core) on the step graph:
- `fp32`: model.onnx, what `onnx-cpu` serves by default;
- `int8`: model.int8.onnx (export/quantize.py: pixel normalisation folded into the patch
  convolutions, then static QDQ int8);
- `fp32_folded`: model.onnx with only the fold applied (not an artifact: it shows how much of the
  int8 gain is the fold, which would speed fp32 up too, and how much the int8 arithmetic).
Variants run interleaved round by round (a change of load hits them alike); medians are reported,
throughput = batch / median step time. Thread counts: 1 (a serving replica's default `cpu_threads`:
replicas each take a core) and 0 (one per core, ONNX Runtime's default). Goal (issue 20): int8 >=
1.7x fp32 at batch 32 on `small`, read at 1 thread (on a loaded box, 2-thread sessions mostly
measure the contention for the cores).
The box counts as quiet when the 1-minute load average is below 2.5 at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_machine import machine
from inference import _session, time_variants

RESULTS = Path(__file__).resolve().parent / "results" / "int8.json"
TARGET_SPEEDUP_B32 = 1.7
QUIET_LOAD = 2.5


def build_and_export(preset: str, folder: Path) -> dict:
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import save_random_policy

    # the head starts near zero: a spread in its weights makes outputs vary so parity means something
    model = save_random_policy(preset, folder, head_std=0.2)
    result = export_model(folder, int8=True)
    signature = result.signature
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "export_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "int8_quantizer": signature.exporter.int8_quantizer,
        "int8_parity": signature.parity.int8.model_dump(),
        "onnx_mb": {k: round(g.bytes / 1e6, 2) for k, g in signature.graphs.items()},
    }


def folded_copy(source: Path, target: Path) -> Path:
    import onnx

    from mobile_vla.export.quantize import fold_pixel_affine

    model = onnx.load(str(source))
    fold_pixel_affine(model)
    onnx.save(model, str(target))
    return target


def measure_preset(preset: str, batches: list[int], rounds: int, thread_counts: list[int]) -> dict:
    from mobile_vla.export import parity
    from mobile_vla.policy import load_policy

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        info = build_and_export(preset, folder)
        model, preprocessing = load_policy(folder)
        onnx_dir = folder / "onnx"
        folded = folded_copy(onnx_dir / "model.onnx", folder / "folded.onnx")
        frames = parity.parity_frames(max(batches), seed=3).images
        result = {"preset": preset, **info, "threads": {}}
        for threads in thread_counts:
            sessions = {
                "fp32": _session(onnx_dir / "model.onnx", threads),
                "int8": _session(onnx_dir / "model.int8.onnx", threads),
                "fp32_folded": _session(folded, threads),
            }
            label = f"threads_{threads or 'all'}"
            result["threads"][label] = _time_batches(
                preset, label, sessions, model, preprocessing, frames, batches, rounds
            )
    return result


def _time_batches(preset, label, sessions, model, preprocessing, frames, batches, rounds) -> dict:
    from mobile_vla.export import parity

    result = {}
    for batch in batches:
        feeds = parity.step_feeds(model, preprocessing, frames[:batch], parity.PARITY_INSTRUCTIONS, seed=batch)
        variants = {name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()}
        stats = time_variants(variants, rounds if batch < 32 else max(5, rounds // 3))
        for row in stats.values():
            row["steps_per_s"] = round(batch / (row["p50_ms"] / 1e3), 1)
        stats["int8_speedup_vs_fp32"] = round(stats["fp32"]["p50_ms"] / stats["int8"]["p50_ms"], 2)
        stats["fold_only_speedup_vs_fp32"] = round(stats["fp32"]["p50_ms"] / stats["fp32_folded"]["p50_ms"], 2)
        stats["int8_speedup_vs_fp32_folded"] = round(stats["fp32_folded"]["p50_ms"] / stats["int8"]["p50_ms"], 2)
        result[str(batch)] = stats
        print(
            f"  {preset} {label} batch {batch}: "
            + ", ".join(
                f"{k} {v['p50_ms']:.1f} ms ({v['steps_per_s']:.0f} steps/s)"
                for k, v in stats.items()
                if isinstance(v, dict)
            )
            + f"; int8 {stats['int8_speedup_vs_fp32']}x fp32",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small"], choices=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per batch size (batch 32: a third)")
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[1, 0],
        help="ORT intra-op thread counts to time (1: a serving replica's default cpu_threads; 0: one per core)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import onnxruntime

    load_start = os.getloadavg()
    started = time.time()
    report = {"benchmark": "int8", "machine": {}, "presets": {}}  # machine: filled in when the run ends
    for preset in args.presets:
        print(f"{preset}: build, export (fp32 + int8, parity), time ...", flush=True)
        report["presets"][preset] = measure_preset(preset, args.batches, args.rounds, args.threads)
    report["machine"] = machine(load_start, onnxruntime=onnxruntime.__version__)
    load_end = report["machine"]["load_avg_after"]
    quiet = load_start[0] < QUIET_LOAD and load_end[0] < QUIET_LOAD
    report["machine"]["quiet"] = quiet
    report["seconds"] = round(time.time() - started, 1)
    b32 = report["presets"].get("small", {}).get("threads", {}).get("threads_1", {}).get("32")
    if b32:
        speedup = b32["int8_speedup_vs_fp32"]
        report["target"] = {
            "small_batch_32_threads_1_int8_speedup_vs_fp32": speedup,
            "required": TARGET_SPEEDUP_B32,
            "met": speedup >= TARGET_SPEEDUP_B32,
            "quiet_box": quiet,
        }
        print(
            f"target (small, batch 32, 1 thread, int8 >= {TARGET_SPEEDUP_B32}x fp32): {speedup}x -> "
            f"{'met' if speedup >= TARGET_SPEEDUP_B32 else 'NOT met'} "
            f"({'quiet' if quiet else 'LOADED'} box: load {load_start[0]:.1f} -> {load_end[0]:.1f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
