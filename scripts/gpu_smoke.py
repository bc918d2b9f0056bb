"""The one-shot GPU smoke run (scripts/gpu_smoke.sh runs it): every GPU path of the platform once, in a
few minutes, each step PASS / FAIL / SKIP with its seconds, and a JSON summary.

    scripts/gpu_smoke.sh                  # on a lent GPU machine: writes $OUT/gpu_smoke.json (or ./gpu_smoke.json)
    scripts/gpu_smoke.sh --cpu            # the same steps that make sense without a GPU (CI runs this)
    scripts/gpu_smoke.sh --out DIR

Steps (the GPU ones SKIP under --cpu, and say so):
  gpu_name        nvidia-smi's GPU name and driver                                  (GPU)
  torch_cuda      torch sees CUDA; a bf16 matmul on it                              (GPU)
  train_steps     a few optimiser steps of `tiny` (bf16 autocast on CUDA, fp32 on --cpu); the LSTM's
                  output stays fp32 under autocast and the loss falls
  export          `tiny` to ONNX fp32 + int8 with the export's parity checks (frames of a small
                  synthetic dataset: no MiniWorld rendering needed)
  ort_cuda        an ONNX Runtime session asked for CUDA lists CUDAExecutionProvider first (no silent
                  CPU fallback) and answers like the CPU session                    (GPU)
  tensorrt_plan   publish_plan: build a TensorRT plan (batch 1..8) and its build-time parity against
                  the fp32 graph                                                    (GPU + tensorrt)
  serve_requests  load_backend through the chain (tensorrt, onnx-cuda, onnx-cpu) for a batch of 8
                  and answer a few batched requests, memory carried between them; on ONNX Runtime the
                  last step again with IO binding switched (on CUDA: on by default; --cpu: off)
The run exits 1 when a step FAILs (0 with SKIPs). Nothing leaves the machine; no network is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Skip(Exception):
    """A step that cannot run here (no GPU, no TensorRT): SKIP with this reason."""


def step_gpu_name(ctx: dict) -> str:
    if shutil.which("nvidia-smi") is None:
        raise Skip("nvidia-smi not found")
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    ctx["gpu"] = out.splitlines()[0]
    return ctx["gpu"]


def step_torch_cuda(ctx: dict) -> str:
    import torch

    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (a @ a).float().sum().item()
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"


def step_train_steps(ctx: dict) -> str:
    import torch

    from mobile_vla.policy import build_policy, presets, untrained_preprocessing

    device = torch.device("cuda" if ctx["gpu_mode"] else "cpu")
    config = presets.tiny()
    torch.manual_seed(0)
    model = build_policy(config).to(device).train()
    tokens = untrained_preprocessing(config).tokenize(["go to the red box"] * 2)
    B, T = 2, config.window
    batch = {
        "images": torch.randint(0, 256, (B, T, 224, 224, 3), dtype=torch.uint8, device=device),
        "state": torch.zeros(B, T, config.state_dim, device=device),
        **{k: torch.as_tensor(v, device=device) for k, v in tokens.items()},
    }
    target = torch.full((B, T, config.chunk, 3), 0.3, device=device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["gpu_mode"])
    losses = []
    for _ in range(5):
        with autocast:
            out = model(batch)
            loss = torch.nn.functional.mse_loss(out.actions.float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    if out.memory[0].dtype != torch.float32:
        raise AssertionError(f"LSTM state came back {out.memory[0].dtype} under autocast (expected float32)")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"loss did not fall over 5 steps: {losses}")
    return f"{'bf16 autocast on cuda' if ctx['gpu_mode'] else 'fp32 on cpu'}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def _frames_dataset(folder: Path) -> Path:
    """One synthetic episode of structured frames (the export's parity check reads them)."""
    import numpy as np

    from mobile_vla.data.episodes import Episode, write_episode

    folder.mkdir(parents=True, exist_ok=True)
    images = np.full((16, 224, 224, 3), 90, np.uint8)
    for t in range(16):
        images[t, 120:] = (60, 60, 70)
        images[t, 90:140, 40 + 6 * t : 70 + 6 * t] = (200, 30, 30)
        images[t, 80:150, 150 - 5 * t : 190 - 5 * t] = (30, 30, 200)
    attrs = {"instruction": "go to the red box", "episode_id": "ep0", "source": "gpu_smoke", "success": True}
    attrs |= {"control_hz": 5.0, "schema_version": 1}
    write_episode(
        folder / "ep0.h5", Episode(images, np.zeros((16, 3), np.float32), np.zeros((16, 3), np.float32), attrs)
    )
    return folder


def step_export(ctx: dict) -> str:
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import save_random_policy

    model_dir = ctx["work"] / "model"
    save_random_policy("tiny", model_dir)
    ctx["data"] = _frames_dataset(ctx["work"] / "frames")
    result = export_model(model_dir, int8=True, data_dir=ctx["data"])
    ctx["model_dir"] = model_dir
    fp32 = max(result.signature.parity.fp32_max_abs_diff.values())
    return f"graphs {sorted(result.signature.graphs)}, fp32 parity {fp32:.2g}"


def step_ort_cuda(ctx: dict) -> str:
    import numpy as np
    import onnxruntime as ort

    from mobile_vla.export.signature import load_signature
    from mobile_vla.runtime.onnx_backend import CUDA_PROVIDER, open_session

    if CUDA_PROVIDER not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (install onnxruntime-gpu)")
    if "model_dir" not in ctx:
        raise Skip("no exported model (the export step failed)")
    folder = ctx["model_dir"] / "onnx"
    graph = load_signature(folder).graph("text_encoder")
    cuda = open_session(folder, graph, [CUDA_PROVIDER, "CPUExecutionProvider"])
    if cuda.get_providers()[0] != CUDA_PROVIDER:
        raise AssertionError(f"asked for CUDA, got {cuda.get_providers()} (silent CPU fallback)")
    cpu = open_session(folder, graph, ["CPUExecutionProvider"])
    ids = np.zeros((2, 77), np.int64)
    diff = float(np.abs(cuda.run(None, {"clip_input_ids": ids})[0] - cpu.run(None, {"clip_input_ids": ids})[0]).max())
    if not diff < 1e-3:
        raise AssertionError(f"CUDA and CPU text encoders differ by {diff:.3g}")
    return f"providers {cuda.get_providers()}, max abs diff vs CPU {diff:.2g}"


def step_tensorrt_plan(ctx: dict) -> str:
    from mobile_vla.errors import ResourceError
    from mobile_vla.export.publish import publish_plan
    from mobile_vla.export.tensorrt_engine import require_cuda_gpu, require_tensorrt
    from mobile_vla.tracking import resolve_model

    try:
        require_tensorrt()
        require_cuda_gpu()
    except ResourceError as exc:
        raise Skip(str(exc)) from None
    if "model_dir" not in ctx:
        raise Skip("no exported model (the export step failed)")
    plan = publish_plan(resolve_model(ctx["model_dir"]), max_batch=8, attach=False, data_dir=ctx["data"])
    meta = json.loads((plan.parent / "engine.json").read_text())
    worst = max(d["actions"] for d in meta["parity"]["max_abs_diff"].values())
    return f"{plan.parent.name}/{plan.name} in {meta['build_seconds']} s, parity actions {worst:.2g}"


def step_serve_requests(ctx: dict) -> str:
    import numpy as np

    from mobile_vla.runtime.backends import load_backend

    if "model_dir" not in ctx:
        raise Skip("no exported model (the export step failed)")
    prefer = ("tensorrt", "onnx-cuda", "onnx-cpu") if ctx["gpu_mode"] else ("onnx-cpu",)
    # max_batch_size as a serve config batching 8 robots gives it (a plan for fewer is refused)
    backend = load_backend(ctx["model_dir"], prefer=prefer, max_batch_size=8)
    if ctx["gpu_mode"] and backend.name == "onnx-cpu":
        raise AssertionError(f"no GPU backend loaded: {backend.skipped}")
    frames = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    state, instructions = np.zeros((8, 3), np.float32), ["go to the red box"] * 8
    memory = previous = None
    for _ in range(3):  # three control steps of 8 robots, the memory carried over
        out = backend.predict(frames, state, instructions, memory)
        if out.nonfinite_rows():
            raise AssertionError(f"non-finite answers for rows {out.nonfinite_rows()}")
        previous, memory = memory, out.memory
    binding = ""
    if backend.name.startswith("onnx"):  # the last step again with IO binding switched (CUDA binds by default)
        default = backend.binding_device
        switched = None if default else ("cuda" if backend.name == "onnx-cuda" else "cpu")
        backend.binding_device = switched
        try:
            other = backend.predict(frames, state, instructions, previous)
        finally:
            backend.binding_device = default
        diff = float(np.abs(other.actions - out.actions).max())
        if not diff < 1e-5:
            raise AssertionError(f"IO binding to {default} and to {switched} differ by {diff:.3g}")
        binding = f"; IO binding {default} vs {switched}: max abs diff {diff:.2g}"
    return f"{backend.name} answered 3 x 8 requests (skipped: {backend.skipped or 'none'}){binding}"


STEPS = [
    ("gpu_name", step_gpu_name, True),
    ("torch_cuda", step_torch_cuda, True),
    ("train_steps", step_train_steps, False),
    ("export", step_export, False),
    ("ort_cuda", step_ort_cuda, True),
    ("tensorrt_plan", step_tensorrt_plan, True),
    ("serve_requests", step_serve_requests, False),
]  # (name, function, needs a GPU)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="skip the GPU steps (and say so); CI runs this")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "."), help="folder for gpu_smoke.json"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        ctx = {"gpu_mode": not args.cpu, "work": Path(tmp)}
        for name, run, needs_gpu in STEPS:
            clock = time.perf_counter()
            if needs_gpu and args.cpu:
                status, detail = SKIP, "--cpu: a GPU step"
            else:
                try:
                    status, detail = PASS, run(ctx)
                except Skip as exc:
                    status, detail = SKIP, str(exc)
                except Exception as exc:  # every failure is this step's FAIL; the next steps still run
                    status, detail = FAIL, f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
            seconds = round(time.perf_counter() - clock, 1)
            results.append({"step": name, "status": status, "seconds": seconds, "detail": detail})
            print(f"{status:4}  {name:15} {seconds:7.1f} s  {detail}", flush=True)
    summary = {
        "script": "scripts/gpu_smoke.sh",
        "mode": "cpu" if args.cpu else "gpu",
        "gpu": ctx.get("gpu"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seconds": round(time.time() - started, 1),
        "steps": results,
        "passed": all(r["status"] != FAIL for r in results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'PASS' if summary['passed'] else 'FAIL'}: {summary['seconds']} s; wrote {args.out / 'gpu_smoke.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
