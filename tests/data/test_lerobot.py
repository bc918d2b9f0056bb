"""`data export --format lerobot` and `data import --format lerobot`: the LeRobotDataset v3 layout, a
lossless round trip, a foreign set, and bad inputs named by file, field and value.

Frames travel as PNG image features, so the round trip is exact: the tolerance on frames is 0.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mobile_vla.cli import main
from mobile_vla.data.episodes import Episode, read_episode, write_episode
from mobile_vla.data.lerobot import export_lerobot, import_lerobot
from mobile_vla.data.manifest import build_manifest, load_manifest
from mobile_vla.errors import DataError
from tests.data.test_episodes import make_episode

SPLITS = {"train": ["train_000000.h5", "train_000001.h5"], "val": ["val_000000.h5"], "test_unseen": ["tu_0.h5"]}


def platform_dataset(folder, size: int = 224) -> dict[str, Episode]:
    """Four tiny episodes in three splits, with every optional per-frame array, scene and extra attrs."""
    folder.mkdir(parents=True)
    episodes = {}
    for seed, name in enumerate(n for names in SPLITS.values() for n in names):
        episode = make_episode(num_frames=3 + seed, size=size, seed=seed)
        num_frames = episode.num_frames
        rng = np.random.default_rng(100 + seed)
        episode.extras = {
            "executed": rng.normal(size=(num_frames, 3)).astype(np.float32),
            "measured_velocity": rng.normal(size=(num_frames, 3)).astype(np.float32),
            "target_bearing": rng.uniform(-3, 3, num_frames).astype(np.float32),
            "target_distance": rng.uniform(0, 5, num_frames).astype(np.float32),
            "target_in_view": (rng.uniform(size=num_frames) > 0.5).astype(np.float32),
        }
        episode.attrs.update(success=seed != 2, noise_seed=1000 + seed, action_noise=0.2)
        if seed == 3:
            episode.attrs["instruction"] = "go to the blue ball"
        write_episode(folder / name, episode)
        episodes[name] = episode
    generator = {"kind": "miniworld", "resize_rule": "letterbox", "split_spec": {"seed": 7}}
    build_manifest(folder, SPLITS, generator, expert_success={"train": {"kept": 2, "attempted": 3}})
    return episodes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot")
    episodes = platform_dataset(root / "nav")
    assert main(["data", "export", "--format", "lerobot", str(root / "nav"), str(root / "nav_lerobot")]) == 0
    return root, episodes


def test_export_writes_the_v3_layout(exported):
    root, episodes = exported
    out = root / "nav_lerobot"
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 5 and info["video_path"] is None
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (4, 3 + 4 + 5 + 6, 2)
    assert info["chunks_size"] == 1000 and info["data_files_size_in_mb"] == 100
    assert info["splits"] == {"train": "0:2", "val": "2:3", "test_unseen": "3:4"}
    features = info["features"]
    assert features["action"] == {"dtype": "float32", "shape": [3], "names": ["linear_x", "linear_y", "angular_z"]}
    assert features["observation.images.front"]["dtype"] == "image"
    assert features["observation.images.front"]["shape"] == [224, 224, 3]
    assert features["observation.state"]["shape"] == [3] and features["mobile_vla.target_bearing"]["shape"] == [1]

    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert set(data.column_names) == set(features)
    assert data.column("index").to_pylist() == list(range(18))
    assert data.column("frame_index").to_pylist()[:7] == [0, 1, 2, 0, 1, 2, 3]
    assert data.column("timestamp").to_pylist()[:3] == pytest.approx([0.0, 0.2, 0.4])
    assert pq.ParquetFile(out / "data/chunk-000/file-000.parquet").num_row_groups == 4  # one per episode
    tasks = pq.read_table(out / "meta/tasks.parquet").to_pandas()
    assert tasks.index.name == "task" and tasks.loc["go to the blue ball", "task_index"] == 1
    meta = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [(m["dataset_from_index"], m["dataset_to_index"], m["length"]) for m in meta][-1] == (12, 18, 6)
    assert meta[2]["mobile_vla/split"] == "val" and meta[2]["tasks"] == [episodes["val_000000.h5"].instruction]
    assert json.loads(meta[0]["mobile_vla/attrs"])["scene"] == episodes["train_000000.h5"].attrs["scene"]
    last = episodes["tu_0.h5"]  # per-episode statistics, as LeRobot's episode metadata holds them
    np.testing.assert_allclose(meta[3]["stats/action/max"], last.actions.max(axis=0), rtol=1e-6)
    assert meta[3]["stats/index/min"] == [12] and meta[3]["stats/observation.images.front/count"] == [6]
    assert np.asarray(meta[3]["stats/observation.images.front/mean"]).shape == (3, 1, 1)
    stats = json.loads((out / "meta/stats.json").read_text())
    all_actions = np.concatenate([e.actions for e in episodes.values()])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(axis=0), rtol=1e-5)
    assert np.asarray(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_export_then_import_is_lossless(exported, capsys):
    root, episodes = exported
    dst = root / "back"
    assert main(["data", "import", "--format", "lerobot", str(root / "nav_lerobot"), str(dst)]) == 0
    assert "imported 4 episodes (18 frames, camera observation.images.front" in capsys.readouterr().out
    for name, original in episodes.items():
        back = read_episode(dst / name)
        np.testing.assert_array_equal(back.images, original.images)  # PNG: tolerance 0
        np.testing.assert_array_equal(back.actions, original.actions)
        np.testing.assert_array_equal(back.state, original.state)
        assert back.extras.keys() == original.extras.keys()
        for key, array in original.extras.items():
            np.testing.assert_array_equal(back.extras[key], array)
        assert back.attrs == original.attrs  # instruction, scene (seed), success, provenance
    source, manifest = load_manifest(root / "nav"), load_manifest(dst)
    assert manifest["splits"] == source["splits"] and manifest["stats"] == source["stats"]
    assert manifest["frame_keys"] == source["frame_keys"] and manifest["expert_success"] == source["expert_success"]
    generator = dict(manifest["generator"])
    assert generator.pop("imported_from")["splits_from"] == "exported"
    assert generator == source["generator"]


def test_large_sets_roll_over_data_files_and_still_import(exported, tmp_path):
    root, episodes = exported
    report = export_lerobot(root / "nav", tmp_path / "small_files", data_files_size_in_mb=1e-6, progress=False)
    assert report.data_files == [f"data/chunk-000/file-00{i}.parquet" for i in range(4)]
    meta = pq.read_table(tmp_path / "small_files/meta/episodes/chunk-000/file-000.parquet")
    assert meta.column("data/file_index").to_pylist() == [0, 1, 2, 3]
    back = import_lerobot(tmp_path / "small_files", tmp_path / "back", progress=False)
    assert sorted(back.imported) == sorted(episodes)
    np.testing.assert_array_equal(read_episode(tmp_path / "back/tu_0.h5").images, episodes["tu_0.h5"].images)


def foreign_set(root, size=(48, 64), fps=10) -> None:
    """A LeRobot v3 set as another tool writes it: no state, no platform columns, 48x64 PNG frames."""
    from PIL import Image

    episodes = [(0, 4, 0), (1, 3, 1), (2, 5, 0)]  # (episode_index, length, task_index)
    rows, meta, start = [], [], 0
    rng = np.random.default_rng(0)
    for index, length, task in episodes:
        for t in range(length):
            image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            rows.append(
                {
                    "observation.image": {"bytes": buffer.getvalue(), "path": f"frame-{t:06d}.png"},
                    "action": [0.1 * t, -0.1, 0.05 * index],
                    "timestamp": t / fps,
                    "frame_index": t,
                    "episode_index": index,
                    "index": start + t,
                    "task_index": task,
                }
            )
        meta.append({"episode_index": index, "tasks": [f"task {task}"], "length": length})
        start += length
    (root / "data/chunk-000").mkdir(parents=True)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data/chunk-000/file-000.parquet")
    pq.write_table(pa.Table.from_pylist(meta), root / "meta/episodes/chunk-000/file-000.parquet")
    tasks = pa.table({"task_index": [0, 1], "task": ["go to the door", "go to the red box"]})
    pq.write_table(tasks, root / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "fps": fps,
        "features": {
            "observation.image": {"dtype": "image", "shape": [*size, 3], "names": ["height", "width", "channels"]},
            "action": {"dtype": "float32", "shape": [3], "names": None},
            **{k: {"dtype": "int64", "shape": [1]} for k in ("frame_index", "episode_index", "index", "task_index")},
            "timestamp": {"dtype": "float32", "shape": [1]},
        },
        "splits": {"train": "0:3"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
    }
    (root / "meta/info.json").write_text(json.dumps(info))


def test_a_foreign_set_is_resized_given_state_and_split(tmp_path, capsys):
    foreign_set(tmp_path / "foreign")
    args = ["data", "import", "--format", "lerobot", str(tmp_path / "foreign"), str(tmp_path / "out")]
    assert main([*args, "--val-fraction", "0.34"]) == 0
    out = capsys.readouterr().out
    assert "resized frames of 48x64 to 224x224 (letterbox)" in out and "state previous command" in out
    manifest = load_manifest(tmp_path / "out")
    assert manifest["control_hz"] == 10.0 and manifest["counts"]["val"]["episodes"] == 1
    assert manifest["generator"]["format"] == "lerobot" and manifest["generator"]["resized_from"] == ["48x64"]
    episode = read_episode(tmp_path / "out/episode_000001.h5")
    assert episode.images.shape == (3, 224, 224, 3) and episode.instruction == "go to the red box"
    np.testing.assert_allclose(episode.actions[:, 0], [0.0, 0.1, 0.2], atol=1e-6)
    np.testing.assert_array_equal(episode.state[1:], episode.actions[:-1])  # previous command
    assert episode.attrs["source"] == "lerobot" and episode.attrs["lerobot.episode_index"] == 1


def _edit_info(root, edit):
    """Applies edit(info) to meta/info.json."""
    info = json.loads((root / "meta/info.json").read_text())
    edit(info)
    (root / "meta/info.json").write_text(json.dumps(info))


def _edit_data(root, column, row, value):
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), path)


BAD = {
    "no info": (lambda r: (r / "meta/info.json").unlink(), "meta/info.json: missing - is this a LeRobotDataset v3"),
    "info not json": (lambda r: (r / "meta/info.json").write_text("{oops"), "meta/info.json: not valid JSON ("),
    "info a list": (
        lambda r: (r / "meta/info.json").write_text("[1, 2]"),
        "meta/info.json: expected a JSON object, got list",
    ),
    "v2.1": (
        lambda r: _edit_info(r, lambda i: i.update(codebase_version="v2.1")),
        "codebase_version 'v2.1': this importer reads 'v3.0'",
    ),
    "action dim": (
        lambda r: _edit_info(r, lambda i: i["features"]["action"].update(shape=[7])),
        "info.json: features.action.shape [7]: expected [3] (linear_x, linear_y, angular_z",
    ),
    "video camera": (
        lambda r: _edit_info(r, lambda i: i["features"]["observation.image"].update(dtype="video")),
        "features.observation.image: dtype 'video' (mp4 under videos/): decoding it needs a video library (PyAV)",
    ),
    "fps": (lambda r: _edit_info(r, lambda i: i.update(fps=0)), "meta/info.json: fps 0: expected a positive number"),
    "nan action": (
        lambda r: _edit_data(r, "action", 5, [0.0, float("nan"), 0.0]),
        "file-000.parquet: action: nan at row 1: values must be finite",
    ),
    "frame gap": (lambda r: _edit_data(r, "frame_index", 2, 7), "episode 0: frame_index: [0, 1, 3, 7]"),
    "no tasks": (lambda r: (r / "meta/tasks.parquet").unlink(), "meta/tasks.parquet: missing"),
    "bad image": (
        lambda r: _edit_data(r, "observation.image", 0, {"bytes": b"not a png", "path": None}),
        "observation.image: row 0: not a decodable image",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sets_are_refused_naming_file_field_and_value(case, tmp_path):
    damage, message = BAD[case]
    foreign_set(tmp_path / "set")
    damage(tmp_path / "set")
    with pytest.raises(DataError) as error:
        import_lerobot(tmp_path / "set", tmp_path / "out", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-imported is left behind


def test_cli_errors_are_one_line_and_export_refuses_a_non_empty_target(exported, tmp_path, capsys):
    root, _ = exported
    assert main(["data", "import", "--format", "lerobot", str(root / "nav"), str(tmp_path / "x")]) == 2
    assert "meta/info.json: missing" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    assert main(["data", "export", "--format", "lerobot", str(root / "nav"), str(tmp_path / "full")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    # without --format, `data import` reads the original collector's files, as before
    assert main(["data", "import", str(root / "nav_lerobot"), str(tmp_path / "y")]) == 2
    assert "no .h5/.hdf5 files to import" in capsys.readouterr().err
    assert (tmp_path / "full/keep.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "full")
