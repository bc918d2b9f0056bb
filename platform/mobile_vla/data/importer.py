"""`mobile-vla data import --format minuum-h5 SRC DST`: the original robot collector's episodes.

The collector wrote one HDF5 file per episode: `images` uint8 [T, 720, 1280, 3], `actions` float32
[T, 3] (linear_x, linear_y, angular_z), `action_event_types` [T] (episode_start / start_action /
stop_action) and attrs such as `episode_name`, `num_frames`, `total_duration`. Import rules
(docs/data.md):
- frames: resized to 224x224 by `data.frames.resize_frame` (letterbox by default), the same rule
  serving applies to camera frames;
- instruction: `dataset_index.csv` beside the files (columns `file` or `episode_name`, and
  `instruction`), else a `language_instruction` dataset inside the file, else the scenario in the
  episode name: `1box_left` / `1box_vert_left` -> "navigate to the target avoiding the box on the
  left", `2box_hori_right` -> "... avoiding the two boxes on the right";
- state: S = 3, the action commanded at the previous frame (zeros at the episode start), the same
  definition as generated data;
- control_hz: `--control-hz`, else the median over files of num_frames / total_duration;
- success: True (operator demonstrations); the original attrs are kept as `minuum.<name>`.
A corrupt or truncated file is reported by name and skipped; the rest is imported.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from rich.progress import track

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.frames import resize_frame
from mobile_vla.data.manifest import MANIFEST_NAME, build_manifest, split_names
from mobile_vla.errors import DataError

FORMATS = ("minuum-h5",)
INDEX_CSV = "dataset_index.csv"
DEFAULT_CONTROL_HZ = 1.0
IMAGE_SIZE = 224
SCENARIO = re.compile(r"(?P<count>\d+)box(?:_(?P<layout>vert|hori))?_(?P<side>left|right)")
_COUNT_WORDS = {1: "the box", 2: "the two boxes", 3: "the three boxes"}


@dataclass
class ImportReport:
    """What an import did: files written, files skipped with the reason, frames, rate, manifest."""

    imported: list[str] = field(default_factory=list)  # episode file names written in DST
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source file, reason)
    frames: int = 0
    control_hz: float = DEFAULT_CONTROL_HZ
    manifest: dict | None = None


def instruction_from_scenario(name: str) -> str | None:
    """'episode_20250808_123136_1box_vert_left' -> 'navigate to the target avoiding the box on the left'."""
    match = SCENARIO.search(name)
    if match is None:
        return None
    count = int(match["count"])
    obstacles = _COUNT_WORDS.get(count, f"the {count} boxes")
    return f"navigate to the target avoiding {obstacles} on the {match['side']}"


def read_index_csv(path: Path) -> dict[str, str]:
    """dataset_index.csv -> {file stem or episode name: instruction}."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    if not rows:
        return {}
    columns = set(rows[0])
    key_columns = [c for c in ("file", "filename", "episode_name", "episode") if c in columns]
    if "instruction" not in columns or not key_columns:
        raise DataError(
            f"{path}: expected columns 'instruction' and one of file/filename/episode_name/episode, "
            f"got {sorted(columns)}"
        )
    lookup = {}
    for row in rows:
        for column in key_columns:
            if row.get(column):
                lookup[Path(row[column].strip()).stem] = row["instruction"].strip()
    return lookup


def _source_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{src}: no such file or folder")
    files = sorted(p for p in src.rglob("*") if p.suffix in (".h5", ".hdf5") and not p.name.startswith("."))
    if not files:
        raise DataError(f"{src}: no .h5/.hdf5 files to import")
    return files


def _plain_attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    return value


def _estimate_control_hz(files: list[Path]) -> float:
    rates = []
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                frames, duration = f.attrs.get("num_frames"), f.attrs.get("total_duration")
                stored = f["images"].shape[0] if "images" in f else None
                if frames and frames == stored and duration and float(duration) > 0:  # consistent files only
                    rates.append(float(frames) / float(duration))
        except (OSError, KeyError, TypeError, ValueError):
            continue  # reported by the main pass
    return round(statistics.median(rates), 3) if rates else DEFAULT_CONTROL_HZ


def convert_minuum_file(
    path: Path,
    instructions: dict[str, str],
    control_hz: float,
    resize_rule: str = "letterbox",
    default_instruction: str | None = None,
) -> Episode:
    """One collector file -> an Episode with 224x224 frames. DataError names the file and key."""
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: file: not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    with handle as f:
        for key in ("images", "actions"):
            if key not in f:
                raise DataError(f"{path}: {key}: missing")
        images = f["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
            raise DataError(f"{path}: images: {images.dtype} {list(images.shape)}: expected uint8 [T, H, W, 3]")
        num_frames, source_size = images.shape[0], f"{images.shape[1]}x{images.shape[2]}"
        actions = _read_actions(path, f, num_frames)  # [T, 3]
        attrs = {name: _plain_attr(value) for name, value in f.attrs.items()}
        declared = attrs.get("num_frames")
        if declared is not None and int(declared) != num_frames:
            raise DataError(f"{path}: attrs.num_frames: {declared} but images holds {num_frames} frames (truncated?)")
        events = _read_events(path, f, num_frames)
        in_file_instruction = _read_instruction(f)
        frames = _resized_frames(path, images, resize_rule)  # [T, 224, 224, 3]

    name = str(attrs.get("episode_name") or path.stem)
    instruction = (
        instructions.get(path.stem)
        or instructions.get(name)
        or in_file_instruction
        or instruction_from_scenario(name)
        or instruction_from_scenario(path.stem)
        or default_instruction
    )
    if not instruction:
        raise DataError(
            f"{path}: instruction: not in {INDEX_CSV}, no language_instruction in the file, and no scenario "
            f"like '1box_left' in the name (pass --default-instruction)"
        )
    state = np.zeros_like(actions)  # [T, 3]: the command of the previous frame, zeros at the start
    state[1:] = actions[:-1]
    episode_attrs = {
        "instruction": instruction,
        "episode_id": name,
        "source": "minuum-h5",
        "success": True,
        "control_hz": float(control_hz),
        "schema_version": SCHEMA_VERSION,
        "original_file": path.name,
        "original_frame_size": source_size,
        "resize_rule": resize_rule,
    }
    if events is not None:
        episode_attrs["action_event_types"] = json.dumps(events)
    for key, value in attrs.items():
        if isinstance(value, (str, bool, int, float)):
            episode_attrs[f"minuum.{key}"] = value
    return Episode(images=frames, actions=actions, state=state, attrs=episode_attrs)


def _read_actions(path: Path, f: h5py.File, num_frames: int) -> np.ndarray:
    """`actions` as float32 [T, 3], finite, one row per frame."""
    try:
        actions = np.asarray(f["actions"][()], np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: actions: unreadable ({exc})") from None
    if actions.shape != (num_frames, 3):
        raise DataError(f"{path}: actions: shape {list(actions.shape)}: expected [{num_frames}, 3]")
    if not np.isfinite(actions).all():
        raise DataError(f"{path}: actions: contains NaN/inf")
    return actions


def _read_events(path: Path, f: h5py.File, num_frames: int) -> list | None:
    """`action_event_types` as plain strings, one per frame; None when the file has none."""
    if "action_event_types" not in f:
        return None
    events = [_plain_attr(e) for e in f["action_event_types"][()]]
    if len(events) != num_frames:
        raise DataError(f"{path}: action_event_types: {len(events)} entries for {num_frames} frames")
    return events


def _read_instruction(f: h5py.File) -> str | None:
    """The file's own `language_instruction` (a scalar or a 1-element array), if it has one."""
    if "language_instruction" not in f:
        return None
    raw = f["language_instruction"][()]
    raw = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) and raw.size else raw
    return _plain_attr(raw) or None


def _resized_frames(path: Path, images: h5py.Dataset, resize_rule: str) -> np.ndarray:
    """Every frame read one at a time and resized to uint8 [T, 224, 224, 3]."""
    frames = np.empty((images.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # [T, 224, 224, 3]
    for t in range(images.shape[0]):
        try:
            frame = images[t]
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: images: frame {t} unreadable (truncated or corrupt?): {exc}") from None
        frames[t] = resize_frame(frame, IMAGE_SIZE, resize_rule)
    return frames


def import_minuum_h5(
    src: str | Path,
    dst: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    control_hz: float | None = None,
    resize_rule: str = "letterbox",
    default_instruction: str | None = None,
    progress: bool = True,
) -> ImportReport:
    """Converts every collector file under `src` into a new dataset folder `dst` with a manifest.

    Bad files are skipped and named in the report; DataError when none could be imported, when
    `dst` already holds a dataset, or when `val_fraction` is outside [0, 1).
    """
    src, dst = Path(src), Path(dst)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction}: expected 0 <= value < 1")
    if (dst / MANIFEST_NAME).exists():
        raise DataError(f"{dst}: already holds a dataset ({MANIFEST_NAME}); import into a new folder")
    files = _source_files(src)
    lookup: dict[str, str] = {}
    for folder in sorted({p.parent for p in files}):
        if (folder / INDEX_CSV).is_file():
            lookup.update(read_index_csv(folder / INDEX_CSV))
    report = ImportReport(control_hz=control_hz or _estimate_control_hz(files))
    dst.mkdir(parents=True, exist_ok=True)

    for path in _progress(files, f"importing {len(files)} files", progress):
        out_name = f"{path.stem}.h5"
        try:
            episode = convert_minuum_file(path, lookup, report.control_hz, resize_rule, default_instruction)
            if out_name in report.imported:
                raise DataError(f"{path}: file: a file named {out_name} was already imported from another folder")
            write_episode(dst / out_name, episode)
        except DataError as exc:
            report.skipped.append((str(path), str(exc)))
            continue
        report.imported.append(out_name)
        report.frames += episode.num_frames

    if not report.imported:
        first = report.skipped[0][1] if report.skipped else "nothing found"
        raise DataError(f"{src}: none of {len(files)} files could be imported (first problem: {first})")
    fractions = {"train": 1 - val_fraction, "val": val_fraction} if val_fraction > 0 else {"train": 1.0}
    splits = split_names(report.imported, fractions, seed)
    report.manifest = build_manifest(
        dst,
        splits,
        generator={
            "kind": "import",
            "format": "minuum-h5",
            "source": str(src.resolve()),
            "resize_rule": resize_rule,
            "control_hz": report.control_hz,
            "val_fraction": val_fraction,
            "seed": seed,
            "skipped": [name for name, _ in report.skipped],
        },
    )
    return report


def _progress(items: list, description: str, enabled: bool):
    if not enabled:
        yield from items
        return
    yield from track(items, description=description)
