"""Policy step benchmark: parameters, `step` latency (torch eager) at batch 1 and 32, peak memory.

    .venv/bin/python benchmarks/policy_step.py                      # tiny, small, full (CPU)
    .venv/bin/python benchmarks/policy_step.py --presets tiny small --batches 1 32 --device cpu

Writes benchmarks/results/policy_step.json. Each preset runs in its own child process so its peak
resident memory (ru_maxrss) is its own. Serving's path is measured: one frame per robot through
`step`, the CLIP text feature precomputed once per instruction, the LSTM memory passed in and out.
`full` uses random weights (same architecture as the pretrained model; no download) and only the
batch sizes in --full-batches (batch 32 of a 1.8 B model is minutes per step on a 2-core CPU).
The load average is recorded: on a shared box, latencies are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_machine import machine

RESULTS = Path(__file__).resolve().parent / "results" / "policy_step.json"
REPEATS = {"tiny": 20, "small": 10, "full": 3}
FULL_MIN_AVAILABLE_GIB = 12.0  # fp32 weights 6.8 GiB + activations + headroom


def available_gib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def measure_preset(preset: str, batches: list[int], device: str, threads: int | None) -> dict:
    """Runs in a child process: builds the preset (random weights) and times `step`."""
    import numpy as np
    import torch

    from mobile_vla.policy import build_policy, build_tokenizer, presets

    if threads:
        torch.set_num_threads(threads)
    config = presets.get_preset(preset)
    if config.kosmos.pretrained or config.clip.pretrained:
        config = presets.full(pretrained=False)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_policy(config, load_pretrained=False).eval().to(device)
    build_s = time.perf_counter() - started
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    tokenizer = build_tokenizer(config)
    rng = np.random.default_rng(0)
    result = {
        "preset": preset,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_s, 2),
        "peak_rss_after_build_mib": round(rss_after_build, 1),
        "batches": {},
    }
    for batch_size in batches:
        tokens = tokenizer.encode(["go to the red box avoiding the barrel on the left"] * batch_size)
        tokens = {k: torch.from_numpy(v).to(device) for k, v in tokens.items()}
        images = torch.from_numpy(rng.integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)).to(device)
        state = torch.zeros(batch_size, config.state_dim, device=device)
        times, cpu_times = [], []
        with torch.inference_mode():
            clip_text = model.encode_instruction(tokens["clip_input_ids"])
            memory = model.initial_memory(batch_size)
            for i in range(REPEATS[preset] + 2):  # 2 warm-up steps
                _sync(device)
                started, cpu_started = time.perf_counter(), time.process_time()
                actions, confidence, memory = model.step(images, state, tokens, memory, clip_text)
                _sync(device)
                if i >= 2:
                    times.append((time.perf_counter() - started) * 1000)
                    cpu_times.append((time.process_time() - cpu_started) * 1000)
        assert actions.shape == (batch_size, config.chunk, 3) and confidence.shape == (batch_size,)
        result["batches"][str(batch_size)] = {
            "step_ms_median": round(statistics.median(times), 2),
            "step_ms_min": round(min(times), 2),
            "step_ms_max": round(max(times), 2),
            "frames_per_s": round(1000 * batch_size / statistics.median(times), 1),
            # CPU seconds of this process (all its threads): barely moved by other load on a shared box
            "step_cpu_ms_median": round(statistics.median(cpu_times), 2),
            "repeats": len(times),
        }
        if device.startswith("cuda"):
            result["batches"][str(batch_size)]["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "full"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--full-batches", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one preset, in this (fresh) process
        batches = args.full_batches if args.child == "full" else args.batches
        print(json.dumps(measure_preset(args.child, batches, args.device, args.threads)))
        return 0

    from rich.console import Console

    console = Console()
    load_before, mem_before_gib = os.getloadavg(), round(available_gib(), 1)
    report = {"benchmark": "policy_step", "machine": {}, "presets": {}}  # machine: filled in when the run ends
    for preset in args.presets:
        if preset == "full" and args.device == "cpu" and available_gib() < FULL_MIN_AVAILABLE_GIB:
            report["presets"][preset] = {
                "skipped": f"MemAvailable {available_gib():.1f} GiB < {FULL_MIN_AVAILABLE_GIB} GiB"
            }
            console.print(f"[yellow]{preset}: skipped ({report['presets'][preset]['skipped']})")
            continue
        command = [
            sys.executable,
            __file__,
            "--child",
            preset,
            "--device",
            args.device,
            "--batches",
            *map(str, args.batches),
            "--full-batches",
            *map(str, args.full_batches),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        with console.status(f"benchmarking {preset} on {args.device} ..."):
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            report["presets"][preset] = {"error": done.stderr.strip().splitlines()[-1:]}
            console.print(f"[red]{preset}: failed: {done.stderr.strip()[-500:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        report["presets"][preset] = result
        for batch_size, timing in result["batches"].items():
            console.print(
                f"{preset:>5} batch {batch_size:>2}: {timing['step_ms_median']:9.1f} ms/step "
                f"(cpu {timing['step_cpu_ms_median']:.1f} ms) "
                f"({timing['frames_per_s']} frames/s), {result['parameters']:,} params, "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB"
            )
    report["machine"] = machine(load_before, mem_available_gib_at_start=mem_before_gib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
