"""The Ray Data pipeline: windows streamed from episode files to Ray Train workers.

    ds = build_window_dataset("data/nav", "train", preprocessing, augment=True, seed=0)
    trainer = TorchTrainer(train_loop_per_worker, datasets={"train": ds}, ...)
    # in train_loop_per_worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=16):
        batch["images"]   # uint8 [B, T, 224, 224, 3], the window sample of mobile_vla.train.windows

The driver builds the small index (normalised actions/state, instructions tokenised once, the
window table: `windows.build_split_index`); the rows of the Ray dataset are only window ids. Frames
are read, resized, augmented and assembled by Ray tasks (`map_batches`) on any node's CPUs, so
image I/O and augmentation never run on the GPU workers and the stream is split between workers
by Ray Train. The index travels with the task, so tasks need the dataset folder on a path every
node sees (shared disk), as Ray Train's storage does.

Order: with `shuffle`, the window ids are permuted once by `seed`; ask for per-epoch reshuffling
with `iter_torch_batches(local_shuffle_buffer_size=...)`. Augmentation draws are a pure function of
(seed, epoch, window id); pass `seed=None` for fresh draws on every pass through the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray.data

from mobile_vla.data.episodes import FrameReader
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.train.windows import AugmentConfig, SplitIndex, build_split_index, window_rng

_READER = None  # one FrameReader per worker process: file handles stay open across batches


def _frame_reader():
    global _READER
    if _READER is None:
        _READER = FrameReader()
    return _READER


def assemble_batch(
    batch: dict[str, np.ndarray],
    index: SplitIndex,
    augment: AugmentConfig | None,
    seed: int | None,
    epoch: int,
) -> dict[str, np.ndarray]:
    """{"window_id": int64 [B]} -> the window samples stacked to a leading B."""
    reader = _frame_reader()
    samples = []
    for window_id in batch["window_id"]:
        window_id = int(window_id)
        rng = window_rng(seed, epoch, window_id) if augment is not None else None
        samples.append(index.sample(window_id, reader, rng, augment))
    out = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
    out["window_id"] = np.asarray(batch["window_id"], np.int64)  # [B], for tracing a sample back
    return out


def build_window_dataset(  # noqa: PLR0913 (the window options of a split, keyword-only)
    folder: str | Path,
    split: str,
    preprocessing: Preprocessing,
    augment: bool = False,
    *,
    seed: int | None = 0,
    epoch: int = 0,
    stride: int | None = None,
    shuffle: bool | None = None,
    augment_config: AugmentConfig | None = None,
    windows_per_task: int = 16,
    frame_labels: tuple[str, ...] = (),
) -> ray.data.Dataset:
    """A lazy `ray.data.Dataset` of window samples for `split` (`shuffle` defaults to `augment`,
    i.e. on for training, off for evaluation; `frame_labels`: per-frame episode arrays to carry).
    """
    index = build_split_index(folder, split, preprocessing, stride, frame_labels)
    window_ids = np.arange(len(index), dtype=np.int64)
    if augment if shuffle is None else shuffle:
        window_ids = np.random.default_rng(seed).permutation(window_ids)
    # at most ~200 input blocks: enough parallelism for a cluster, little per-block overhead
    rows_per_block = max(windows_per_task, -(-len(window_ids) // 200))
    blocks = max(1, -(-len(window_ids) // rows_per_block))
    ids = ray.data.from_items([{"window_id": int(i)} for i in window_ids], override_num_blocks=blocks)
    return ids.map_batches(
        assemble_batch,
        batch_size=windows_per_task,
        batch_format="numpy",
        fn_kwargs={
            "index": index,
            "augment": (augment_config or AugmentConfig()) if augment else None,
            "seed": seed,
            "epoch": epoch,
        },
    )
