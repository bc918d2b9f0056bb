"""The Ray Data pipeline: the same windows as the torch Dataset, streamed to a real Ray Train worker."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.train.pipeline import build_window_dataset
from mobile_vla.train.windows import WindowDataset

W, K = 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mobile_vla.policy import presets
    from mobile_vla.policy.text import build_tokenizer

    folder = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    names = []
    for i, num_frames in enumerate((9, 6, 3)):
        actions = rng.uniform(-1, 1, (num_frames, 3)).astype(np.float32)
        write_episode(
            folder / f"ep{i}.h5",
            Episode(
                images=rng.integers(0, 256, (num_frames, 224, 224, 3), dtype=np.uint8),
                actions=actions,
                state=np.vstack([np.zeros((1, 3), np.float32), actions[:-1]]),
                attrs={
                    "instruction": ["go to the red box", "go to the green key"][i % 2],
                    "episode_id": f"ep{i}",
                    "source": "test",
                    "success": True,
                    "control_hz": 5.0,
                    "schema_version": SCHEMA_VERSION,
                },
            ),
        )
        names.append(f"ep{i}.h5")
    manifest = build_manifest(folder, {"train": names}, {"kind": "test"})
    pre = Preprocessing.from_manifest(manifest, build_tokenizer(presets.tiny()), window=W, chunk=K)
    return folder, pre


def test_ray_windows_equal_torch_dataset_windows_with_augmentation(ray_cluster, dataset):
    folder, pre = dataset
    reference = WindowDataset(folder, "train", pre, augment=True, seed=5)
    ds = build_window_dataset(folder, "train", pre, augment=True, seed=5, windows_per_task=2)
    rows = 0
    seen = set()
    for batch in ds.iter_batches(batch_size=3, batch_format="numpy"):
        assert batch["images"].shape[1:] == (W, 224, 224, 3) and batch["images"].dtype == np.uint8
        for b, window_id in enumerate(batch["window_id"]):
            expected = reference[int(window_id)]
            for key, value in expected.items():
                np.testing.assert_array_equal(batch[key][b], value, err_msg=f"{key} of window {window_id}")
            seen.add(int(window_id))
        rows += len(batch["window_id"])
    # ep0: 9 frames -> starts 0, 2, 4, 5; ep1: 6 -> 0, 2; ep2: 3 -> 0 (padded)
    assert rows == len(reference) == 7 and seen == set(range(7))


def test_shuffle_is_seeded_and_evaluation_order_is_stable(ray_cluster, dataset):
    folder, pre = dataset

    def order(**kwargs):
        ds = build_window_dataset(folder, "train", pre, **kwargs)
        return [int(i) for b in ds.iter_batches(batch_size=None) for i in b["window_id"]]

    assert order(augment=False) == list(range(7))
    shuffled = order(augment=False, shuffle=True, seed=1)
    assert sorted(shuffled) == list(range(7)) and shuffled != list(range(7))


@pytest.mark.slow  # a real Ray Train run (worker group start-up): half a minute on a loaded 2-core box
def test_ray_train_worker_reads_its_dataset_shard(ray_cluster, dataset, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder, pre = dataset

    def train_loop_per_worker(config):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        windows, frames = 0, 0.0
        for batch in shard.iter_torch_batches(batch_size=2):
            assert tuple(batch["images"].shape[1:]) == (W, 224, 224, 3)
            assert tuple(batch["actions"].shape[1:]) == (W, K, 3)
            windows += len(batch["images"])
            frames += float(batch["frame_mask"].sum())
        return {"windows": windows, "frames": frames}  # rank 0's value becomes result.return_value

    trainer = TorchTrainer(
        train_loop_per_worker,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        datasets={"train": build_window_dataset(folder, "train", pre, augment=True)},
        run_config=RunConfig(name="pipeline-shard", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    # 7 windows; real frames: ep0 4 windows x 4, ep1 2 x 4, ep2 3 (1 padding frame)
    assert result.error is None and result.return_value == {"windows": 7, "frames": 27.0}
