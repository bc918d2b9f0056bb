"""Episode files: one HDF5 file per episode, the unit every data source writes and training reads.

    write_episode("data/ep_000001.h5", Episode(images, actions, state, attrs))
    episode = read_episode("data/ep_000001.h5")                     # validated on the way in
    episode = read_episode("data/ep_000001.h5", load_images=False)  # actions/state/attrs only

Layout (schema_version 1, see docs/data.md):
    images   uint8   [T, H, W, 3]  one HDF5 chunk per frame (a window reads only its frames), compressed
    actions  float32 [T, 3]        linear_x, linear_y, angular_z commanded at each frame (REP-103)
    state    float32 [T, S]        optional; generated and imported data: the previous executed command
    optional per-frame float32 arrays (`FRAME_KEYS`), absent from older files:
    executed [T, 3]  the command the base executed after frame t (generated: the expert's + DART noise)
    measured_velocity [T, 3]  the velocity the base realised after frame t (0 translation: move refused)
    target_bearing, target_distance, target_in_view  [T]  privileged simulator labels (generated data)
    attrs    instruction, episode_id, source, success, control_hz, schema_version, scene (JSON, optional)
             plus any extra scalar provenance attrs of the source.

Every problem raises `DataError("<file>: <key>: <problem>")`, so a bad file among thousands is found
by name. Writes go to a temporary file in the same folder, then an atomic rename: a crash never
leaves a half-written episode under the real name.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mobile_vla.errors import DataError

SCHEMA_VERSION = 1
ACTION_DIM = 3
EPISODE_SUFFIXES = (".h5", ".hdf5")

# attr name -> accepted python types (numbers are checked further below)
REQUIRED_ATTRS: dict[str, tuple[type, ...]] = {
    "instruction": (str,),
    "episode_id": (str,),
    "source": (str,),
    "success": (bool,),
    "control_hz": (int, float),
    "schema_version": (int,),
}
SCALAR_ATTR_TYPES = (str, bool, int, float)
# Optional per-frame arrays: key -> shape after T. Stored as float32; readers accept files without them.
FRAME_KEYS: dict[str, tuple[int, ...]] = {
    "executed": (ACTION_DIM,),  # the command executed after frame t (m/s, m/s, rad/s)
    # the velocity the base realised after frame t: `executed` as the base could execute it, with no
    # translation where a colliding move was refused (m/s, m/s, rad/s)
    "measured_velocity": (ACTION_DIM,),
    "target_bearing": (),  # rad, body frame, left positive: where the target is
    "target_distance": (),  # m, floor-plane distance between the robot's and the target's centres
    "target_in_view": (),  # 1.0 when the target's centre projects inside the camera frame, else 0.0
}


@dataclass
class Episode:
    """One recorded or generated episode. `images` is None when read with load_images=False."""

    images: np.ndarray | None  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, 3]
    state: np.ndarray | None  # float32 [T, S]
    attrs: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None  # (T, H, W, 3) as stored, known even without images
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # optional per-frame arrays (FRAME_KEYS)

    def __post_init__(self) -> None:
        if self.image_shape is None and isinstance(self.images, np.ndarray):
            self.image_shape = tuple(self.images.shape)

    @property
    def num_frames(self) -> int:
        return int(len(self.actions))

    @property
    def instruction(self) -> str:
        return str(self.attrs["instruction"])

    @property
    def episode_id(self) -> str:
        return str(self.attrs["episode_id"])


def _fail(where: str | Path, key: str, problem: str) -> DataError:
    return DataError(f"{where}: {key}: {problem}")


def _describe(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} {list(array.shape)}"
    return type(array).__name__


def _check_finite(where: str | Path, key: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        value = array[tuple(bad)]
        raise _fail(where, key, f"{value} at index {bad.tolist()}: values must be finite (no NaN/inf)")


def _validate_attrs(where: str | Path, attrs: dict[str, Any]) -> None:
    for name, types in REQUIRED_ATTRS.items():
        if name not in attrs:
            raise _fail(where, f"attrs.{name}", "missing")
        value = attrs[name]
        ok = isinstance(value, types) and not (bool not in types and isinstance(value, bool))
        if not ok:
            wanted = " or ".join(t.__name__ for t in types)
            raise _fail(where, f"attrs.{name}", f"{value!r} is {type(value).__name__}, expected {wanted}")
    for name in ("instruction", "episode_id", "source"):
        if not attrs[name].strip():
            raise _fail(where, f"attrs.{name}", "empty string")
    hz = attrs["control_hz"]
    if not math.isfinite(hz) or hz <= 0:
        raise _fail(where, "attrs.control_hz", f"{hz!r}: must be a positive number")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise _fail(where, "attrs.schema_version", f"{attrs['schema_version']}: this version reads {SCHEMA_VERSION}")
    if "scene" in attrs:
        scene = attrs["scene"]
        if not isinstance(scene, str):
            raise _fail(where, "attrs.scene", f"{type(scene).__name__}: expected a JSON string")
        try:
            parsed = json.loads(scene)
        except json.JSONDecodeError as exc:
            raise _fail(where, "attrs.scene", f"not valid JSON ({exc.msg} at char {exc.pos})") from None
        if not isinstance(parsed, dict):
            raise _fail(where, "attrs.scene", f"JSON {type(parsed).__name__}: expected an object")
    for name, value in attrs.items():
        if not isinstance(value, SCALAR_ATTR_TYPES):
            raise _fail(where, f"attrs.{name}", f"{type(value).__name__}: attrs must be str, bool, int or float")


def _validate_parts(
    where: str | Path,
    image_shape: tuple[int, ...] | None,
    image_dtype: np.dtype | None,
    actions: Any,
    state: Any,
    attrs: dict[str, Any],
    extras: dict[str, Any] | None = None,
) -> None:
    if image_shape is None:
        raise _fail(where, "images", "missing")
    if image_dtype != np.uint8:
        raise _fail(where, "images", f"dtype {image_dtype}: expected uint8 RGB frames")
    if len(image_shape) != 4 or image_shape[-1] != 3:
        raise _fail(where, "images", f"shape {list(image_shape)}: expected [T, H, W, 3]")
    num_frames = image_shape[0]
    if num_frames < 1 or image_shape[1] < 1 or image_shape[2] < 1:
        raise _fail(where, "images", f"shape {list(image_shape)}: empty episode")

    if not isinstance(actions, np.ndarray) or actions.dtype != np.float32:
        raise _fail(where, "actions", f"{_describe(actions)}: expected float32 [T, {ACTION_DIM}]")
    if actions.shape != (num_frames, ACTION_DIM):
        raise _fail(
            where, "actions", f"shape {list(actions.shape)}: expected [{num_frames}, {ACTION_DIM}] (T from images)"
        )
    _check_finite(where, "actions", actions)

    if state is not None:
        if not isinstance(state, np.ndarray) or state.dtype != np.float32:
            raise _fail(where, "state", f"{_describe(state)}: expected float32 [T, S]")
        if state.ndim != 2 or state.shape[0] != num_frames or state.shape[1] < 1:
            raise _fail(where, "state", f"shape {list(state.shape)}: expected [{num_frames}, S] with S >= 1")
        _check_finite(where, "state", state)

    for key, array in (extras or {}).items():
        if key not in FRAME_KEYS:
            raise _fail(where, key, f"unknown per-frame array; expected one of {sorted(FRAME_KEYS)}")
        expected = (num_frames, *FRAME_KEYS[key])
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            raise _fail(where, key, f"{_describe(array)}: expected float32 {list(expected)}")
        if array.shape != expected:
            raise _fail(where, key, f"shape {list(array.shape)}: expected {list(expected)} (T from images)")
        _check_finite(where, key, array)

    _validate_attrs(where, attrs)


def validate_episode(episode: Episode, path: str | Path | None = None) -> None:
    """Raises DataError naming `path` (or 'episode') and the key at fault; returns None when valid."""
    where = path if path is not None else f"episode {episode.attrs.get('episode_id', '?')}"
    if episode.images is not None:
        if not isinstance(episode.images, np.ndarray):
            raise _fail(where, "images", f"{_describe(episode.images)}: expected a uint8 array [T, H, W, 3]")
        image_shape, image_dtype = tuple(episode.images.shape), episode.images.dtype
    else:
        image_shape, image_dtype = episode.image_shape, np.dtype(np.uint8) if episode.image_shape else None
    _validate_parts(where, image_shape, image_dtype, episode.actions, episode.state, episode.attrs, episode.extras)


def _as_float32(array: Any) -> Any:
    """Float arrays of any width are stored as float32; anything else is left for validation to refuse."""
    if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(array, dtype=np.float32)
    return array


def _plain(value: Any) -> Any:
    """HDF5 attrs come back as numpy scalars/bytes: turn them into the python types validation expects."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _plain(value.item())
    return value


def write_episode(
    path: str | Path,
    episode: Episode,
    compression: str = "gzip",
    compression_level: int = 4,
) -> Path:
    """Validates, writes to a temporary file beside `path`, fsyncs, then renames it into place."""
    if compression not in ("gzip", "lzf"):
        raise DataError(f"{path}: compression {compression!r}: expected 'gzip' or 'lzf'")
    path = Path(path)
    episode = Episode(
        images=episode.images,
        actions=_as_float32(episode.actions),
        state=_as_float32(episode.state),
        attrs={k: _plain(v) for k, v in episode.attrs.items()},
        extras={k: _as_float32(v) for k, v in episode.extras.items()},
    )
    if episode.images is None:
        raise _fail(path, "images", "missing (an episode is written with its frames)")
    validate_episode(episode, path)
    images = np.ascontiguousarray(episode.images)
    num_frames, height, width, _ = images.shape

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    options = {"compression": compression}
    if compression == "gzip":
        options["compression_opts"] = compression_level
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(1, height, width, 3), **options)
            f.create_dataset("actions", data=episode.actions)
            if episode.state is not None:
                f.create_dataset("state", data=episode.state)
            for key, array in episode.extras.items():
                f.create_dataset(key, data=array)
            for name, value in episode.attrs.items():
                f.attrs[name] = value
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _open(path: Path):
    if not path.is_file():
        raise _fail(path, "file", "not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _fail(path, "file", f"not a readable HDF5 file (truncated or corrupt?): {exc}") from None


def _read_array(path: Path, f, key: str) -> np.ndarray:
    try:
        return f[key][()]
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(path, key, f"unreadable data (truncated or corrupt?): {exc}") from None


def read_episode(path: str | Path, load_images: bool = True) -> Episode:
    """Reads and validates one episode file; `load_images=False` reads only the small arrays."""
    path = Path(path)
    with _open(path) as f:
        for key in ("images", "actions"):
            if key not in f:
                raise _fail(path, key, "missing")
        image_dataset = f["images"]
        if not hasattr(image_dataset, "shape"):
            raise _fail(path, "images", "is a group, expected a dataset")
        image_shape, image_dtype = tuple(image_dataset.shape), image_dataset.dtype
        actions = _read_array(path, f, "actions")
        state = _read_array(path, f, "state") if "state" in f else None
        extras = {key: _read_array(path, f, key) for key in FRAME_KEYS if key in f}
        try:
            attrs = {name: _plain(value) for name, value in f.attrs.items()}
        except OSError as exc:
            raise _fail(path, "attrs", f"unreadable (truncated or corrupt?): {exc}") from None
        _validate_parts(path, image_shape, image_dtype, actions, state, attrs, extras)
        images = _read_array(path, f, "images") if load_images else None
    return Episode(images=images, actions=actions, state=state, attrs=attrs, image_shape=image_shape, extras=extras)


def list_episode_files(folder: str | Path) -> list[str]:
    """Episode file names (not paths) in a dataset folder, sorted; temporary files are skipped."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.suffix in EPISODE_SUFFIXES and not p.name.startswith("."))


class FrameReader:
    """Reads frame ranges from many episode files, keeping a few handles open per process.

    h5py handles must not cross a fork, so the cache belongs to the process that opened them.
    """

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._handles: dict[Path, Any] = {}
        self._pid = os.getpid()

    def _handle(self, path: Path):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = _open(path)
            if len(self._handles) >= self.max_open:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
        self._handles[path] = handle  # most recently used last
        return handle

    def read(self, path: str | Path, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start, H, W, 3] frames start..stop-1 of one episode."""
        path = Path(path)
        try:
            return self._handle(path)["images"][start:stop]
        except (OSError, KeyError) as exc:
            raise _fail(path, "images", f"unreadable frames {start}..{stop - 1}: {exc}") from None

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self):  # pickled into Ray tasks / DataLoader workers without open handles
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])
