"""manifest.json: statistics from the train split only, counts, atomic write, clear load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import MANIFEST_NAME, build_manifest, load_manifest, split_names
from mobile_vla.errors import DataError


def episode(actions: np.ndarray, control_hz: float = 5.0, with_state: bool = True, name: str = "e") -> Episode:
    actions = np.asarray(actions, np.float32)
    state = np.vstack([np.zeros((1, 3), np.float32), actions[:-1]]) if with_state else None
    return Episode(
        images=np.zeros((len(actions), 8, 8, 3), np.uint8),
        actions=actions,
        state=state,
        attrs={
            "instruction": f"go to the {name}",
            "episode_id": name,
            "source": "test",
            "success": name != "v",
            "control_hz": control_hz,
            "schema_version": SCHEMA_VERSION,
        },
    )


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.uniform(-0.5, 0.5, (n, 3)) for n in (40, 60)]
    for i, actions in enumerate(train):
        write_episode(tmp_path / f"t{i}.h5", episode(actions, name=f"t{i}"))
    write_episode(tmp_path / "v.h5", episode(np.full((7, 3), 50.0), name="v"))  # outlier: val only
    return tmp_path, np.concatenate(train)


def test_stats_come_from_train_split_only(dataset):
    folder, train_actions = dataset
    manifest = build_manifest(
        folder,
        {"train": ["t0.h5", "t1.h5"], "val": ["v.h5"]},
        {"kind": "test", "seed": 3},
        expert_success={"train": 0.95},
    )
    stats = manifest["stats"]["actions"]
    np.testing.assert_allclose(stats["mean"], train_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["q01"], np.quantile(train_actions, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["q99"], np.quantile(train_actions, 0.99, axis=0), rtol=1e-5)
    assert max(stats["max"]) < 1  # the val outlier (50.0) did not leak in
    assert manifest["stats"]["computed_on"] == ["train"]
    assert len(manifest["stats"]["state"]["std"]) == 3 and manifest["state_dim"] == 3
    assert manifest["counts"]["train"] == {"episodes": 2, "frames": 100}
    assert manifest["counts"]["val"] == {"episodes": 1, "frames": 7}
    assert manifest["counts"]["total"] == {"episodes": 3, "frames": 107}
    assert manifest["episodes"]["v.h5"] == {
        "split": "val",
        "frames": 7,
        "instruction": "go to the v",
        "success": False,
        "source": "test",
    }
    assert manifest["control_hz"] == 5.0 and manifest["image_sizes"] == [[8, 8]]
    assert manifest["generator"] == {"kind": "test", "seed": 3} and manifest["expert_success"] == {"train": 0.95}
    assert load_manifest(folder) == json.loads((folder / MANIFEST_NAME).read_text()) == manifest
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_without_train_split_stats_use_all_splits(dataset):
    folder, _ = dataset
    manifest = build_manifest(folder, {"feedback": ["t0.h5", "v.h5"]}, {"kind": "feedback"})
    assert manifest["stats"]["computed_on"] == ["feedback"] and max(manifest["stats"]["actions"]["max"]) == 50.0


def test_frame_keys_name_the_optional_arrays_every_episode_has(dataset):
    folder, _ = dataset
    assert build_manifest(folder, {"train": ["t0.h5", "t1.h5"]}, {"kind": "test"})["frame_keys"] == []
    for i, keys in enumerate((["executed", "target_distance"], ["target_distance"])):
        labelled = episode(np.zeros((5, 3)), name=f"x{i}")
        labelled.extras = {key: np.zeros((5, 3) if key == "executed" else 5, np.float32) for key in keys}
        write_episode(folder / f"x{i}.h5", labelled)
    assert build_manifest(folder, {"train": ["x0.h5"]}, {"kind": "test"})["frame_keys"] == [
        "executed",
        "target_distance",
    ]
    both = build_manifest(folder, {"train": ["x0.h5"], "val": ["x1.h5"]}, {"kind": "test"})
    assert both["frame_keys"] == ["target_distance"]  # only what every episode holds


def test_build_errors_name_the_file(dataset, tmp_path):
    folder, _ = dataset
    with pytest.raises(DataError, match=r"missing\.h5: file: not found"):
        build_manifest(folder, {"train": ["t0.h5", "missing.h5"]}, {})
    with pytest.raises(DataError, match=r"t0\.h5: listed in split 'train' and 'val'"):
        build_manifest(folder, {"train": ["t0.h5"], "val": ["t0.h5"]}, {})
    write_episode(folder / "fast.h5", episode(np.zeros((5, 3)), control_hz=10.0, name="fast"))
    with pytest.raises(DataError, match=r"disagree on control_hz \(5.0 in t0.h5, 10.0 in fast.h5\)"):
        build_manifest(folder, {"train": ["t0.h5", "fast.h5"]}, {})
    write_episode(folder / "nostate.h5", episode(np.zeros((5, 3)), with_state=False, name="n"))
    with pytest.raises(DataError, match="disagree on state dim"):
        build_manifest(folder, {"train": ["t0.h5", "nostate.h5"]}, {})
    with pytest.raises(DataError, match="no episodes listed"):
        build_manifest(folder, {"train": []}, {})
    assert not (folder / MANIFEST_NAME).exists()  # failed builds write nothing


def test_load_errors(dataset, tmp_path):
    folder, _ = dataset
    with pytest.raises(
        DataError, match=r"no manifest\.json - is this a dataset folder\? generate one with `mobile-vla data generate`"
    ):
        load_manifest(folder)
    with pytest.raises(DataError, match="not a folder"):
        load_manifest(tmp_path / "absent")
    (folder / MANIFEST_NAME).write_text("{oops")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        load_manifest(folder)
    (folder / MANIFEST_NAME).write_text('["t0.h5"]')
    with pytest.raises(DataError, match=r"manifest\.json: expected a JSON object, got list"):
        load_manifest(folder)
    manifest = build_manifest(folder, {"train": ["t0.h5"]}, {})
    broken = {k: v for k, v in manifest.items() if k != "stats"}
    (folder / MANIFEST_NAME).write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"manifest\.json: stats: Field required"):
        load_manifest(folder)
    manifest["stats"]["actions"]["q99"] = [1.0, 2.0]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"stats\.actions\.q99: 2 values, expected 3"):
        load_manifest(folder)
    manifest["stats"]["actions"]["q99"] = [1.0, 2.0, 3.0]
    manifest["feedback"] = {"robots": 3}  # later sections are kept, not refused
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert load_manifest(folder)["feedback"] == {"robots": 3}


def test_split_names_is_deterministic_and_complete():
    names = [f"ep{i:03d}.h5" for i in range(50)]
    splits = split_names(names, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=7)
    assert splits == split_names(list(reversed(names)), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=7)
    assert [len(v) for v in splits.values()] == [40, 5, 5]
    assert sorted(sum(splits.values(), [])) == names
    assert [len(v) for v in split_names(names[:3], {"train": 0.95, "val": 0.05}).values()] == [2, 1]
    with pytest.raises(DataError, match="split fractions"):
        split_names(names, {"train": -1.0})
