"""Windows: placement, chunk targets and masks at episode borders, the torch Dataset, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest, load_manifest
from mobile_vla.errors import DataError
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.train.windows import (
    AugmentConfig,
    WindowDataset,
    assemble_window,
    augment_frames,
    count_windows,
    window_starts,
)

W, K = 4, 3


@pytest.fixture(scope="module")
def tokenizer():
    from mobile_vla.policy import presets
    from mobile_vla.policy.text import build_tokenizer

    return build_tokenizer(presets.tiny())


def write(folder, name: str, num_frames: int, instruction: str, size: int = 224) -> Episode:
    rng = np.random.default_rng(num_frames)
    actions = rng.uniform(-1, 1, (num_frames, 3)).astype(np.float32)
    episode = Episode(
        images=rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8),
        actions=actions,
        state=np.vstack([np.zeros((1, 3), np.float32), actions[:-1]]),  # previous command
        attrs={
            "instruction": instruction,
            "episode_id": name,
            "source": "test",
            "success": True,
            "control_hz": 5.0,
            "schema_version": SCHEMA_VERSION,
        },
    )
    write_episode(folder / name, episode)
    return episode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("windows")
    episodes = {
        "long.h5": write(folder, "long.h5", 10, "go to the red box"),
        "short.h5": write(folder, "short.h5", 2, "go to the blue ball"),
        "small_frames.h5": write(folder, "small_frames.h5", 5, "go to the red box", size=48),
    }
    manifest = build_manifest(folder, {"train": list(episodes)}, {"kind": "test"})
    pre = Preprocessing.from_manifest(manifest, tokenizer, window=W, chunk=K)
    return folder, episodes, pre


def test_window_starts_cover_every_frame_without_running_past_the_end():
    assert window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert window_starts(22, 8, 4) == [0, 4, 8, 12, 14]  # last window ends on the last frame
    assert window_starts(8, 8, 4) == [0]
    assert window_starts(5, 8, 4) == [0]  # shorter than W: one window, padded at the end
    assert window_starts(10, 4, 1) == list(range(7))


def test_window_at_episode_start_has_no_padding_and_shifted_targets():
    actions = np.arange(30, dtype=np.float32).reshape(10, 3)  # [N, 3], action t = [3t, 3t+1, 3t+2]
    state = np.arange(10, dtype=np.float32)[:, None]  # [N, 1]
    frames = np.full((W, 2, 2, 3), 7, np.uint8)
    sample = assemble_window(frames, actions, state, start=0, window=W, chunk=K)
    np.testing.assert_array_equal(sample["frame_mask"], np.ones(W))
    np.testing.assert_array_equal(sample["action_mask"], np.ones((W, K)))
    np.testing.assert_array_equal(sample["state"][:, 0], [0, 1, 2, 3])
    for t in range(W):
        for k in range(K):
            np.testing.assert_array_equal(sample["actions"][t, k], actions[t + k])


def test_window_at_episode_end_masks_targets_past_the_last_frame():
    actions = np.arange(30, dtype=np.float32).reshape(10, 3)
    state = np.zeros((10, 3), np.float32)
    sample = assemble_window(np.ones((W, 2, 2, 3), np.uint8), actions, state, start=6, window=W, chunk=K)
    # frames 6..9; target frame 6+t+k exists only while 6+t+k <= 9
    expected = np.array([[6 + t + k <= 9 for k in range(K)] for t in range(W)], np.float32)
    np.testing.assert_array_equal(sample["action_mask"], expected)
    np.testing.assert_array_equal(sample["frame_mask"], np.ones(W))
    np.testing.assert_array_equal(sample["actions"][3, 0], actions[9])
    assert not sample["actions"][3, 1:].any() and not sample["actions"][2, 2].any()  # masked targets are 0


def test_short_episode_is_padded_at_the_end_only():
    actions = np.ones((2, 3), np.float32)
    frames = np.full((2, 2, 2, 3), 9, np.uint8)
    sample = assemble_window(frames, actions, np.ones((2, 3), np.float32), start=0, window=W, chunk=K)
    np.testing.assert_array_equal(sample["frame_mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(sample["action_mask"], [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert (sample["images"][:2] == 9).all() and not sample["images"][2:].any()
    assert not sample["state"][2:].any() and not sample["actions"][2:].any()
    with pytest.raises(DataError, match="3 frames for an episode of 2"):
        assemble_window(np.zeros((3, 2, 2, 3), np.uint8), actions, actions, start=0, window=W, chunk=K)


def test_dataset_samples_match_the_episode_files(dataset):
    folder, episodes, pre = dataset
    ds = WindowDataset(folder, "train", pre, stride=2)
    # long (10 frames, W=4, stride 2): starts 0,2,4,6 ; short: 0 ; small_frames (5): 0,1
    assert len(ds) == 7 == count_windows(folder, "train", window=W, stride=2)
    assert ds.index.windows.tolist() == [[0, 0], [0, 2], [0, 4], [0, 6], [1, 0], [2, 0], [2, 1]]
    long, short = episodes["long.h5"], episodes["short.h5"]
    sample = ds[1]  # long.h5 frames 2..5
    assert {k: (v.shape, v.dtype.name) for k, v in sample.items()} == {
        "images": ((W, 224, 224, 3), "uint8"),
        "state": ((W, 3), "float32"),
        "actions": ((W, K, 3), "float32"),
        "action_mask": ((W, K), "float32"),
        "frame_mask": ((W,), "float32"),
        "clip_input_ids": ((77,), "int64"),
        "kosmos_input_ids": ((pre.tokenizer.token_length,), "int64"),
        "kosmos_attention_mask": ((pre.tokenizer.token_length,), "int64"),
        "kosmos_image_embeds_position_mask": ((pre.tokenizer.token_length,), "int64"),
    }
    np.testing.assert_array_equal(sample["images"], long.images[2:6])
    np.testing.assert_allclose(sample["actions"][0], pre.normalise_actions(long.actions[2:5]))
    np.testing.assert_allclose(sample["state"], pre.normalise_state(long.state[2:6]))
    tokens = pre.tokenize(["go to the red box"])
    np.testing.assert_array_equal(sample["clip_input_ids"], tokens["clip_input_ids"][0])
    padded = ds[4]  # short.h5, 2 frames
    np.testing.assert_array_equal(padded["frame_mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(padded["images"][:2], short.images)
    np.testing.assert_array_equal(
        padded["kosmos_input_ids"], pre.tokenize(["go to the blue ball"])["kosmos_input_ids"][0]
    )
    resized = ds[5]["images"]  # 48x48 frames go through the same resize rule as serving
    np.testing.assert_array_equal(resized[0], pre.prepare_image(episodes["small_frames.h5"].images[0]))
    with pytest.raises(IndexError):
        ds[7]


def test_dataset_batches_through_a_torch_dataloader(dataset):
    import torch

    folder, _, pre = dataset
    loader = torch.utils.data.DataLoader(WindowDataset(folder, "train", pre), batch_size=3)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, W, 224, 224, 3) and batch["images"].dtype == torch.uint8
    assert batch["actions"].shape == (3, W, K, 3) and batch["clip_input_ids"].shape == (3, 77)


def test_augmentation_is_deterministic_given_seed_and_epoch(dataset):
    folder, episodes, pre = dataset
    plain = WindowDataset(folder, "train", pre)
    first = WindowDataset(folder, "train", pre, augment=True, seed=3)
    again = WindowDataset(folder, "train", pre, augment=True, seed=3)
    np.testing.assert_array_equal(plain[0]["images"], episodes["long.h5"].images[:W])
    np.testing.assert_array_equal(first[0]["images"], again[0]["images"])
    assert not np.array_equal(first[0]["images"], plain[0]["images"])
    np.testing.assert_array_equal(first[0]["actions"], plain[0]["actions"])  # labels untouched
    before = first[0]["images"]
    first.set_epoch(1)
    assert not np.array_equal(first[0]["images"], before)
    other_seed = WindowDataset(folder, "train", pre, augment=True, seed=4)
    assert not np.array_equal(other_seed[0]["images"], again[0]["images"])


def test_augment_frames_changes_brightness_within_bounds():
    frames = np.full((2, 32, 32, 3), 100, np.uint8)
    config = AugmentConfig(max_rotation_deg=0.0, brightness=0.2, contrast=0.0)
    out = augment_frames(frames, np.random.default_rng(0), config, fill=(0, 0, 0))
    assert out.dtype == np.uint8 and 80 <= out.mean() <= 120 and out.mean() != 100
    assert (out[0] == out[1]).all()  # one draw per window
    with pytest.raises(DataError, match="AugmentConfig.brightness = 1.5"):
        AugmentConfig(brightness=1.5)


def test_dataset_errors(dataset, tokenizer):
    folder, _, pre = dataset
    with pytest.raises(DataError, match=r"split 'val' not in manifest \(has \['train'\]\)"):
        WindowDataset(folder, "val", pre)
    wrong = Preprocessing.from_manifest(load_manifest(folder), tokenizer, window=W, chunk=K)
    wrong.state_dim, wrong.state_mean, wrong.state_std = 2, [0.0, 0.0], [1.0, 1.0]
    with pytest.raises(DataError, match=r"state: shape \[10, 3\]: expected \[..., 2\]"):
        WindowDataset(folder, "train", wrong)
