"""Parity between the exported graphs and PyTorch, measured at export time on real frames.

An export is refused when a figure is above its tolerance, so a version can only carry graphs that
answer like the model that was trained. Figures (max abs difference over actions, confidence, h, c):
- one step at batch 1 and at batch 32 (fp32, tolerance 1e-4), from a non-zero memory;
- the recurrent round trip: the step graph run T times, feeding its own state back, against the
  PyTorch sequence `forward` over the same T frames (fp32, tolerance 1e-4);
- the text encoder graph against `encode_instruction`;
- the fp16 graph at batch 1 and 32 (tolerance FP16_TOLERANCE; see below).

Real frames: MiniWorld renders (the simulator the policy trains in), or frames from a dataset folder
(`--data DIR`) - random noise would hide the errors that only show on structured images.

fp16 tolerance: the fp16 graph keeps fp32 inputs and outputs but computes in fp16 (about 3 decimal
digits), on normalised actions in [-1, 1], a confidence in [0, 1] and LSTM states whose cells can
exceed 1. FP16_TOLERANCE = 5e-2 bounds the max abs difference over all four outputs; measured
figures on tiny/small are about 1e-3 (see the version's signature.json), so it catches a broken
conversion (an overflow gives inf or errors of order 1) without failing on honest rounding.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mobile_vla.data.episodes import list_episode_files, read_episode
from mobile_vla.errors import DataError, ModelError
from mobile_vla.export.signature import STEP_INPUTS, STEP_OUTPUTS, ParityFigures

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
PARITY_BATCHES = (1, 32)
PARITY_INSTRUCTIONS = [
    "go to the red box",
    "navigate to the target avoiding the box on the left",
    "go to the blue box avoiding the green box on the right",
    "drive to the yellow box",
]
MINIWORLD_ENVS = ("MiniWorld-PutNext-v0", "MiniWorld-RoomObjects-v0", "MiniWorld-OneRoom-v0")


@dataclass(frozen=True)
class Frames:
    """Real frames for the parity check, and where they came from (recorded in signature.json)."""

    images: np.ndarray  # uint8 [N, 224, 224, 3]
    source: str


def _render_miniworld(count: int, size: int, seed: int) -> np.ndarray:
    """Runs in its own interpreter (see parity_frames)."""
    # Imported here, in the child interpreter only: a GL context must not exist in a process that
    # forks later, and pyglet reads PYOPENGL_PLATFORM / its options when first imported.
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyglet

    pyglet.options["headless"] = True
    import gymnasium as gym
    import miniworld  # noqa: F401 (registers the environments)

    rng = np.random.default_rng(seed)
    frames = []
    per_env = -(-count // len(MINIWORLD_ENVS))
    for i, env_id in enumerate(MINIWORLD_ENVS):
        env = gym.make(env_id, obs_width=size, obs_height=size)
        try:
            obs, _ = env.reset(seed=seed + i)
            for _ in range(per_env):
                frames.append(obs)
                obs, *_ = env.step(int(rng.integers(0, 3)))  # turn left / right / forward
        finally:
            env.close()
    return np.stack(frames[:count]).astype(np.uint8)


def parity_frames(count: int, size: int = 224, data_dir: str | Path | None = None, seed: int = 0) -> Frames:
    """`count` real frames: from a dataset folder if given, else rendered in MiniWorld.

    Rendering runs in a fresh interpreter (`python -m mobile_vla.export.parity`), never in this
    process: a GL context must not exist in a process that forks later, and multiprocessing's spawn
    would re-run the caller's main module.
    """
    if data_dir is not None:
        return _dataset_frames(Path(data_dir), count, size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "frames.npy"
        command = [sys.executable, "-m", "mobile_vla.export.parity", str(count), str(size), str(seed), str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0 or not out.is_file():
            why = "timed out" if done is None else (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(
                f"cannot render MiniWorld frames for the parity check ({why}); "
                "pass a dataset folder instead (mobile-vla export --data DIR)"
            )
        images = np.load(out)
    return Frames(images, f"miniworld:{','.join(MINIWORLD_ENVS)}:seed{seed}")


def _dataset_frames(folder: Path, count: int, size: int) -> Frames:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder")
    names = list_episode_files(folder)
    if not names:
        raise DataError(f"{folder}: no episode files")
    frames: list[np.ndarray] = []
    for name in names:
        images = read_episode(folder / name).images
        if images.shape[1:] != (size, size, 3):
            raise DataError(f"{folder / name}: images {list(images.shape[1:])}, parity needs [{size},{size},3]")
        take = min(len(images), max(1, count // 4))  # spread over episodes
        frames.extend(images[np.linspace(0, len(images) - 1, take).astype(int)])
        if len(frames) >= count:
            break
    while len(frames) < count:  # a tiny dataset: reuse frames (still real ones)
        frames.extend(frames[: count - len(frames)])
    return Frames(np.stack(frames[:count]), f"dataset:{folder}")


def _max_abs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Max abs difference over the step outputs; vision_features (unbounded backbone features, e.g. a
    pretrained CLIP's of norm ~10) count relative to their largest magnitude when that exceeds 1.
    """
    worst = 0.0
    for key in STEP_OUTPUTS:
        a, b = np.asarray(reference[key], np.float64), np.asarray(got[key], np.float64)
        if a.shape != b.shape:
            raise ModelError(f"parity: output {key} shape {list(b.shape)}, PyTorch gives {list(a.shape)}")
        if not np.isfinite(b).all():
            return float("inf")
        scale = max(1.0, float(np.abs(a).max())) if key == "vision_features" else 1.0
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


def step_feeds(model, preprocessing, images: np.ndarray, instructions: list[str], seed: int) -> dict[str, np.ndarray]:
    """Feeds for one step: real frames, plausible normalised state, a non-zero memory (text from PyTorch)."""

    def encode(clip_input_ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_instruction(torch.from_numpy(clip_input_ids)).numpy()

    config = model.config
    return graph_feeds(preprocessing, encode, (config.lstm_layers, config.lstm_hidden), images, instructions, seed)


def graph_feeds(
    preprocessing, encode_text, memory: tuple[int, int], images: np.ndarray, instructions: list[str], seed: int
) -> dict[str, np.ndarray]:
    """`step_feeds` for any text encoder (`encode_text(clip_input_ids) -> clip_text`, e.g. the exported
    text graph) and a recurrent state of (layers, hidden); no torch needed.
    """
    batch = len(images)
    rng = np.random.default_rng(seed)
    texts = [instructions[i % len(instructions)] for i in range(batch)]
    tokens = preprocessing.tokenize(texts)
    clip_text = encode_text(tokens["clip_input_ids"])
    layers, hidden = memory
    return {
        "images": images,
        "state": rng.normal(size=(batch, preprocessing.state_dim)).astype(np.float32),
        "clip_text": np.asarray(clip_text, np.float32),
        "kosmos_input_ids": tokens["kosmos_input_ids"],
        "kosmos_attention_mask": tokens["kosmos_attention_mask"],
        "kosmos_image_embeds_position_mask": tokens["kosmos_image_embeds_position_mask"],
        "h_in": (0.5 * rng.standard_normal((layers, batch, hidden))).astype(np.float32),
        "c_in": (0.5 * rng.standard_normal((layers, batch, hidden))).astype(np.float32),
    }


def torch_step(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One PyTorch `policy.step_with_safety` on numpy feeds named as STEP_INPUTS -> outputs named as STEP_OUTPUTS."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    tokens = {k: t[k] for k in STEP_INPUTS[3:6]}
    with torch.inference_mode():
        out = model.step_with_safety(t["images"], t["state"], tokens, (t["h_in"], t["c_in"]), clip_text=t["clip_text"])
    h, c = out.memory
    values = (out.actions, out.confidence, h, c, out.confidence_now, out.vision_features)
    return dict(zip(STEP_OUTPUTS, (x.numpy() for x in values), strict=True))


def cpu_session(path: str | Path):
    """An ONNX Runtime CPU session on a graph file (quiet: errors only), for the checks at export time."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_step(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step of an ONNX Runtime session of the step graph -> outputs named as STEP_OUTPUTS."""
    return dict(zip(STEP_OUTPUTS, session.run(STEP_OUTPUTS, feeds), strict=True))


def sequence_max_abs(model, preprocessing, session, frames: np.ndarray, steps: int, batch: int, seed: int) -> float:
    """T graph steps from zero memory, feeding the state back, vs PyTorch `forward` over the window."""
    images = frames[: batch * steps].reshape(batch, steps, *frames.shape[1:])  # [B, T, H, W, C]
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(batch, steps, preprocessing.state_dim)).astype(np.float32)  # [B, T, S]
    texts = [PARITY_INSTRUCTIONS[i % len(PARITY_INSTRUCTIONS)] for i in range(batch)]
    tokens = preprocessing.tokenize(texts)
    batch_dict = {"images": images, "state": state, **tokens}
    with torch.inference_mode():
        reference = model(batch_dict)
        clip_text = model.encode_instruction(torch.from_numpy(tokens["clip_input_ids"])).numpy()
    h, c = (m.numpy() for m in model.initial_memory(batch))
    worst = 0.0
    for t in range(steps):
        out = ort_step(
            session,
            {
                "images": np.ascontiguousarray(images[:, t]),
                "state": state[:, t],
                "clip_text": clip_text,
                "kosmos_input_ids": tokens["kosmos_input_ids"],
                "kosmos_attention_mask": tokens["kosmos_attention_mask"],
                "kosmos_image_embeds_position_mask": tokens["kosmos_image_embeds_position_mask"],
                "h_in": h,
                "c_in": c,
            },
        )
        h, c = out["h_out"], out["c_out"]
        worst = max(
            worst,
            float(np.abs(out["actions"] - reference.actions[:, t].numpy()).max()),
            float(np.abs(out["confidence"] - reference.confidence[:, t].numpy()).max()),
        )
    worst = max(
        worst,
        float(np.abs(h - reference.memory[0].numpy()).max()),
        float(np.abs(c - reference.memory[1].numpy()).max()),
    )
    return worst


def measure_parity(
    model,
    preprocessing,
    fp32_session,
    text_session,
    frames: Frames,
    fp16_session=None,
    batches: tuple[int, ...] = PARITY_BATCHES,
    sequence_batch: int = 2,
    seed: int = 0,
) -> ParityFigures:
    """All figures; raises ModelError (with every figure) if one is above its tolerance."""
    steps = preprocessing.window
    fp32: dict[str, float] = {}
    fp16: dict[str, float] = {}
    for batch in batches:
        feeds = step_feeds(model, preprocessing, frames.images[:batch], PARITY_INSTRUCTIONS, seed + batch)
        reference = torch_step(model, feeds)
        fp32[f"batch_{batch}"] = _max_abs(reference, ort_step(fp32_session, feeds))
        if fp16_session is not None:
            fp16[f"batch_{batch}"] = _max_abs(reference, ort_step(fp16_session, feeds))
    sequence = sequence_max_abs(model, preprocessing, fp32_session, frames.images, steps, sequence_batch, seed)
    ids = preprocessing.tokenize(PARITY_INSTRUCTIONS)["clip_input_ids"]
    with torch.inference_mode():
        text_ref = model.encode_instruction(torch.from_numpy(ids)).numpy()
    text = float(np.abs(text_session.run(None, {"clip_input_ids": ids})[0] - text_ref).max())
    figures = ParityFigures(
        frames=frames.source,
        instructions=list(PARITY_INSTRUCTIONS),
        fp32_tolerance=FP32_TOLERANCE,
        fp32_max_abs_diff=fp32,
        sequence_steps=steps,
        sequence_max_abs_diff=sequence,
        text_encoder_max_abs_diff=text,
        fp16_tolerance=FP16_TOLERANCE if fp16_session is not None else None,
        fp16_max_abs_diff=fp16 or None,
    )
    failures = parity_failures(figures)
    if failures:
        raise ModelError("export refused, parity check failed: " + "; ".join(failures))
    return figures


def parity_failures(figures: ParityFigures) -> list[str]:
    """Every figure above its tolerance (NaN counts as a failure), as readable lines."""
    failures = []

    def check(label: str, value: float, tolerance: float) -> None:
        if not value <= tolerance:  # also catches NaN
            failures.append(f"{label} max abs diff {value:.3g} > {tolerance:g}")

    for key, value in figures.fp32_max_abs_diff.items():
        check(f"fp32 {key}", value, figures.fp32_tolerance)
    check(f"recurrent {figures.sequence_steps}-step round trip", figures.sequence_max_abs_diff, figures.fp32_tolerance)
    check("text encoder", figures.text_encoder_max_abs_diff, figures.fp32_tolerance)
    for key, value in (figures.fp16_max_abs_diff or {}).items():
        check(f"fp16 {key}", value, figures.fp16_tolerance or FP16_TOLERANCE)
    return failures


if __name__ == "__main__":  # python -m mobile_vla.export.parity COUNT SIZE SEED OUT.npy
    _count, _size, _seed, _out = sys.argv[1:5]
    np.save(_out, _render_miniworld(int(_count), int(_size), int(_seed)))
