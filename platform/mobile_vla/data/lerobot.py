"""LeRobotDataset v3 import and export: `mobile-vla data import|export --format lerobot`.

    export_lerobot("data/nav", "exports/nav_lerobot")     # a dataset folder -> a LeRobotDataset v3 folder
    import_lerobot("exports/nav_lerobot", "data/nav2")    # a LeRobotDataset v3 folder -> a dataset folder

The layout follows LeRobot's published v3.0 format (lerobot >= 0.4; docs/data.md has the table):
    meta/info.json                      codebase_version "v3.0", fps, features, totals, chunks_size,
                                        data/video file sizes, data_path and video_path templates, splits
    meta/stats.json                     per feature: min, max, mean, std, count (+ quantiles for vectors)
    meta/tasks.parquet                  one row per distinct instruction: task (index), task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode: episode_index, tasks, length,
                                        data/chunk_index, data/file_index, dataset_from_index/_to_index
    data/chunk-XXX/file-XXX.parquet     one row per frame, many episodes per file, one row group each
    meta/mobile_vla.json                what only this platform reads (manifest's generator, ...)

Frames are stored as LeRobot *image* features inside the data parquet (a struct of PNG `bytes` and
`path`, as `datasets.Image` writes it): no video encoder (PyAV, imageio-ffmpeg, an ffmpeg binary,
torchvision.io video) is installed with the platform, so no mp4 is written and `video_path` is null.
PNG is lossless, so export -> import returns the frames bit for bit. Importing a set whose camera is
a *video* feature is refused with a message saying so.

Platform fields that LeRobot has no column for travel in columns and files LeRobot ignores:
per-frame `executed`, `measured_velocity`, `target_*` as features `mobile_vla.<key>`; per episode the
file name, split and every attr (JSON: scene seed, success, source, ...) as `mobile_vla/...` columns of
meta/episodes; the manifest's generator and expert success in meta/mobile_vla.json.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from mobile_vla.data.episodes import ACTION_DIM, FRAME_KEYS, SCHEMA_VERSION, Episode, read_episode, write_episode
from mobile_vla.data.frames import RESIZE_RULES, resize_frame
from mobile_vla.data.manifest import (
    MANIFEST_NAME,
    build_manifest,
    load_manifest,
    read_json_object,
    split_names,
    write_json_atomic,
)
from mobile_vla.errors import DataError

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
PLATFORM_META_PATH = "meta/mobile_vla.json"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"  # the template LeRobot uses; not written here
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's default)
DATA_FILES_SIZE_IN_MB = 100  # a data file is closed once it reaches this size (LeRobot's default)
VIDEO_FILES_SIZE_IN_MB = 200
CAMERA_KEY = "observation.images.front"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
ACTION_NAMES = ["linear_x", "linear_y", "angular_z"]
EXTRA_PREFIX = "mobile_vla."  # per-frame arrays of episodes.FRAME_KEYS
FILE_COLUMN, SPLIT_COLUMN, ATTRS_COLUMN = "mobile_vla/file", "mobile_vla/split", "mobile_vla/attrs"
INDEX_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
IMAGE_SIZE = 224
ROBOT_TYPE = "mobile_vla_omniwheel"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.(h5|hdf5)$")


@dataclass
class ExportReport:
    """What an export wrote: episodes, frames, data files, and arrays left out (named)."""

    episodes: int = 0
    frames: int = 0
    data_files: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # "<file>: <key>" extras only some episodes have


@dataclass
class LeRobotImportReport:
    """What an import wrote: episode files, frames, the camera used, resizing done, manifest."""

    imported: list[str] = field(default_factory=list)
    frames: int = 0
    camera: str = ""
    resized_from: list[str] = field(default_factory=list)  # source frame sizes "HxW" that were resized
    state: str = ""  # where the state came from
    manifest: dict | None = None


# ----------------------------------------------------------------------------------------------- export


def _features(image_size: tuple[int, int], state_dim: int, frame_keys: list[str]) -> dict[str, dict]:
    """info.json `features`: the platform's arrays under LeRobot's names, then the index columns."""
    height, width = image_size
    features: dict[str, dict] = {
        CAMERA_KEY: {"dtype": "image", "shape": [height, width, 3], "names": ["height", "width", "channels"]},
    }
    if state_dim:
        names = [f"previous_{n}" for n in ACTION_NAMES] if state_dim == 3 else [f"state_{i}" for i in range(state_dim)]
        features[STATE_KEY] = {"dtype": "float32", "shape": [state_dim], "names": names}
    features[ACTION_KEY] = {"dtype": "float32", "shape": [ACTION_DIM], "names": list(ACTION_NAMES)}
    for key in frame_keys:
        shape = list(FRAME_KEYS[key]) or [1]
        names = list(ACTION_NAMES) if shape == [ACTION_DIM] else None
        features[EXTRA_PREFIX + key] = {"dtype": "float32", "shape": shape, "names": names}
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in INDEX_KEYS[1:]:
        features[key] = {"dtype": "int64", "shape": [1], "names": None}
    return features


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _vector_column(values: np.ndarray) -> pa.Array:
    """float32 [T, D] -> fixed_size_list<float32>[D] (what `datasets.Sequence(length=D)` reads)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _frame_table(
    episode: Episode, episode_index: int, first_index: int, task_index: int, fps: float, frame_keys: list[str]
) -> pa.Table:
    """One episode as T rows of the data parquet, columns in `_features` order."""
    num_frames = episode.num_frames
    frame_index = np.arange(num_frames, dtype=np.int64)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns: dict[str, pa.Array] = {
        CAMERA_KEY: pa.array([{"bytes": _png(frame), "path": None} for frame in episode.images], image_type),
    }
    if episode.state is not None:
        columns[STATE_KEY] = _vector_column(episode.state)
    columns[ACTION_KEY] = _vector_column(episode.actions)
    for key in frame_keys:
        array = episode.extras[key]
        columns[EXTRA_PREFIX + key] = (
            _vector_column(array) if array.ndim == 2 else pa.array(array.astype(np.float32, copy=False))
        )
    columns["timestamp"] = pa.array((frame_index / fps).astype(np.float32))
    columns["frame_index"] = pa.array(frame_index)
    columns["episode_index"] = pa.array(np.full(num_frames, episode_index, np.int64))
    columns["index"] = pa.array(first_index + frame_index)
    columns["task_index"] = pa.array(np.full(num_frames, task_index, np.int64))
    return pa.table(columns)


class _Stats:
    """Running statistics per feature; vectors are kept whole for exact quantiles (small: [N, D])."""

    def __init__(self) -> None:
        self.vectors: dict[str, list[np.ndarray]] = {}
        self.pixels = {"sum": np.zeros(3), "sq": np.zeros(3), "min": np.full(3, 255), "max": np.zeros(3), "n": 0}

    def add(self, key: str, values: np.ndarray) -> None:
        self.vectors.setdefault(key, []).append(np.asarray(values, np.float64).reshape(len(values), -1))

    def add_table(self, table: pa.Table, images: np.ndarray) -> None:
        """One episode: its frames uint8 [T, H, W, 3] and the numeric columns of its data table."""
        self.add_images(images)
        for key in table.column_names:
            column = table.column(key).combine_chunks()
            if pa.types.is_struct(column.type):  # the camera, counted by add_images
                continue
            values = column.flatten() if pa.types.is_fixed_size_list(column.type) else column
            self.add(key, values.to_numpy(zero_copy_only=False).reshape(len(column), -1))

    def add_images(self, images: np.ndarray) -> None:  # uint8 [T, H, W, 3]
        flat = images.reshape(-1, 3).astype(np.float64)
        self.pixels["sum"] += flat.sum(axis=0)
        self.pixels["sq"] += (flat**2).sum(axis=0)
        self.pixels["min"] = np.minimum(self.pixels["min"], flat.min(axis=0))
        self.pixels["max"] = np.maximum(self.pixels["max"], flat.max(axis=0))
        self.pixels["n"] += len(flat)

    def to_json(self, frames: int) -> dict[str, dict[str, list]]:
        stats: dict[str, dict[str, list]] = {}
        n = self.pixels["n"]
        if n:  # LeRobot's image statistics: per channel, scaled to [0, 1], shape [3, 1, 1]
            mean = self.pixels["sum"] / n
            std = np.sqrt(np.maximum(self.pixels["sq"] / n - mean**2, 0.0))
            stats[CAMERA_KEY] = {
                name: (value / 255.0).reshape(3, 1, 1).tolist()
                for name, value in (
                    ("min", self.pixels["min"]),
                    ("max", self.pixels["max"]),
                    ("mean", mean),
                    ("std", std),
                )
            }
            stats[CAMERA_KEY]["count"] = [frames]
        for key, parts in self.vectors.items():
            values = np.concatenate(parts)  # [N, D]
            stats[key] = {
                "min": values.min(axis=0).tolist(),
                "max": values.max(axis=0).tolist(),
                "mean": values.mean(axis=0).tolist(),
                "std": values.std(axis=0).tolist(),
                "count": [len(values)],
                **{f"q{round(q * 100):02d}": np.quantile(values, q, axis=0).tolist() for q in QUANTILES},
            }
        return stats


def _ordered_episodes(manifest: dict) -> list[tuple[str, str]]:
    """(file, split) with each split's episodes together, so info.json `splits` are index ranges."""
    return [(name, split) for split, names in manifest["splits"].items() for name in names]


def _new_folder(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"{dst}: exists and is not an empty folder; export/import into a new folder")
    dst.mkdir(parents=True, exist_ok=True)


def export_lerobot(
    src: str | Path,
    dst: str | Path,
    data_files_size_in_mb: float = DATA_FILES_SIZE_IN_MB,
    chunks_size: int = CHUNKS_SIZE,
    progress: bool = True,
) -> ExportReport:
    """Writes the dataset folder `src` (with manifest.json) as a LeRobotDataset v3 folder `dst`.

    Raises DataError naming the folder or file at fault (no manifest, episodes of several frame sizes,
    a bad episode file); `dst` is removed again when the export fails.
    """
    src, dst = Path(src), Path(dst)
    manifest = load_manifest(src)
    sizes = manifest.get("image_sizes") or []
    if len(sizes) != 1:
        raise DataError(
            f"{src / MANIFEST_NAME}: image_sizes {sizes}: a LeRobot image feature has one shape; resize the "
            "episodes to one size first"
        )
    if chunks_size < 1 or not data_files_size_in_mb > 0:
        raise DataError(f"chunks_size {chunks_size}, data_files_size_in_mb {data_files_size_in_mb}: expected > 0")
    _new_folder(dst)
    try:
        return _export(src, dst, manifest, tuple(sizes[0]), data_files_size_in_mb, chunks_size, progress)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def _export(
    src: Path, dst: Path, manifest: dict, image_size: tuple, file_mb: float, chunks_size: int, progress: bool
) -> ExportReport:
    fps = float(manifest["control_hz"])
    frame_keys = [k for k in manifest.get("frame_keys", []) if k in FRAME_KEYS]
    features = _features(image_size, int(manifest["state_dim"]), frame_keys)
    schema = None
    report, stats, tasks = ExportReport(), _Stats(), {}
    episode_rows: list[dict[str, Any]] = []
    split_ranges: dict[str, list[int]] = {}
    chunk_index = file_index = 0
    writer: pq.ParquetWriter | None = None
    written = 0  # bytes in the open data file
    ordered = _ordered_episodes(manifest)
    try:
        for episode_index, (name, split) in enumerate(_progress(ordered, "exporting episodes", progress)):
            episode = read_episode(src / name)
            task_index = tasks.setdefault(episode.instruction, len(tasks))
            table = _frame_table(episode, episode_index, report.frames, task_index, fps, frame_keys)
            schema = schema or table.schema
            if not table.schema.equals(schema):
                raise DataError(f"{src / name}: columns {table.schema.names}: differ from the first episode's")
            if writer is not None and written >= file_mb * 2**20:
                writer.close()
                writer, written = None, 0
                file_index += 1
                if file_index >= chunks_size:
                    chunk_index, file_index = chunk_index + 1, 0
            if writer is None:
                path = dst / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(path, schema, compression="snappy")
                report.data_files.append(str(path.relative_to(dst)))
            writer.write_table(table)  # one row group per episode
            written += table.nbytes
            report.dropped += [f"{name}: {key}" for key in sorted(set(episode.extras) - set(frame_keys))]
            episode_stats = _Stats()  # LeRobot's editing tools (merge, delete, split) read per-episode stats
            for accumulator in (stats, episode_stats):
                accumulator.add_table(table, episode.images)
            episode_rows.append(
                {
                    "episode_index": episode_index,
                    "tasks": [episode.instruction],
                    "length": episode.num_frames,
                    "data/chunk_index": chunk_index,
                    "data/file_index": file_index,
                    "dataset_from_index": report.frames,
                    "dataset_to_index": report.frames + episode.num_frames,
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                    FILE_COLUMN: name,
                    SPLIT_COLUMN: split,
                    ATTRS_COLUMN: json.dumps(episode.attrs, sort_keys=True),
                    **{
                        f"stats/{key}/{stat}": value
                        for key, by_stat in episode_stats.to_json(episode.num_frames).items()
                        for stat, value in by_stat.items()
                    },
                }
            )
            split_ranges.setdefault(split, [episode_index, episode_index])[1] = episode_index + 1
            report.episodes += 1
            report.frames += episode.num_frames
    finally:
        if writer is not None:
            writer.close()

    episodes_path = dst / EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), episodes_path)
    task_frame = pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task"))
    task_frame.to_parquet(dst / TASKS_PATH)
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": ROBOT_TYPE,
        "total_episodes": report.episodes,
        "total_frames": report.frames,
        "total_tasks": len(tasks),
        "chunks_size": chunks_size,
        "data_files_size_in_mb": file_mb,
        "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB,
        "fps": int(fps) if fps.is_integer() else fps,
        "splits": {split: f"{start}:{stop}" for split, (start, stop) in split_ranges.items()},
        "data_path": DATA_PATH,
        "video_path": None,  # no video encoder installed: frames are image features in the data files
        "features": features,
    }
    write_json_atomic(dst / INFO_PATH, info)
    write_json_atomic(dst / STATS_PATH, stats.to_json(report.frames))
    write_json_atomic(
        dst / PLATFORM_META_PATH,
        {
            "format": "mobile-vla-lerobot",
            "version": 1,
            "source": str(src.resolve()),
            "control_hz": fps,
            "state_dim": int(manifest["state_dim"]),
            "frame_keys": frame_keys,
            "image_encoding": "png",
            "generator": manifest.get("generator", {}),
            "expert_success": manifest.get("expert_success", {}),
        },
    )
    return report


# ----------------------------------------------------------------------------------------------- import


def _load_json(root: Path, relative: str, required: bool = True) -> dict | None:
    path = root / relative
    if not path.is_file():
        if not required:
            return None
        hint = " - is this a LeRobotDataset v3 folder?" if relative == INFO_PATH else ""
        raise DataError(f"{path}: missing{hint}")
    return read_json_object(path)


def _shape(info_path: Path, key: str, feature: Any) -> list[int]:
    if not isinstance(feature, dict) or "dtype" not in feature or not isinstance(feature.get("shape"), list):
        raise DataError(f"{info_path}: features.{key}: {feature!r}: expected an object with dtype and shape")
    return [int(n) for n in feature["shape"]]


@dataclass
class _Layout:
    """What meta/info.json says, checked."""

    fps: float
    features: dict[str, dict]
    camera: str
    state_dim: int  # 0: no observation.state
    frame_keys: list[str]
    splits: dict[str, str]


def _pick_camera(info_path: Path, features: dict, camera: str | None) -> str:
    """The image feature to import: `camera`, else the only one; video features are refused."""
    cameras = {k: f for k, f in features.items() if isinstance(f, dict) and f.get("dtype") in ("image", "video")}
    if not cameras:
        raise DataError(f"{info_path}: features: no camera (a feature with dtype image or video)")
    if camera is None:
        if len(cameras) > 1:
            raise DataError(f"{info_path}: features: cameras {sorted(cameras)}: pick one with --camera KEY")
        camera = next(iter(cameras))
    if camera not in cameras:
        raise DataError(f"{info_path}: features.{camera}: no such camera; cameras: {sorted(cameras)}")
    if cameras[camera]["dtype"] == "video":
        raise DataError(
            f"{info_path}: features.{camera}: dtype 'video' (mp4 under videos/): decoding it needs a video library "
            "(PyAV) that is not installed with the platform; import sets whose frames are image features"
        )
    camera_shape = _shape(info_path, camera, cameras[camera])
    if len(camera_shape) != 3 or 3 not in (camera_shape[0], camera_shape[-1]):
        raise DataError(f"{info_path}: features.{camera}.shape {camera_shape}: expected [H, W, 3] or [3, H, W]")
    return camera


def read_info(root: Path, camera: str | None = None) -> _Layout:
    """meta/info.json checked against what the platform needs; DataError naming the field and value."""
    info = _load_json(root, INFO_PATH)
    info_path = root / INFO_PATH
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        hint = " (convert it with lerobot's convert_dataset_v21_to_v30)" if str(version).startswith("v2") else ""
        raise DataError(f"{info_path}: codebase_version {version!r}: this importer reads {CODEBASE_VERSION!r}{hint}")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise DataError(f"{info_path}: fps {fps!r}: expected a positive number")
    features = info.get("features")
    if not isinstance(features, dict):
        raise DataError(f"{info_path}: features: {type(features).__name__}: expected an object")
    if ACTION_KEY not in features:
        raise DataError(f"{info_path}: features.{ACTION_KEY}: missing")
    action_shape = _shape(info_path, ACTION_KEY, features[ACTION_KEY])
    if action_shape != [ACTION_DIM]:
        raise DataError(
            f"{info_path}: features.{ACTION_KEY}.shape {action_shape}: expected [{ACTION_DIM}] "
            f"({', '.join(ACTION_NAMES)}, body frame)"
        )
    for key in ("episode_index", "frame_index", "task_index"):
        if key not in features:
            raise DataError(f"{info_path}: features.{key}: missing")
    camera = _pick_camera(info_path, features, camera)
    state_dim = 0
    if STATE_KEY in features:
        state_shape = _shape(info_path, STATE_KEY, features[STATE_KEY])
        if len(state_shape) != 1 or state_shape[0] < 1:
            raise DataError(f"{info_path}: features.{STATE_KEY}.shape {state_shape}: expected [S] with S >= 1")
        state_dim = state_shape[0]
    frame_keys = [k for k in FRAME_KEYS if EXTRA_PREFIX + k in features]
    splits = info.get("splits") if isinstance(info.get("splits"), dict) else {}
    return _Layout(float(fps), features, camera, state_dim, frame_keys, splits)


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file (truncated or corrupt?): {exc}") from None


def _parquet_files(root: Path, folder: str) -> list[Path]:
    """chunk-XXX/file-XXX.parquet under `folder`, in order (how LeRobot finds them)."""
    paths = sorted((root / folder).glob("*/*.parquet"))
    if not paths:
        raise DataError(f"{root / folder}: no parquet files (expected {folder}/chunk-000/file-000.parquet)")
    return paths


def _read_tasks(root: Path) -> dict[int, str]:
    path = root / TASKS_PATH
    if not path.is_file():
        raise DataError(f"{path}: missing")
    table = _read_table(path)
    name = "task" if "task" in table.column_names else "__index_level_0__"
    if name not in table.column_names or "task_index" not in table.column_names:
        raise DataError(f"{path}: columns {table.column_names}: expected task and task_index")
    tasks = dict(zip(table.column("task_index").to_pylist(), table.column(name).to_pylist(), strict=True))
    for index, task in tasks.items():
        if not isinstance(task, str) or not task.strip():
            raise DataError(f"{path}: task_index {index}: task {task!r}: expected a non-empty instruction")
    return tasks


def _read_episode_rows(root: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for path in _parquet_files(root, "meta/episodes"):
        table = _read_table(path)
        for column in ("episode_index", "length"):
            if column not in table.column_names:
                raise DataError(f"{path}: {column}: missing column")
        wanted = [c for c in table.column_names if not c.startswith("stats/")]
        for row in table.select(wanted).to_pylist():
            rows[int(row["episode_index"])] = {**row, "_file": path}
    return rows


def _column(path: Path, table: pa.Table, key: str, width: int) -> np.ndarray:
    """A numeric column as float32 [T, width] (width 0: a scalar column, returned as [T])."""
    if key not in table.column_names:
        raise DataError(f"{path}: {key}: missing column")
    column = table.column(key).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if width == 0 or (lengths != width).any():
            bad = int(np.argmax(lengths != width)) if width else 0
            raise DataError(f"{path}: {key}: row {bad} holds {lengths[bad]} values, expected {width or 'a scalar'}")
        values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    else:
        if width not in (0, 1):
            raise DataError(f"{path}: {key}: {column.type} scalars, expected lists of {width}")
        values = column.to_numpy(zero_copy_only=False)
        values = values.reshape(-1, 1) if width == 1 else values
    try:
        values = values.astype(np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {key}: not numeric ({exc})") from None
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise DataError(f"{path}: {key}: {values[tuple(bad)]} at row {bad[0]}: values must be finite (no NaN/inf)")
    return values


def _decode_frames(path: Path, table: pa.Table, key: str, resize_rule: str, resized: set[str]) -> np.ndarray:
    """Image struct column -> uint8 [T, 224, 224, 3]; other sizes resized by `resize_rule`."""
    if key not in table.column_names:
        raise DataError(f"{path}: {key}: missing column")
    column = table.column(key).combine_chunks()
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise DataError(f"{path}: {key}: {column.type}: expected an image struct with 'bytes' and 'path'")
    frames = np.empty((len(column), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # [T, 224, 224, 3]
    for row, data in enumerate(column.field("bytes").to_pylist()):
        if data is None:
            raise DataError(f"{path}: {key}: row {row}: no embedded image bytes (external image files are not read)")
        try:
            with Image.open(io.BytesIO(data)) as image:
                frame = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: {key}: row {row}: not a decodable image ({exc})") from None
        if frame.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            resized.add(f"{frame.shape[0]}x{frame.shape[1]}")
        frames[row] = resize_frame(frame, IMAGE_SIZE, resize_rule)
    return frames


def _episode_tables(root: Path) -> Iterator[tuple[Path, int, pa.Table]]:
    """(data file, episode index, that episode's rows sorted by frame_index) over every data file."""
    for path in _parquet_files(root, "data"):
        table = _read_table(path)
        for key in ("episode_index", "frame_index"):
            if key not in table.column_names:
                raise DataError(f"{path}: {key}: missing column")
        episode_index = table.column("episode_index").to_numpy()
        for value in dict.fromkeys(episode_index.tolist()):  # in order of appearance
            rows = table.filter(pc.equal(table.column("episode_index"), value))
            yield path, int(value), rows.sort_by("frame_index")


def _attrs(path: Path, meta: dict, episode_index: int, task: str, fps: float) -> dict[str, Any]:
    """The episode's attrs: the platform's own (exported) or built from the LeRobot episode."""
    if meta.get(ATTRS_COLUMN):
        try:
            attrs = json.loads(meta[ATTRS_COLUMN])
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{meta['_file']}: {ATTRS_COLUMN}: episode {episode_index}: not valid JSON ({exc})"
            ) from None
        if not isinstance(attrs, dict):
            raise DataError(f"{meta['_file']}: {ATTRS_COLUMN}: episode {episode_index}: expected a JSON object")
        return attrs
    return {
        "instruction": task,
        "episode_id": f"lerobot-{episode_index:06d}",
        "source": "lerobot",
        "success": True,  # LeRobot episodes are demonstrations
        "control_hz": fps,
        "schema_version": SCHEMA_VERSION,
        "lerobot.episode_index": episode_index,
        "lerobot.source": str(path.parent.parent.parent),
    }


def _convert(
    path: Path,
    episode_index: int,
    rows: pa.Table,
    layout: _Layout,
    meta: dict,
    tasks: dict,
    resize_rule: str,
    resized: set[str],
) -> Episode:
    """One episode's rows -> an Episode; DataError names the data file, episode and column."""
    where = f"{path}: episode {episode_index}"
    num_frames = rows.num_rows
    frame_index = rows.column("frame_index").to_numpy()
    if not np.array_equal(frame_index, np.arange(num_frames)):
        raise DataError(f"{where}: frame_index: {frame_index[:8].tolist()}...: expected 0..{num_frames - 1}")
    if int(meta["length"]) != num_frames:
        raise DataError(f"{where}: {num_frames} rows, {meta['_file']} says length {meta['length']}")
    task_indices = set(rows.column("task_index").to_pylist())
    if len(task_indices) != 1 or next(iter(task_indices)) not in tasks:
        raise DataError(
            f"{where}: task_index {sorted(task_indices)}: expected one task of {TASKS_PATH} per episode "
            "(a platform episode carries one instruction)"
        )
    actions = _column(path, rows, ACTION_KEY, ACTION_DIM)  # [T, 3]
    if layout.state_dim:
        state = _column(path, rows, STATE_KEY, layout.state_dim)  # [T, S]
    elif meta.get(ATTRS_COLUMN):
        state = None  # a platform dataset without state
    else:  # the platform's state for data without one: the previous command, zeros at the start
        state = np.zeros_like(actions)  # [T, 3]
        state[1:] = actions[:-1]
    extras = {key: _column(path, rows, EXTRA_PREFIX + key, (FRAME_KEYS[key] or (0,))[0]) for key in layout.frame_keys}
    images = _decode_frames(path, rows, layout.camera, resize_rule, resized)  # [T, 224, 224, 3]
    attrs = _attrs(path, meta, episode_index, tasks[next(iter(task_indices))], layout.fps)
    return Episode(images=images, actions=actions, state=state, attrs=attrs, extras=extras)


def _splits(layout: _Layout, rows: dict[int, dict], names: dict[int, str], val_fraction: float, seed: int):
    """{split: [file]}: the exported split column, else info.json's ranges, else a seeded train/val split."""
    if all(rows[i].get(SPLIT_COLUMN) for i in names):
        splits: dict[str, list[str]] = {}
        for index, name in names.items():
            splits.setdefault(rows[index][SPLIT_COLUMN], []).append(name)
        return splits, "exported"
    ranges = {}
    for split, text in layout.splits.items():
        match = re.fullmatch(r"(\d+):(\d+)", str(text))
        if match:
            ranges[split] = range(int(match[1]), int(match[2]))
    covered = [i for i in names if sum(i in r for r in ranges.values()) == 1]
    if len(ranges) > 1 and len(covered) == len(names):
        return {s: [names[i] for i in names if i in r] for s, r in ranges.items() if any(i in r for i in names)}, "info"
    fractions = {"train": 1 - val_fraction, "val": val_fraction} if val_fraction > 0 else {"train": 1.0}
    return split_names(list(names.values()), fractions, seed), "random"


def import_lerobot(
    src: str | Path,
    dst: str | Path,
    camera: str | None = None,
    resize_rule: str = "letterbox",
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> LeRobotImportReport:
    """Converts the LeRobotDataset v3 folder `src` into a new dataset folder `dst` with a manifest.

    Checks meta/info.json first (codebase_version, action dim 3, one image camera), then every episode;
    the first problem raises DataError naming the file, field and value, and `dst` is removed again.
    Frames of another size than 224x224 are resized by `resize_rule` (reported in `resized_from`).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if resize_rule not in RESIZE_RULES:
        raise DataError(f"resize_rule {resize_rule!r}: expected one of {RESIZE_RULES}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction}: expected 0 <= value < 1")
    layout = read_info(src, camera)
    platform_meta = _load_json(src, PLATFORM_META_PATH, required=False) or {}
    tasks = _read_tasks(src)
    rows = _read_episode_rows(src)
    _new_folder(dst)
    try:
        return _import(src, dst, layout, platform_meta, tasks, rows, resize_rule, val_fraction, seed, progress)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def _import(src, dst, layout, platform_meta, tasks, rows, resize_rule, val_fraction, seed, progress):
    report = LeRobotImportReport(camera=layout.camera)
    report.state = (
        STATE_KEY if layout.state_dim else "none" if platform_meta else "previous command (no observation.state)"
    )
    resized: set[str] = set()
    names: dict[int, str] = {}
    used: set[str] = set()  # file names taken
    for path, episode_index, table in _progress(_episode_tables(src), "importing episodes", progress):
        meta = rows.get(episode_index)
        if meta is None:
            raise DataError(f"{path}: episode_index {episode_index}: not listed in meta/episodes")
        if episode_index in names:
            raise DataError(f"{path}: episode_index {episode_index}: rows in more than one data file")
        episode = _convert(path, episode_index, table, layout, meta, tasks, resize_rule, resized)
        name = str(meta.get(FILE_COLUMN) or "")
        if not _SAFE_NAME.match(name) or name in used:
            name = f"episode_{episode_index:06d}.h5"
        try:
            write_episode(dst / name, episode)
        except DataError as exc:
            raise DataError(f"{path}: episode {episode_index}: {exc}") from None
        names[episode_index] = name
        used.add(name)
        report.frames += episode.num_frames
    missing = sorted(set(rows) - set(names))
    if missing:
        raise DataError(f"{src / 'data'}: episodes {missing[:10]} listed in meta/episodes have no rows")
    report.imported = list(names.values())
    report.resized_from = sorted(resized)
    splits, split_source = _splits(layout, rows, names, val_fraction, seed)
    imported_from = {
        "format": "lerobot",
        "source": str(src.resolve()),
        "codebase_version": CODEBASE_VERSION,
        "camera": layout.camera,
        "splits_from": split_source,
        "resized_from": report.resized_from,
    }
    if platform_meta.get("generator") is not None:  # a set this platform exported: its own generator back
        generator = {**platform_meta["generator"], "imported_from": imported_from}
    else:
        generator = {"kind": "import", "resize_rule": resize_rule, "control_hz": layout.fps, **imported_from}
    report.manifest = build_manifest(dst, splits, generator, expert_success=platform_meta.get("expert_success"))
    return report


def _progress(items, description: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)
