"""GPU check for a lent GPU (H100 class): step latency of the `full` policy and the engine backends.

    python benchmarks/gpu_check.py                      # everything that fits in --budget-s (default 450 s)
    OUT=/some/dir python benchmarks/gpu_check.py        # also writes $OUT/gpu_check.json

Prepared on a CPU-only machine and never run there. Sections, each variant guarded on its own (a
failure is recorded with its reason and the rest still runs), all against one time budget:
1. torch_full: the `full` architecture (Kosmos-2 1.66 B + CLIP ViT-B/32, random weights, built on
   the GPU) - one recurrent step at batch 1, 8, 32: fp32 eager, bf16 eager, fp16 eager, fp16 replayed
   as a CUDA graph; the max abs difference of bf16/fp16 actions against fp32.
2. engines_small: the `small` preset through the platform's own export path (export_model: ONNX fp32
   and fp16, parity checks), then ONNX Runtime CUDA and - if `tensorrt` imports - TensorRT plans
   built with build_engine and run with TensorRTRunner, each checked against torch on the GPU, and
   load_backend's choice. This is the check of the code that cannot run on CPU-only machines.
3. last, if the budget allows: the full model's ONNX Runtime CUDA row (torch_full.onnx_cuda_fp32),
   legacy exporter traced on the GPU with weights in a side file. TensorRT is not built for `full`
   here (an engine build of 1.7 B parameters takes longer than this check may run).
Prints one JSON document on stdout (progress goes to stderr) and, with $OUT set, rewrites
$OUT/gpu_check.json after every variant, so a run cut short keeps what it measured. Exits 0 even
when variants fail, and with a "skipped" note when there is no CUDA GPU (`make bench` on a CPU box).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

BATCHES = (1, 8, 32)
ROUNDS = {1: 20, 8: 15, 32: 8}
# --cpu-dry-run (plumbing check on a machine without a GPU): tiny instead of full, on the CPU.
DEVICE = "cuda"
FULL_PRESET = "full"


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


REPORT: dict = {}  # the whole document, saved to $OUT after every variant (a killed run keeps its rows)


def save_partial() -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(REPORT, indent=2, default=str) + "\n")


def guarded(results: dict, key: str, budget: Budget, needs_s: float, func, *args, **kwargs):
    """Runs one variant; records its result, its error (with the last frames) or a budget skip."""
    try:
        return _guarded(results, key, budget, needs_s, func, *args, **kwargs)
    finally:
        save_partial()


def _guarded(results: dict, key: str, budget: Budget, needs_s: float, func, *args, **kwargs):
    if not budget.allows(needs_s):
        results[key] = {"skipped": f"time budget: {budget.left():.0f} s left, needs ~{needs_s:.0f} s"}
        log(f"{key}: skipped (budget)")
        return None
    started = time.monotonic()
    try:
        value = func(*args, **kwargs)
        results[key] = value
        log(f"{key}: ok ({time.monotonic() - started:.1f} s)")
        return value
    except Exception as exc:  # every failure is a finding; keep going
        results[key] = {
            "error": f"{type(exc).__name__}: {str(exc)[:500]}",
            "where": traceback.format_exc(limit=-3)[-1500:],
        }
        log(f"{key}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        return None
    finally:
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass


def time_cuda(run, rounds: int, warmup: int = 3) -> dict:
    import statistics

    for _ in range(warmup):
        run()
    _sync()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        _sync()
        samples.append((time.perf_counter() - started) * 1e3)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
        "min_ms": round(samples[0], 3),
        "n": rounds,
    }


def step_inputs(model, tokenizer, batch: int, seed: int = 0):
    import torch

    device = DEVICE
    generator = torch.Generator().manual_seed(seed)
    texts = ["go to the red box avoiding the barrel on the left"] * batch
    tokens = {k: torch.from_numpy(v).to(device) for k, v in tokenizer.encode(texts).items()}
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=generator).to(device)
    state = torch.randn(batch, model.config.state_dim, generator=generator).to(device)
    return images, state, tokens


# --- 1. torch on the full architecture -------------------------------------------------------------


def build_full_on_gpu():
    import torch

    from mobile_vla.policy import build_policy, build_tokenizer, presets

    config = presets.full(pretrained=False) if FULL_PRESET == "full" else presets.get_preset(FULL_PRESET)
    torch.manual_seed(0)
    started = time.perf_counter()
    try:
        with torch.device(DEVICE):  # random init on the GPU: seconds instead of minutes on the CPU
            model = build_policy(config, load_pretrained=False)
        where = "cuda"
    except Exception as exc:
        log(f"building on cuda failed ({exc}); building on the CPU")
        model = build_policy(config, load_pretrained=False).to(DEVICE)
        where = f"cpu-then-{DEVICE}"
    model.eval()
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 1),
        "built_on": where,
        "preset": config.preset,
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    return model, build_tokenizer(config), info


def torch_variant(model, tokenizer, batch: int, dtype, reference=None) -> dict:
    import torch

    images, state, tokens = step_inputs(model, tokenizer, batch)
    with torch.inference_mode():
        clip_text = model.encode_instruction(tokens["clip_input_ids"])
        memory = model.initial_memory(batch)
        state = state.to(dtype)
        clip_text = clip_text.to(dtype)

        def run():
            return model.step(images, state, tokens, memory, clip_text)

        stats = time_cuda(run, ROUNDS[batch])
        actions = run()[0].float()
    stats["throughput_per_s"] = round(batch / (stats["mean_ms"] / 1e3), 1)
    if reference is not None:
        stats["max_abs_diff_vs_fp32"] = float((actions - reference).abs().max())
    return stats, actions


def cuda_graph_variant(model, tokenizer, batch: int, dtype) -> dict:
    """The fp16 step captured once and replayed (removes the per-kernel launch cost at small batch)."""
    import torch

    images, state, tokens = step_inputs(model, tokenizer, batch)
    with torch.inference_mode():
        clip_text = model.encode_instruction(tokens["clip_input_ids"]).to(dtype)
        h, c = model.initial_memory(batch)
        state = state.to(dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model.step(images, state, tokens, (h, c), clip_text)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model.step(images, state, tokens, (h, c), clip_text)
        stats = time_cuda(graph.replay, ROUNDS[batch])
        eager = model.step(images, state, tokens, (h, c), clip_text)[0]
        graph.replay()
        stats["max_abs_diff_vs_eager"] = float((static_out[0].float() - eager.float()).abs().max())
    stats["throughput_per_s"] = round(batch / (stats["mean_ms"] / 1e3), 1)
    return stats


def full_onnx_cuda(model, tokenizer, references: dict) -> dict:
    """The full step graph (legacy exporter, traced on the GPU, weights in a side file) on ORT CUDA."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from mobile_vla.export.signature import STEP_OUTPUTS
    from mobile_vla.export.torch_graphs import StepGraph, io_specs, torch_export

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if DEVICE == "cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        return {"skipped": f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})"}
    from mobile_vla.policy.preprocessing import Preprocessing

    preprocessing = Preprocessing(action_low=[-1] * 3, action_high=[1] * 3, state_mean=[0] * 3, state_std=[1] * 3)
    step_in, step_out, _, _ = io_specs(model, preprocessing)
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        images, state, tokens = step_inputs(model, tokenizer, 2)
        with torch.inference_mode():
            clip_text = model.encode_instruction(tokens["clip_input_ids"])
            h, c = model.initial_memory(2)
        args = (
            images,
            state,
            clip_text,
            tokens["kosmos_input_ids"],
            tokens["kosmos_attention_mask"],
            tokens["kosmos_image_embeds_position_mask"],
            h,
            c,
        )
        started = time.perf_counter()
        with torch.no_grad():
            torch_export(StepGraph(model).eval(), args, path, step_in, step_out, "legacy", 18, True)
        rows["export_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=providers)
        rows["session_seconds"] = round(time.perf_counter() - started, 1)
        rows["providers"] = session.get_providers()
        for batch in BATCHES:
            images, state, tokens = step_inputs(model, tokenizer, batch)
            with torch.inference_mode():
                clip_text = model.encode_instruction(tokens["clip_input_ids"])
                h, c = model.initial_memory(batch)
            feeds = {
                "images": images.cpu().numpy(),
                "state": state.cpu().numpy(),
                "clip_text": clip_text.cpu().numpy(),
                **{
                    k: tokens[k].cpu().numpy()
                    for k in ("kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")
                },
                "h_in": h.cpu().numpy(),
                "c_in": c.cpu().numpy(),
            }
            run = lambda f=feeds: session.run(STEP_OUTPUTS, f)
            stats = time_cuda(run, ROUNDS[batch])
            stats["throughput_per_s"] = round(batch / (stats["mean_ms"] / 1e3), 1)
            if batch in references:
                stats["max_abs_diff_vs_torch_fp32"] = float(np.abs(run()[0] - references[batch].cpu().numpy()).max())
            rows[f"batch_{batch}"] = stats
    return rows


def torch_full(results: dict, budget: Budget):
    """-> (model, tokenizer) for the ONNX Runtime row at the end, or None if the build failed."""
    import torch

    section: dict = {}
    results["torch_full"] = section
    built = guarded(section, "build", budget, 60, build_full_on_gpu)
    if built is None:
        return None
    model, tokenizer, info = built
    section["build"] = info
    references = {}
    for batch in BATCHES:
        row = section.setdefault(f"batch_{batch}", {})
        out = guarded(row, "fp32", budget, 20, torch_variant, model, tokenizer, batch, torch.float32)
        if out:
            row["fp32"], references[batch] = out
    model.to(torch.bfloat16)
    for batch in BATCHES:
        row = section[f"batch_{batch}"]
        out = guarded(
            row, "bf16", budget, 15, torch_variant, model, tokenizer, batch, torch.bfloat16, references.get(batch)
        )
        if out:
            row["bf16"] = out[0]
    model.to(torch.float16)
    for batch in BATCHES:
        row = section[f"batch_{batch}"]
        out = guarded(
            row, "fp16", budget, 15, torch_variant, model, tokenizer, batch, torch.float16, references.get(batch)
        )
        if out:
            row["fp16"] = out[0]
        guarded(row, "fp16_cuda_graph", budget, 15, cuda_graph_variant, model, tokenizer, batch, torch.float16)
    return model, tokenizer


def full_onnx_cuda_last(results: dict, budget: Budget, built) -> None:
    """Last, because exporting 1.7 B parameters takes minutes: the engine checks on `small` come first."""
    import torch

    if built is None:
        return
    model, tokenizer = built
    model.float()  # weights went through fp16: the row compares ORT against torch on these same weights
    references = {}
    for batch in BATCHES:
        try:
            references[batch] = torch_variant(model, tokenizer, batch, torch.float32)[1]
        except Exception:
            pass
    guarded(results["torch_full"], "onnx_cuda_fp32", budget, 180, full_onnx_cuda, model, tokenizer, references)


# --- 2. engines on small ---------------------------------------------------------------------------


def _synthetic_dataset(folder: Path) -> Path:
    """Frames for export's parity check where MiniWorld cannot render (no EGL on the node)."""
    import numpy as np

    from mobile_vla.data.episodes import Episode, write_episode

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for e in range(2):
        images = np.full((16, 224, 224, 3), 90, np.uint8)
        for t in range(16):  # a floor, a wall and two boxes that move: structured, not noise
            images[t, 120:] = (60, 60, 70)
            for colour, x in (((200, 30, 30), 40 + 4 * t), ((30, 30, 200), 150 - 3 * t)):
                images[t, 90:140, x : x + 30] = colour
        write_episode(
            folder / f"ep{e}.h5",
            Episode(
                images=images,
                actions=rng.normal(size=(16, 3)).astype(np.float32),
                state=np.zeros((16, 3), np.float32),
                attrs={
                    "instruction": "go to the red box",
                    "episode_id": f"ep{e}",
                    "source": "gpu_check",
                    "success": True,
                    "control_hz": 5.0,
                    "schema_version": 1,
                },
            ),
        )
    return folder


def export_preset(preset: str, folder: Path, fp16: bool = True) -> dict:
    from mobile_vla.errors import ModelError
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import save_random_policy

    save_random_policy(preset, folder)  # the model is not kept: the export loads it from the folder
    try:
        result = export_model(folder, fp16=fp16)
    except ModelError as exc:
        if "MiniWorld" not in str(exc):
            raise
        log(f"MiniWorld cannot render here ({exc}); parity on a synthetic dataset")
        result = export_model(folder, fp16=fp16, data_dir=_synthetic_dataset(folder.parent / f"{preset}-frames"))
    return {
        "export_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "parity_cpu": result.signature.parity.model_dump(),
        "signature": result.signature,
    }


def engine_variants(section: dict, budget: Budget, folder: Path, signature, batches=BATCHES) -> None:
    """ONNX Runtime CUDA and TensorRT (fp32, fp16) on an exported folder, checked against torch on the GPU."""
    import numpy as np
    import torch

    from mobile_vla.export.parity import PARITY_INSTRUCTIONS, step_feeds, torch_step
    from mobile_vla.export.signature import STEP_OUTPUTS
    from mobile_vla.policy import load_policy
    from mobile_vla.runtime.backends import load_backend
    from mobile_vla.runtime.onnx_backend import open_session

    model, preprocessing = load_policy(folder)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    feeds = {b: step_feeds(model, preprocessing, frames[:b], PARITY_INSTRUCTIONS, seed=b) for b in batches}
    references = {b: torch_step(model, feeds[b]) for b in batches}  # CPU fp32 reference
    model.to(DEVICE)

    def torch_gpu(batch):
        f = {k: torch.from_numpy(v).to(DEVICE) for k, v in feeds[batch].items()}
        tokens = {k: f[k] for k in ("kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")}
        with torch.inference_mode():
            return time_cuda(
                lambda: model.step(f["images"], f["state"], tokens, (f["h_in"], f["c_in"]), f["clip_text"]),
                ROUNDS[batch],
            )

    for batch in batches:
        guarded(section.setdefault(f"batch_{batch}", {}), "torch_fp32", budget, 10, torch_gpu, batch)
    model.cpu()

    def diff(batch, outputs):
        return max(float(np.abs(references[batch][k] - outputs[k]).max()) for k in STEP_OUTPUTS)

    def ort_cuda(key):
        session = open_session(
            folder / "onnx", signature.graphs[key], ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA provider not active: {session.get_providers()}")
        rows = {}
        for batch in batches:
            run = lambda b=batch: session.run(STEP_OUTPUTS, feeds[b])
            stats = time_cuda(run, ROUNDS[batch])
            stats["max_abs_diff_vs_torch_cpu"] = diff(batch, dict(zip(STEP_OUTPUTS, run(), strict=True)))
            rows[f"batch_{batch}"] = stats
        return rows

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        for key in [k for k in ("step_fp32", "step_fp16") if k in signature.graphs]:
            guarded(section, f"onnx_cuda_{key}", budget, 30, ort_cuda, key)
    else:
        section["onnx_cuda"] = {
            "skipped": f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})"
        }

    def tensorrt(fp16: bool):
        from mobile_vla.export.tensorrt_engine import build_engine
        from mobile_vla.runtime.tensorrt_backend import TensorRTRunner

        started = time.perf_counter()
        plan_folder = build_engine(folder, signature, max_batch=max(batches), opt_batch=8, fp16=fp16)
        build_s = time.perf_counter() - started
        runner = TensorRTRunner(folder, signature, fp16=fp16)
        rows = {
            "build_seconds": round(build_s, 1),
            "plan_folder": plan_folder.name,
            "plan_mb": round(sum(p.stat().st_size for p in plan_folder.glob("*.plan")) / 1e6, 1),
        }
        for batch in batches:
            cuda_feeds = {k: torch.from_numpy(v).cuda() for k, v in feeds[batch].items()}
            stats = time_cuda(lambda feeds=cuda_feeds: runner.run(dict(feeds)), ROUNDS[batch])
            outputs = {k: v.float().cpu().numpy() for k, v in runner.run(dict(cuda_feeds)).items()}
            stats["max_abs_diff_vs_torch_cpu"] = diff(batch, outputs)
            rows[f"batch_{batch}"] = stats
        return rows

    try:
        from mobile_vla.export.tensorrt_engine import require_tensorrt

        trt = require_tensorrt()
        section["tensorrt_version"] = trt.__version__
        guarded(section, "tensorrt_fp32", budget, 90, tensorrt, False)
        guarded(section, "tensorrt_fp16", budget, 90, tensorrt, True)
    except Exception as exc:
        section["tensorrt"] = {"skipped": str(exc)}

    def chain():
        backend = load_backend(folder)
        out = backend.predict(frames[:2], np.zeros((2, 3), np.float32), ["go to the red box"] * 2)
        return {"chosen": backend.name, "skipped": backend.skipped, "actions_shape": list(out.actions.shape)}

    guarded(section, "load_backend_default_chain", budget, 20, chain)


def engines(results: dict, budget: Budget, preset: str) -> None:
    section: dict = {}
    results[f"engines_{preset}"] = section
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / preset
        exported = guarded(section, "export", budget, 60, export_preset, preset, folder)
        if exported is None:
            return
        signature = exported.pop("signature")
        section["export"] = exported
        engine_variants(section, budget, folder, signature)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new variants after this")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="plumbing check without a GPU: the tiny preset on the CPU (numbers mean nothing)",
    )
    parser.add_argument("--skip-full-onnx", action="store_true", help="no ONNX export / ORT CUDA run of the full model")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    try:
        import mobile_vla  # noqa: F401
    except ImportError:  # the repository without `pip install -e .`
        sys.path.insert(0, str(root / "platform"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    global DEVICE, FULL_PRESET
    if args.cpu_dry_run:
        DEVICE, FULL_PRESET = "cpu", "tiny"
    budget = Budget(args.budget_s)
    results = REPORT
    results.update({"benchmark": "gpu_check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    try:
        import torch

        results["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
        try:
            import onnxruntime

            results["versions"]["onnxruntime"] = onnxruntime.__version__
            results["versions"]["ort_providers"] = onnxruntime.get_available_providers()
        except ImportError as exc:
            results["versions"]["onnxruntime"] = f"not importable: {exc}"
        if DEVICE == "cuda" and not torch.cuda.is_available():
            results["skipped"] = "no CUDA GPU visible to torch: nothing to measure"
        else:
            results["gpu"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu dry run (tiny preset)"
            built = torch_full(results, budget)
            engines(results, budget, "small")
            if not args.skip_full_onnx:
                full_onnx_cuda_last(results, budget, built)
    except Exception as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
    results["seconds"] = round(args.budget_s - budget.left(), 1)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
