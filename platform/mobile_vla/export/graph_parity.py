"""One step graph against another (int8 vs fp32, a TensorRT plan vs fp32): the figures and the verdict.

    diffs = compare_steps(reference, candidate, preprocessing, encode_text, memory, images, batches=(1, 8))
    failures = over_tolerance(diffs, {"actions": 0.05, "confidence": 0.05})

`reference` and `candidate` are callables feeds -> outputs by name (`session_step(session)` for an
ONNX Runtime session). Figures, each the max abs difference of "actions" (normalised, in [-1, 1]),
"confidence", "h" and "c": "batch_<B>" is one step from a non-zero memory on B real frames;
"sequence_<T>" is T steps from zero memory where each side feeds back its own state (what a robot's
episode does to an error in the memory). Callers gate on actions and confidence (h and c are
recorded: their effect on the answers is what the sequence figures measure).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mobile_vla.export import parity

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
COMPARED = {"actions": "actions", "confidence": "confidence", "h_out": "h", "c_out": "c"}  # output -> label
SEQUENCE_BATCH = 2  # sequences of the recurrent round trip


def session_step(session) -> Step:
    """An ONNX Runtime session as a Step: every output by name (version 1 and 2 graphs alike)."""
    names = [out.name for out in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds), strict=True))


def output_diffs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per compared output (inf when the candidate gave NaN or inf)."""
    out = {}
    for key, label in COMPARED.items():
        b = np.asarray(got[key], np.float64)
        out[label] = float(np.abs(np.asarray(reference[key], np.float64) - b).max()) if np.isfinite(b).all() else np.inf
    return out


def recurrent_feeds(
    reference: Step, preprocessing, encode_text, memory: tuple[int, int], frames: np.ndarray, steps: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """The feeds of `steps` reference steps over frames [B*steps] as B sequences from zero memory, each
    step fed the state the previous one returned (what a robot's episode looks like to the graph).
    """
    batch = len(frames) // steps
    images = frames[: batch * steps].reshape(batch, steps, *frames.shape[1:])  # [B, T, H, W, C]
    base = parity.graph_feeds(preprocessing, encode_text, memory, images[:, 0], parity.PARITY_INSTRUCTIONS, seed)
    rng = np.random.default_rng(seed)
    h, c = np.zeros_like(base["h_in"]), np.zeros_like(base["c_in"])
    feeds = []
    for t in range(steps):
        step = {
            **base,
            "images": np.ascontiguousarray(images[:, t]),
            "state": rng.normal(scale=0.5, size=base["state"].shape).astype(np.float32),
            "h_in": h,
            "c_in": c,
        }
        feeds.append(step)
        out = reference(step)
        h, c = out["h_out"], out["c_out"]
    return feeds


def compare_steps(
    reference: Step,
    candidate: Step,
    preprocessing,
    encode_text,
    memory: tuple[int, int],
    images: np.ndarray,
    batches: tuple[int, ...],
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The figures of the module docstring; `images` [N, H, W, 3] needs N >= max(batches) and
    SEQUENCE_BATCH * preprocessing.window.
    """
    figures: dict[str, dict[str, float]] = {}
    for batch in batches:
        feeds = parity.graph_feeds(
            preprocessing, encode_text, memory, images[:batch], parity.PARITY_INSTRUCTIONS, seed + batch
        )
        figures[f"batch_{batch}"] = output_diffs(reference(feeds), candidate(feeds))
    steps = preprocessing.window
    sequence = recurrent_feeds(
        reference, preprocessing, encode_text, memory, images[: SEQUENCE_BATCH * steps], steps, seed
    )
    worst: dict[str, float] = {}
    h, c = np.zeros_like(sequence[0]["h_in"]), np.zeros_like(sequence[0]["c_in"])
    for step in sequence:  # the reference follows its own states (recorded in the feeds), the candidate its own
        got = candidate({**step, "h_in": h, "c_in": c})
        h, c = got["h_out"], got["c_out"]
        for label, value in output_diffs(reference(step), got).items():
            worst[label] = max(worst.get(label, 0.0), value)
    figures[f"sequence_{steps}"] = worst
    return figures


def over_tolerance(figures: dict[str, dict[str, float]], tolerances: dict[str, float]) -> list[str]:
    """Every gated figure above its tolerance (NaN and inf count), as readable lines."""
    failures = []
    for key, diffs in figures.items():
        for label, tolerance in tolerances.items():
            value = diffs.get(label, float("nan"))
            if not value <= tolerance:
                failures.append(f"{key} {label} max abs diff {value:.3g} > {tolerance:g}")
    return failures
