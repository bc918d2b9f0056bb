"""`data merge`: the union of datasets (aggregated DAgger), splits, links or copies, refusals that leave nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import MANIFEST_NAME, build_manifest, load_manifest
from mobile_vla.data.merge import merge_datasets
from mobile_vla.errors import DataError

SPEC = {"splits": {"train": {"fraction": 0.8}, "val": {"fraction": 0.2}}, "held_out": [["red", "box"]]}


def q(path) -> str:
    """The resolved path as a regex that matches it literally."""
    return re.escape(str(path.resolve()))


def episode(frames: int, value: float, control_hz: float = 5.0, state_dim: int = 3) -> Episode:
    actions = np.full((frames, 3), value, np.float32)
    return Episode(
        images=np.zeros((frames, 8, 8, 3), np.uint8),
        actions=actions,
        state=np.zeros((frames, state_dim), np.float32),
        attrs={
            "instruction": "go to the box",
            "episode_id": f"e{value}",
            "source": "test",
            "success": True,
            "control_hz": control_hz,
            "schema_version": SCHEMA_VERSION,
        },
    )


def make_dataset(folder, splits: dict[str, list[tuple[str, int]]], generator: dict, **episode_kwargs):
    """A tiny dataset: splits {"train": [(file name, frames), ...], ...}, manifest with `generator`."""
    folder.mkdir(parents=True)
    for i, (name, frames) in enumerate(pair for pairs in splits.values() for pair in pairs):
        write_episode(folder / name, episode(frames, 0.1 * i, **episode_kwargs))
    build_manifest(folder, {s: [n for n, _ in pairs] for s, pairs in splits.items()}, generator)
    return folder


@pytest.fixture()
def sources(tmp_path):
    nav = make_dataset(
        tmp_path / "nav",
        {"train": [("train_000.h5", 4), ("train_001.h5", 6)], "val": [("val_000.h5", 5)]},
        {"kind": "miniworld", "seed": 0, "split_spec": SPEC},
    )
    feedback = make_dataset(
        tmp_path / "feedback",
        {"train": [("fb_a.h5", 3)], "val": [("fb_b.h5", 2)]},
        {"kind": "feedback", "root": "/somewhere"},
    )
    return nav, feedback


def test_train_only_source_goes_to_train_and_the_rest_keeps_its_split(sources, tmp_path):
    nav, feedback = sources
    out = tmp_path / "agg"
    manifest = merge_datasets(out, [nav], train_only=[feedback])
    assert manifest["splits"] == {
        "train": ["train_000.h5", "train_001.h5", "fb_a.h5", "fb_b.h5"],
        "val": ["val_000.h5"],  # the clean val split
    }
    assert manifest["counts"]["train"] == {"episodes": 4, "frames": 15}
    assert manifest["counts"]["total"] == {"episodes": 5, "frames": 20}
    assert manifest["generator"] == {
        "kind": "merged",
        "sources": [
            {"path": str(nav.resolve()), "kind": "miniworld", "episodes": 3, "train_only": False},
            {"path": str(feedback.resolve()), "kind": "feedback", "episodes": 2, "train_only": True},
        ],
        "split_spec": SPEC,  # closed loop holds out the generated source's scenes
    }
    assert load_manifest(out) == manifest
    for name in manifest["episodes"]:
        link = out / name
        assert link.is_symlink() and link.readlink().is_absolute()
        assert link.resolve() in {(nav / name).resolve(), (feedback / name).resolve()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_without_train_only_every_episode_keeps_its_split_and_copy_makes_real_files(sources, tmp_path):
    nav, feedback = sources
    out = tmp_path / "agg"
    out.mkdir()  # an empty --out is fine
    manifest = merge_datasets(out, [nav, feedback, nav], copy=True)  # a source named twice counts once
    assert manifest["splits"]["val"] == ["val_000.h5", "fb_b.h5"]
    assert manifest["counts"]["total"]["episodes"] == 5
    for name in manifest["episodes"]:
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert (out / "fb_a.h5").read_bytes() == (feedback / "fb_a.h5").read_bytes()


def test_conflicts_are_refused_naming_both_and_leave_no_out_folder(sources, tmp_path):
    nav, feedback = sources
    out = tmp_path / "agg"
    other_spec = make_dataset(
        tmp_path / "nav2", {"train": [("x.h5", 3)]}, {"kind": "miniworld", "split_spec": {**SPEC, "held_out": []}}
    )
    with pytest.raises(DataError, match=rf"sources {q(nav)} and {q(other_spec)} .*different split specs"):
        merge_datasets(out, [nav, other_spec])
    same_name = make_dataset(tmp_path / "again", {"train": [("fb_a.h5", 3)]}, {"kind": "feedback"})
    with pytest.raises(DataError, match=rf"fb_a\.h5 is in both {q(feedback)} and {q(same_name)}"):
        merge_datasets(out, [nav, feedback], train_only=[same_name])
    fast = make_dataset(tmp_path / "fast", {"train": [("f.h5", 3)]}, {"kind": "x"}, control_hz=10.0)
    with pytest.raises(DataError, match=rf"control_hz: 5\.0 in {q(nav)}, 10\.0 in {q(fast)}"):
        merge_datasets(out, [nav, fast])
    wide = make_dataset(tmp_path / "wide", {"train": [("w.h5", 3)]}, {"kind": "x"}, state_dim=4)
    with pytest.raises(DataError, match=r"state_dim: 3 in .*, 4 in "):
        merge_datasets(out, [nav, wide])
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'plain'))}: no manifest\.json"):
        (tmp_path / "plain").mkdir()
        merge_datasets(out, [nav, tmp_path / "plain"])
    with pytest.raises(DataError, match="nothing to merge"):
        merge_datasets(out, [])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=rf"--out {re.escape(str(out))}: exists and is not an empty folder"):
        merge_datasets(out, [nav])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_bad_episode_removes_the_half_built_folder(sources, tmp_path):
    nav, feedback = sources
    (feedback / "fb_b.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"fb_b\.h5: file: not a readable HDF5 file"):
        merge_datasets(tmp_path / "agg", [nav, feedback])
    assert not (tmp_path / "agg").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_cli_merges_and_inspect_reads_the_result(sources, tmp_path, capsys):
    nav, feedback = sources
    out = tmp_path / "agg"
    argv = ["data", "merge", "--out", str(out), str(nav), "--train-only", str(feedback)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train:    4 episodes, 15 frames" in printed and "val:    1 episodes, 5 frames" in printed
    assert f"wrote 5 episodes (linked), 20 frames, from 2 sources to {out}" in printed
    assert main(["data", "inspect", "--json", "--check", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["episodes"] == 4 and summary["problems"] == []
    assert summary["generator"]["kind"] == "merged"
    assert main(argv) == 2  # --out now exists: a one-line error, exit 2
    assert f"--out {out}: exists and is not an empty folder" in capsys.readouterr().err
    assert (out / MANIFEST_NAME).is_file()
