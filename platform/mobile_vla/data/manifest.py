"""`manifest.json`: what a dataset folder holds, and the statistics training normalises with.

    manifest = build_manifest("data/nav", {"train": [...], "val": [...]}, generator={"kind": "miniworld"})
    manifest = load_manifest("data/nav")   # DataError when missing or malformed

Statistics (mean, std, min, max, q01, q99 per axis of actions and state) come from the TRAIN split
only, so validation numbers are never normalised with what they are judged on. The per-episode
table (`episodes`) lets loaders size and tokenise a split without opening every file; `frame_keys`
names the optional per-frame arrays (`episodes.FRAME_KEYS`) that every episode holds, so a trainer
knows whether auxiliary labels are there (absent from older manifests: read it as []).
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from mobile_vla.data.episodes import read_episode
from mobile_vla.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


def axis_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Per-axis statistics of values [N, D] as plain lists (JSON)."""
    values = np.asarray(values, dtype=np.float64)  # [N, D]
    return {
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def split_names(names: list[str], fractions: dict[str, float], seed: int = 0) -> dict[str, list[str]]:
    """Deterministic random split, e.g. fractions {"train": 0.9, "val": 0.1}; every split with a
    positive fraction gets at least one episode when there are enough of them.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise DataError(f"split fractions {fractions}: expected non-negative numbers with a positive sum")
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    total = sum(fractions.values())
    wanted = {name: int(round(len(shuffled) * f / total)) for name, f in fractions.items()}
    for name, f in fractions.items():  # small datasets: keep every asked-for split non-empty
        if f > 0 and wanted[name] == 0 and len(shuffled) >= len(fractions):
            wanted[name] = 1
    first = next(iter(fractions))
    wanted[first] += len(shuffled) - sum(wanted.values())  # rounding goes to the first split
    out, start = {}, 0
    for name in fractions:
        out[name] = sorted(shuffled[start : start + wanted[name]])
        start += wanted[name]
    return out


def read_json_object(path: Path) -> dict:
    """The JSON object in the file at `path`; DataError naming the file when it is not valid JSON
    or holds something other than an object. The caller checks that the file exists (its own hint).
    """
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes `data` as indented JSON through a temporary file and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_manifest(
    folder: str | Path,
    splits: dict[str, list[str]],
    generator: dict,
    expert_success: dict | None = None,
    progress: bool = False,
) -> dict:
    """Reads every listed episode (without images), computes counts and train statistics, and writes
    `manifest.json` atomically. Raises DataError naming the file when an episode is bad or missing.
    """
    folder = Path(folder)
    seen: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in seen:
                raise DataError(f"{folder / name}: listed in split {seen[name]!r} and {split!r}")
            seen[name] = split
    if not seen:
        raise DataError(f"{folder}: no episodes listed in any split")

    episodes: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, list[np.ndarray]]] = {s: {"actions": [], "state": []} for s in splits}
    control_hz: dict[float, str] = {}
    state_dims: dict[int, str] = {}
    image_sizes: dict[tuple[int, int], str] = {}
    frame_keys: set[str] | None = None  # optional per-frame arrays that every episode has
    for name in _progress(list(seen), "reading episodes", progress):
        path = folder / name
        episode = read_episode(path, load_images=False)
        split = seen[name]
        arrays[split]["actions"].append(episode.actions)
        if episode.state is not None:
            arrays[split]["state"].append(episode.state)
        control_hz.setdefault(float(episode.attrs["control_hz"]), name)
        state_dims.setdefault(0 if episode.state is None else episode.state.shape[1], name)
        image_sizes.setdefault(tuple(episode.image_shape[1:3]), name)
        frame_keys = set(episode.extras) if frame_keys is None else frame_keys & set(episode.extras)
        episodes[name] = {
            "split": split,
            "frames": episode.num_frames,
            "instruction": episode.instruction,
            "success": bool(episode.attrs["success"]),
            "source": episode.attrs["source"],
        }
    for what, found in (("control_hz", control_hz), ("state dim", state_dims)):
        if len(found) > 1:
            detail = ", ".join(f"{value} in {name}" for value, name in found.items())
            raise DataError(f"{folder}: episodes disagree on {what} ({detail}); one dataset, one value")

    stats_splits = ["train"] if arrays.get("train", {}).get("actions") else list(splits)
    actions = np.concatenate([a for s in stats_splits for a in arrays[s]["actions"]])  # [N, 3]
    states = [a for s in stats_splits for a in arrays[s]["state"]]
    manifest = {
        "format": "mobile-vla-dataset",
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "splits": {s: list(names) for s, names in splits.items()},
        "counts": {
            s: {"episodes": len(names), "frames": int(sum(episodes[n]["frames"] for n in names))}
            for s, names in splits.items()
        },
        "stats": {
            "computed_on": stats_splits,
            "actions": axis_stats(actions),
            "state": axis_stats(np.concatenate(states)) if states else None,
        },
        "state_dim": next(iter(state_dims)),
        "control_hz": next(iter(control_hz)),
        "image_sizes": sorted([list(size) for size in image_sizes]),
        "frame_keys": sorted(frame_keys or ()),
        "episodes": episodes,
        "generator": generator,
        "expert_success": expert_success or {},
    }
    manifest["counts"]["total"] = {
        "episodes": len(episodes),
        "frames": int(sum(e["frames"] for e in episodes.values())),
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


class _AxisStats(BaseModel):
    model_config = ConfigDict(extra="allow")
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]


class _Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    actions: _AxisStats
    state: _AxisStats | None


class _SplitCount(BaseModel):
    episodes: int
    frames: int


class _EpisodeEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    split: str
    frames: int
    instruction: str


class _Manifest(BaseModel):
    """Only what readers rely on is checked; extra keys (new sections, feedback data) are kept."""

    model_config = ConfigDict(extra="allow")
    manifest_version: int
    splits: dict[str, list[str]]
    counts: dict[str, _SplitCount]
    stats: _Stats
    state_dim: int
    control_hz: float
    episodes: dict[str, _EpisodeEntry]
    generator: dict[str, Any]


def load_manifest(folder: str | Path) -> dict:
    """The validated `manifest.json` of a dataset folder; DataError naming the problem otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    if not path.is_file():
        raise DataError(
            f"{folder}: no {MANIFEST_NAME} - is this a dataset folder? generate one with `mobile-vla data generate`"
        )
    data = read_json_object(path)
    try:
        _Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise DataError(f"{path}: {loc}: {err['msg']}") from None
    if data["manifest_version"] > MANIFEST_VERSION:
        raise DataError(
            f"{path}: manifest_version {data['manifest_version']}: this version reads up to {MANIFEST_VERSION}"
        )
    for axis_key in ("actions", "state"):
        stats = data["stats"][axis_key]
        if stats is None:
            continue
        width = 3 if axis_key == "actions" else data["state_dim"]
        for key in STAT_KEYS:
            if len(stats[key]) != width:
                raise DataError(f"{path}: stats.{axis_key}.{key}: {len(stats[key])} values, expected {width}")
    return data


def _progress(items: list, description: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)
