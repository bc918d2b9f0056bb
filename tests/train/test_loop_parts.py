"""The pieces of the training loop that need no cluster: schedule, step counting, plots, checkpoint files."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from mobile_vla.train.loop import with_last_flag
from mobile_vla.train.step import warmup_cosine


def test_warmup_then_cosine_down_to_the_floor():
    factor = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    warm = [factor(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    decay = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.1)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert warmup_cosine(0, 100, 0.0)(0) == pytest.approx(1.0)


def test_last_flag_marks_only_the_final_item_and_counts_waiting():
    def slow_source(delay_s: float):  # the input pipeline: 0.05 s per item
        for item in (1, 2, 3):
            time.sleep(delay_s)
            yield item

    waited, flagged = [0.0], []
    for item, is_last in with_last_flag(slow_source(0.05), waited):
        flagged.append((item, is_last))
        time.sleep(0.2)  # the model's step: not waiting for data, so not counted
    assert flagged == [(1, False), (2, False), (3, True)]
    # 3 x 0.05 s blocked on the source; counting the 3 x 0.2 s steps too would give >= 0.75 s
    assert 0.15 <= waited[0] < 0.6, waited
    assert list(with_last_flag([])) == []
    assert list(with_last_flag([7])) == [(7, True)]


def test_steps_per_epoch_follow_equal_shards_and_accumulation():
    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.trainer import steps_per_epoch

    cfg = load_train_config(None, ["train.batch_size=4", "scaling.num_workers=2", "optim.accumulate=2"])
    # 37 windows -> 18 per worker -> 5 micro-batches -> 3 optimiser steps (the last one partial)
    assert steps_per_epoch(cfg, 37) == 3
    assert steps_per_epoch(cfg, 1) == 1


def test_plots_draw_curves_and_predicted_vs_true(tmp_path):
    from mobile_vla.train import plots

    steps = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 20)]
    epochs = [
        {
            "epoch": e,
            "step": 6 * e,
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e,
            "val_mae_linear_x": 0.1,
            "val_mae_linear_y": 0.2,
            "val_mae_angular_z": 0.3,
        }
        for e in (1, 2, 3)
    ]
    figure = plots.training_curves(steps, epochs)
    loss_axis, mae_axis = figure.axes
    assert len(loss_axis.lines) == 3 and len(mae_axis.lines) == 3
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 3))
    figure = plots.predicted_vs_true(true + 0.1, true)
    assert [ax.get_title() for ax in figure.axes] == ["linear_x", "linear_y", "angular_z"]
    figure.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_checkpoint_files_round_trip(tmp_path):
    import torch

    from mobile_vla.policy import build_policy, load_policy, presets
    from mobile_vla.train import checkpointing

    model = build_policy(presets.tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = checkpointing.Progress(
        epoch=2, step=17, steps=[{"step": 17, "loss": 0.5, "lr": 1e-3}], epochs=[{"epoch": 2, "val_loss": 0.4}]
    )
    folder = checkpointing.write_checkpoint(
        tmp_path / "ckpt",
        model=model,
        preprocessing=None,
        optimizer_state=optimizer.state_dict(),
        scheduler_state={"last_epoch": 17},
        progress=progress,
        job_config={"train": {"epochs": 3}},
        metrics={"val_loss": 0.4},
        val_sample=(np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32)),
    )
    state, restored = checkpointing.read_train_state(folder)
    assert (restored.epoch, restored.step, restored.epochs) == (2, 17, progress.epochs)
    assert state["scheduler"] == {"last_epoch": 17}
    pred, true = checkpointing.read_val_sample(folder)
    assert pred.shape == (4, 3) and not math.isnan(float(true.sum()))
    loaded, _ = load_policy(folder / "policy")
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])


def test_packed_folder_unpacks_identically(tmp_path):
    from mobile_vla.train.checkpointing import pack_folder, unpack_folder

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.json").write_text("{}")
    (tmp_path / "a" / "sub" / "y.bin").write_bytes(bytes(range(256)))
    unpack_folder(pack_folder(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "b" / "sub" / "y.bin").read_bytes() == bytes(range(256))
    assert (tmp_path / "b" / "x.json").read_text() == "{}"
