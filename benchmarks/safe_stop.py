"""How often the safety ladder slows or stops on in-distribution, visual-shift and covered/blank frames.

    .venv/bin/python benchmarks/safe_stop.py --model models:/mobile-vla-policy@champion --data DIR

Offline half of issue 18's safe-stop check: every frame of each `--splits` split of a dataset (episodes
stepped as serving steps them: one step per frame from a fresh memory, the episode's own instruction
and state) and `--blank` synthetic covered/blank frames (black, white, grey, dark noise) go through the
served backend (ONNX Runtime by default) and the serve ladder (serve/safety.py) with the version's
calibrated thresholds (or `--set name=value` overrides, as in the serve config's `safety:`). Reports the
share of steps at each level and each reason per split: the issue asks >= 90% slow/stop/handover on
visual-shift and blank frames, <= 5% slow/stop on in-distribution (val/test) frames.

NOT here yet: the closed-loop half (collisions and success per episode with and without the ladder over
N seeds); it needs the ladder applied inside evaluate/closed_loop.py's rollout.
Writes benchmarks/results/safe_stop.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "safe_stop.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="MODEL_URI (models:/NAME@alias, models:/NAME/V or a folder)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.json with the splits)")
    parser.add_argument("--splits", default="val,visual_shift", help="comma-separated splits to score")
    parser.add_argument("--max-windows", type=int, default=256, help="windows per split (evenly spread)")
    parser.add_argument("--blank", type=int, default=16, help="synthetic covered/blank frames (0: none)")
    parser.add_argument("--backend", default="onnx-cpu", help="runtime backend (onnx-cpu, torch, ...)")
    parser.add_argument("--set", action="append", default=[], help="safety override NAME=VALUE (serve config)")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def blank_frames(count: int, seed: int = 0) -> np.ndarray:
    """Covered-lens and blank frames uint8 [N, 224, 224, 3]: black, white, grey, and dark noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        kind = i % 4
        if kind == 3:
            frames.append(rng.integers(0, 40, (224, 224, 3), dtype=np.uint8))  # a hand over the lens
        else:
            frames.append(np.full((224, 224, 3), (0, 255, 128)[kind], np.uint8))
    return np.stack(frames)


def split_steps(backend, data: str, split: str, max_windows: int):
    """Yields (images [B, H, W, 3], state [B, S] raw, instructions) per window step, serving-style."""
    from mobile_vla.train.windows import WindowDataset

    pre = backend.preprocessing
    dataset = WindowDataset(data, split, pre, augment=False, stride=pre.window)
    ids = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), max_windows)).astype(int))
    index = dataset.index
    for i in ids:
        sample = dataset[int(i)]
        episode = int(index.windows[i][0])
        text = index.paths[episode]
        yield sample, text


def raw_state(pre, normalised: np.ndarray) -> np.ndarray:
    """A window's normalised state [B, S] back to what a robot sends (the backend normalises it again)."""
    std = np.asarray(pre.state_std, np.float32)
    std = np.where(std > 1e-6, std, 1.0)
    return (np.asarray(normalised, np.float32) * std + np.asarray(pre.state_mean, np.float32)).astype(np.float32)


def level_shares(decisions: list) -> dict:
    levels = Counter(d.level for d in decisions)
    reasons = Counter(r for d in decisions for r in d.reasons)
    n = max(len(decisions), 1)
    return {
        "steps": len(decisions),
        "levels": {k: levels.get(k, 0) / n for k in ("normal", "slow", "stop", "handover")},
        "reasons": {k: v / n for k, v in sorted(reasons.items())},
        "not_normal": 1 - levels.get("normal", 0) / n,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from mobile_vla.data.episodes import read_episode
    from mobile_vla.runtime.backends import load_backend
    from mobile_vla.serve.safety import SafetyInputs, decide, effective_thresholds
    from mobile_vla.serve.settings import SafetyConfig
    from mobile_vla.tracking import resolve_model

    overrides = dict(item.split("=", 1) for item in args.set)
    config = SafetyConfig.model_validate({k: float(v) if k != "enabled" else v for k, v in overrides.items()})
    resolved = resolve_model(args.model)
    backend = load_backend(resolved.path, prefer=(args.backend,))
    pre = backend.preprocessing
    limits = effective_thresholds(
        config, backend.safety.thresholds if backend.safety else None, pre.control_hz, backend.signature.chunk
    )

    def judge(out) -> list:
        confidence = out.confidence if out.confidence_now is None else out.confidence_now
        novelty = [None] * len(confidence) if out.novelty is None else out.novelty
        return [
            decide(SafetyInputs(float(c), None if n is None else float(n), None), limits, 0)
            for c, n in zip(confidence, novelty, strict=True)
        ]

    started = time.perf_counter()
    result = {
        "model": args.model,
        "backend": backend.name,
        "novelty": backend.safety is not None,
        "novelty_note": backend.safety_note,
        "thresholds": vars(limits),
        "splits": {},
    }
    for split in [s for s in args.splits.split(",") if s]:
        decisions = []
        for sample, path in split_steps(backend, args.data, split, args.max_windows):
            instruction = read_episode(path, load_images=False).instruction
            memory = None
            for t in np.flatnonzero(sample["frame_mask"] > 0):
                state = raw_state(pre, sample["state"][t : t + 1])
                out = backend.predict(sample["images"][t : t + 1], state, [instruction], memory)
                memory = out.memory
                decisions += judge(out)
        result["splits"][split] = level_shares(decisions)
    if args.blank:
        frames = blank_frames(args.blank)
        out = backend.predict(
            frames, np.zeros((len(frames), pre.state_dim), np.float32), ["go to the red box"] * len(frames)
        )
        result["splits"]["blank_covered"] = level_shares(judge(out))
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["splits"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
