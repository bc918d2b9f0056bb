"""Episode files: round trip, layout on disk, every validation error, atomic writes."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from mobile_vla.data.episodes import (
    SCHEMA_VERSION,
    Episode,
    FrameReader,
    list_episode_files,
    read_episode,
    validate_episode,
    write_episode,
)
from mobile_vla.errors import DataError


def make_episode(num_frames: int = 6, size: int = 32, with_state: bool = True, seed: int = 0) -> Episode:
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (num_frames, 3)).astype(np.float32)
    state = np.vstack([np.zeros((1, 3), np.float32), actions[:-1]]) if with_state else None
    return Episode(
        images=rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8),
        actions=actions,
        state=state,
        attrs={
            "instruction": "go to the red box avoiding the barrel on the left",
            "episode_id": f"ep-{seed}",
            "source": "test",
            "success": True,
            "control_hz": 5.0,
            "schema_version": SCHEMA_VERSION,
            "scene": json.dumps({"env": "Nav-v0", "seed": seed}),
            "expert": "potential-field",
        },
    )


def raw_file(path, episode: Episode, drop: str | None = None, **replace) -> None:
    """Writes an HDF5 file bypassing write_episode's validation, to test what readers catch."""
    arrays = {"images": episode.images, "actions": episode.actions, "state": episode.state}
    attrs = dict(episode.attrs)
    for key, value in replace.items():
        if key.startswith("attrs_"):
            attrs[key[6:]] = value
        else:
            arrays[key] = value
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None and key != drop:
                f.create_dataset(key, data=value)
        for key, value in attrs.items():
            if key != drop:
                f.attrs[key] = value


def test_round_trip_keeps_every_array_and_attr(tmp_path):
    episode = make_episode()
    path = write_episode(tmp_path / "ep.h5", episode)
    back = read_episode(path)
    np.testing.assert_array_equal(back.images, episode.images)
    np.testing.assert_array_equal(back.actions, episode.actions)
    np.testing.assert_array_equal(back.state, episode.state)
    assert back.attrs == episode.attrs
    assert type(back.attrs["success"]) is bool and type(back.attrs["schema_version"]) is int
    assert back.num_frames == 6 and back.instruction.startswith("go to") and back.image_shape == (6, 32, 32, 3)


def test_optional_per_frame_arrays_round_trip_and_older_files_read_without_them(tmp_path):
    episode = make_episode()
    rng = np.random.default_rng(1)
    episode.extras = {
        "executed": episode.actions + rng.normal(0, 0.1, episode.actions.shape).astype(np.float32),
        "target_bearing": rng.uniform(-3, 3, 6),  # float64: stored as float32
        "target_distance": rng.uniform(0, 5, 6).astype(np.float32),
        "target_in_view": np.array([1, 1, 0, 0, 1, 1], np.float32),
    }
    back = read_episode(write_episode(tmp_path / "ep.h5", episode), load_images=False)
    assert sorted(back.extras) == sorted(episode.extras)
    for key, array in episode.extras.items():
        assert back.extras[key].dtype == np.float32
        np.testing.assert_array_equal(back.extras[key], array.astype(np.float32))
    older = read_episode(write_episode(tmp_path / "old.h5", make_episode()))
    assert older.extras == {}


@pytest.mark.parametrize(
    "key, array, problem",
    [
        ("wheel_speed", np.zeros(6, np.float32), "unknown per-frame array"),
        ("executed", np.zeros((5, 3), np.float32), "shape [5, 3]: expected [6, 3]"),
        ("target_in_view", np.ones(6, bool), "expected float32 [6]"),
        ("target_distance", np.array([1, 2, np.nan, 1, 1, 1], np.float32), "NaN/inf"),
    ],
)
def test_bad_per_frame_arrays_are_named(tmp_path, key, array, problem):
    episode = make_episode()
    episode.extras = {key: array}
    with pytest.raises(DataError, match=r"w\.h5: " + key) as info:
        write_episode(tmp_path / "w.h5", episode)
    assert problem in str(info.value) and not (tmp_path / "w.h5").exists()
    raw_file(tmp_path / "r.h5", make_episode(), **({key: array} if key in ("executed", "target_distance") else {}))
    if key in ("executed", "target_distance"):  # a known key on disk is checked on reading too
        with pytest.raises(DataError, match=f"r\\.h5: {key}: "):
            read_episode(tmp_path / "r.h5")


def test_float64_actions_are_stored_as_float32_and_state_is_optional(tmp_path):
    episode = make_episode(with_state=False)
    episode.actions = episode.actions.astype(np.float64)
    back = read_episode(write_episode(tmp_path / "ep.h5", episode))
    assert back.actions.dtype == np.float32 and back.state is None


def test_images_are_chunked_per_frame_and_compressed(tmp_path):
    for compression in ("gzip", "lzf"):
        path = write_episode(tmp_path / f"{compression}.h5", make_episode(size=64), compression=compression)
        with h5py.File(path) as f:
            assert f["images"].chunks == (1, 64, 64, 3)
            assert f["images"].compression == compression


def test_read_without_images_keeps_shapes_and_frame_reader_reads_ranges(tmp_path):
    episode = make_episode(num_frames=9)
    path = write_episode(tmp_path / "ep.h5", episode)
    light = read_episode(path, load_images=False)
    assert light.images is None and light.image_shape == (9, 32, 32, 3)
    validate_episode(light)  # a header-only episode is still checkable
    reader = FrameReader(max_open=1)
    np.testing.assert_array_equal(reader.read(path, 3, 7), episode.images[3:7])
    other = write_episode(tmp_path / "other.h5", make_episode(seed=1))
    reader.read(other, 0, 1)  # evicts the first handle (max_open=1) and still reads it again
    np.testing.assert_array_equal(reader.read(path, 0, 2), episode.images[:2])
    reader.close()
    assert list_episode_files(tmp_path) == ["ep.h5", "other.h5"]


bad = make_episode()
NAN_ACTIONS = bad.actions.copy()
NAN_ACTIONS[2, 1] = np.nan
INF_STATE = bad.state.copy()
INF_STATE[4, 0] = np.inf

FILE_CASES = [
    # (id, drop, replacements, key named in the message, problem text)
    ("images-missing", "images", {}, "images", "missing"),
    ("actions-missing", "actions", {}, "actions", "missing"),
    ("images-dtype", None, {"images": bad.images.astype(np.float32)}, "images", "expected uint8"),
    ("images-channels", None, {"images": bad.images[..., :2]}, "images", "[T, H, W, 3]"),
    ("images-ndim", None, {"images": bad.images[0]}, "images", "[T, H, W, 3]"),
    ("actions-dtype", None, {"actions": bad.actions.astype(np.float64)}, "actions", "expected float32"),
    ("actions-width", None, {"actions": bad.actions[:, :2]}, "actions", "expected [6, 3]"),
    ("actions-length", None, {"actions": bad.actions[:5]}, "actions", "expected [6, 3]"),
    ("actions-nan", None, {"actions": NAN_ACTIONS}, "actions", "NaN/inf"),
    ("state-dtype", None, {"state": bad.state.astype(np.int32)}, "state", "expected float32"),
    ("state-length", None, {"state": bad.state[:4]}, "state", "expected [6, S]"),
    ("state-inf", None, {"state": INF_STATE}, "state", "NaN/inf"),
    *[
        (f"attr-{name}-missing", name, {}, f"attrs.{name}", "missing")
        for name in ("instruction", "episode_id", "source", "success", "control_hz", "schema_version")
    ],
    ("attr-success-type", None, {"attrs_success": "yes"}, "attrs.success", "expected bool"),
    ("attr-instruction-empty", None, {"attrs_instruction": "  "}, "attrs.instruction", "empty"),
    ("attr-control-hz", None, {"attrs_control_hz": 0.0}, "attrs.control_hz", "positive"),
    ("attr-schema", None, {"attrs_schema_version": 99}, "attrs.schema_version", "reads 1"),
    ("attr-scene-json", None, {"attrs_scene": "{not json"}, "attrs.scene", "not valid JSON"),
    ("attr-scene-object", None, {"attrs_scene": "[1, 2]"}, "attrs.scene", "expected an object"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_every_validation_error_names_file_and_key(tmp_path, case):
    _, drop, replace, key, problem = case
    path = tmp_path / "bad.h5"
    raw_file(path, make_episode(), drop=drop, **replace)
    with pytest.raises(DataError) as info:
        read_episode(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


def test_writer_refuses_invalid_episode_and_leaves_nothing(tmp_path):
    episode = make_episode()
    episode.actions[1, 0] = np.inf
    with pytest.raises(DataError, match=r"bad\.h5: actions: inf at index \[1, 0\]: values must be finite"):
        write_episode(tmp_path / "bad.h5", episode)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="images: missing"):
        write_episode(tmp_path / "x.h5", Episode(None, episode.actions, None, episode.attrs))
    with pytest.raises(DataError, match="attrs.extra: dict"):
        write_episode(
            tmp_path / "x.h5",
            Episode(episode.images, np.zeros((6, 3), np.float32), None, {**episode.attrs, "extra": {"a": 1}}),
        )
    with pytest.raises(DataError, match="compression 'zstd'"):
        write_episode(tmp_path / "x.h5", make_episode(), compression="zstd")
    assert os.listdir(tmp_path) == []


def test_truncated_and_missing_files_are_named(tmp_path):
    path = write_episode(tmp_path / "ep.h5", make_episode(size=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"ep\.h5: (file|images|actions|attrs): .*truncated or corrupt"):
        read_episode(path)
    with pytest.raises(DataError, match=r"nope\.h5: file: not found"):
        read_episode(tmp_path / "nope.h5")


def test_crash_during_write_keeps_the_previous_version(tmp_path, monkeypatch):
    path = write_episode(tmp_path / "ep.h5", make_episode(seed=1))

    def crash(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_episode(path, make_episode(seed=2))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ep.h5"]  # no temp file left behind
    assert read_episode(path).attrs["episode_id"] == "ep-1"
