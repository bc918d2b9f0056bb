"""`data import --format minuum-h5` on files in the original collector's format, and `data inspect`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import h5py
import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.data.episodes import read_episode
from mobile_vla.data.importer import instruction_from_scenario
from mobile_vla.data.manifest import load_manifest

PAD = (123, 117, 104)


def collector_file(
    path,
    num_frames: int = 5,
    seed: int = 0,
    name: str | None = None,
    duration: float = 5.0,
    declared_frames: int | None = None,
) -> np.ndarray:
    """A file as mobile_vla_data_collector.py wrote it: 720x1280 frames, gzip, string event types."""
    rng = np.random.default_rng(seed)
    images = np.zeros((num_frames, 720, 1280, 3), np.uint8)
    images[:, :, :200] = (200, 30, 30)  # a red obstacle at the left edge of the view
    actions = rng.choice([0.0, 1.15, -1.15], (num_frames, 3)).astype(np.float32)
    actions[0] = 0
    events = ["episode_start"] + ["start_action"] * (num_frames - 1)
    with h5py.File(path, "w") as f:
        f.attrs["episode_name"] = name or path.stem
        f.attrs["total_duration"] = duration
        f.attrs["num_frames"] = num_frames if declared_frames is None else declared_frames
        f.attrs["action_chunk_size"] = 8
        f.attrs["obstacle_layout_type"] = "hori"
        f.create_dataset("images", data=images, compression="gzip")
        f.create_dataset("actions", data=actions, compression="gzip")
        f.create_dataset("action_event_types", data=np.array(events, dtype=h5py.string_dtype("utf-8")))
    return actions


@pytest.mark.parametrize(
    "name, instruction",
    [
        ("episode_20250808_123136_1box_vert_left", "navigate to the target avoiding the box on the left"),
        ("1box_left", "navigate to the target avoiding the box on the left"),
        ("episode_20250901_2box_hori_right_core", "navigate to the target avoiding the two boxes on the right"),
        ("episode_20250901_straight", None),
    ],
)
def test_instruction_from_scenario(name, instruction):
    assert instruction_from_scenario(name) == instruction


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    dst = tmp_path_factory.mktemp("out") / "robot"
    sub = src / "day2"
    sub.mkdir()
    actions = {
        "episode_20250808_123136_1box_vert_left": collector_file(
            src / "episode_20250808_123136_1box_vert_left.h5", seed=1
        ),
        "episode_20250809_2box_hori_right": collector_file(
            sub / "episode_20250809_2box_hori_right.h5", seed=2, duration=2.5
        ),
        "run_007": collector_file(src / "run_007.h5", seed=3, duration=2.0),
    }
    (src / "dataset_index.csv").write_text("file,instruction\nrun_007.h5,go to the bottle behind the chair\n")
    collector_file(src / "episode_20250810_1box_hori_left.h5", seed=4)
    data = (src / "episode_20250810_1box_hori_left.h5").read_bytes()
    (src / "episode_20250810_1box_hori_left.h5").write_bytes(data[: len(data) * 2 // 3])  # truncated copy
    collector_file(src / "episode_20250811_1box_vert_right.h5", seed=5, declared_frames=18)  # cut short
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["data", "import", "--format", "minuum-h5", str(src), str(dst), "--val-fraction", "0.34"])
    return src, dst, actions, code, printed.getvalue()


def test_import_converts_good_files_and_names_the_bad_ones(imported):
    src, dst, actions, code, out = imported
    assert code == 1  # finished, with skipped files
    assert "skipped" in out and "episode_20250810_1box_hori_left.h5: file: not a readable HDF5 file" in out
    assert "episode_20250811_1box_vert_right.h5: attrs.num_frames: 18 but images holds 5 frames" in out
    assert "imported 3 episodes (15 frames, 2.0 Hz)" in out and "skipped 2" in out

    manifest = load_manifest(dst)
    assert manifest["counts"]["total"] == {"episodes": 3, "frames": 15}
    assert manifest["counts"]["train"]["episodes"] == 2 and manifest["counts"]["val"]["episodes"] == 1
    assert manifest["generator"]["format"] == "minuum-h5" and len(manifest["generator"]["skipped"]) == 2
    assert manifest["control_hz"] == 2.0  # median of 5/5.0, 5/2.5, 5/2.0
    assert sorted(p.name for p in dst.iterdir()) == sorted([f"{n}.h5" for n in actions] + ["manifest.json"])

    first = read_episode(dst / "episode_20250808_123136_1box_vert_left.h5")
    assert first.images.shape == (5, 224, 224, 3)
    assert (first.images[:, :49] == PAD).all() and (first.images[:, -49:] == PAD).all()  # letterbox bars
    assert (first.images[:, 100, 5] == (200, 30, 30)).all()  # the obstacle at the left edge is kept
    np.testing.assert_array_equal(first.actions, actions["episode_20250808_123136_1box_vert_left"])
    np.testing.assert_array_equal(first.state[0], [0, 0, 0])
    np.testing.assert_array_equal(first.state[1:], first.actions[:-1])  # state = previous command
    assert first.instruction == "navigate to the target avoiding the box on the left"
    assert first.attrs["source"] == "minuum-h5" and first.attrs["minuum.obstacle_layout_type"] == "hori"
    assert json.loads(first.attrs["action_event_types"])[:2] == ["episode_start", "start_action"]
    assert first.attrs["original_frame_size"] == "720x1280" and first.attrs["resize_rule"] == "letterbox"
    assert read_episode(dst / "run_007.h5").instruction == "go to the bottle behind the chair"  # from the CSV
    assert read_episode(dst / "episode_20250809_2box_hori_right.h5").instruction.endswith("two boxes on the right")


def test_inspect_prints_counts_splits_and_stats(imported, capsys):
    _, dst, *_ = imported
    assert main(["data", "inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    for text in ("train", "val", "linear_x", "angular_z", "q99", "minuum-h5"):
        assert text in out
    assert main(["data", "inspect", str(dst), "--json", "--check"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == {"episodes": 3, "frames": 15} and summary["problems"] == []
    assert summary["splits"]["train"]["success_rate"] == 1.0 and summary["state_dim"] == 3


def test_inspect_check_reports_a_damaged_episode(imported, tmp_path, capsys):
    _, dst, *_ = imported
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feedback"] = {"robots": 2, "interventions": 5}  # a later data kind's own section
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "inspect", str(copy)]) == 0
    assert 'feedback: {"interventions": 5, "robots": 2}' in capsys.readouterr().out
    victim = copy / "run_007.h5"
    victim.write_bytes(victim.read_bytes()[:4000])
    assert main(["data", "inspect", str(copy), "--check"]) == 1
    assert "run_007.h5: file: not a readable HDF5 file" in capsys.readouterr().out


def test_import_refuses_existing_dataset_and_empty_source(imported, tmp_path, capsys):
    src, dst, *_ = imported
    assert main(["data", "import", "--format", "minuum-h5", str(src), str(dst)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["data", "import", "--format", "minuum-h5", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "no .h5/.hdf5 files to import" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no manifest.json - is this a dataset folder?" in capsys.readouterr().err
