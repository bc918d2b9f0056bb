"""The shared training step and window evaluation, without a cluster (tiny policy, synthetic batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobile_vla.policy.losses import action_metrics, policy_loss
from mobile_vla.policy.model import build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.presets import tiny
from mobile_vla.policy.text import build_tokenizer
from mobile_vla.train.evaluation import WindowPredictions, evaluate_windows, model_inputs
from mobile_vla.train.step import TrainStep
from tests.policy.conftest import build_batch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    config = tiny()
    return config, build_tokenizer(config)


def _pre() -> Preprocessing:
    return Preprocessing(
        action_low=[-1.0, -0.5, -2.0], action_high=[1.0, 0.5, 2.0], state_mean=[0.0] * 3, state_std=[1.0] * 3
    )


def _model(config, seed=0):
    torch.manual_seed(seed)
    return build_policy(config, load_pretrained=False)


def test_window_predictions_score_only_weighted_entries_and_now_only():
    actions = np.zeros((1, 2, 2, 3), np.float32)  # [N, T, K, 3]
    targets = np.zeros_like(actions)
    targets[0, 0, 0] = 1.0  # k = 0 of frame 0: error 1 on every axis
    targets[0, 0, 1] = 3.0  # k = 1 of frame 0: error 3
    targets[0, 1, :] = 100.0  # frame 1 is padding: never scored
    weights = np.array([[[1.0, 0.5], [0.0, 0.0]]], np.float32)
    corrected = np.array([[[0.0, 1.0], [0.0, 0.0]]], np.float32)
    scored = WindowPredictions(actions, targets, weights, np.array([[0.9, 0.1]]), {"corrected_mask": corrected})
    assert scored.metrics()["mae"] == pytest.approx(2.0)  # mean of 1 and 3 (weights only select)
    assert scored.metrics(now_only=True)["mae"] == pytest.approx(1.0)
    assert scored.metrics("corrected_mask")["mae"] == pytest.approx(3.0)
    assert np.isnan(scored.metrics("corrected_mask", now_only=True)["mae"])  # nothing corrected at k = 0
    error, confidence = scored.frame_errors()
    assert error.tolist() == [2.0] and confidence.tolist() == [pytest.approx(0.9)]


def test_evaluate_windows_matches_a_direct_forward_and_keeps_the_mode(setup):
    config, tokenizer = setup
    model, pre = _model(config).train(), _pre()
    batches = [build_batch(config, tokenizer, batch_size=2, seed=s) for s in (1, 2)]
    batches[1]["action_mask"][0, :, 2:] = 0  # targets past an episode end
    batches[1]["frame_mask"][1, -1] = 0  # a padding frame
    scored = evaluate_windows(model, batches, pre, keep_masks=("action_mask",))
    assert model.training  # restored after the evaluation

    model.eval()
    preds, trues, loss_sum = [], [], 0.0
    with torch.no_grad():
        for batch in batches:
            output = model(model_inputs(batch))
            loss_sum += float(policy_loss(output, batch)["loss"]) * 2
            keep = (batch["action_mask"] * batch["frame_mask"].unsqueeze(-1)) > 0  # [B, T, K]
            preds.append(pre.denormalise_actions(output.actions[keep].numpy()))
            trues.append(pre.denormalise_actions(batch["actions"][keep].numpy()))
    expected = action_metrics(np.concatenate(preds), np.concatenate(trues))
    assert scored.windows == 4 and scored.loss_sum == pytest.approx(loss_sum, rel=1e-5)
    for key in ("mae", "rmse", "mae_angular_z"):
        assert scored.metrics()[key] == pytest.approx(expected[key], rel=1e-5)
    assert scored.masks["action_mask"].shape == scored.weights.shape == (4, config.window, config.chunk)


def test_evaluate_windows_without_windows_scores_nan(setup):
    config, _ = setup
    scored = evaluate_windows(_model(config), [], _pre(), keep_masks=("corrected_mask",))
    assert scored.windows == 0 and np.isnan(scored.metrics("corrected_mask")["mae"])


def test_train_step_accumulates_then_steps_once_per_group(setup):
    config, tokenizer = setup
    model = _model(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step = TrainStep(model, optimizer, device=CPU, accumulate=2, grad_clip=1.0)
    head = model.head[-1].weight
    before = head.detach().clone()
    batch = build_batch(config, tokenizer, batch_size=2, seed=3)

    first = step(batch)
    assert not first.stepped and first.group_size == 0 and torch.equal(head, before)
    assert head.grad is not None  # accumulated, not applied
    second = step(batch)
    assert second.stepped and second.group_size == 2 and not torch.equal(head, before)
    assert head.grad is None  # zeroed after the optimiser step
    partial = step(batch, last=True)  # the last micro-batch of an epoch steps a partial group
    assert partial.stepped and partial.group_size == 1


def test_train_step_loss_is_the_policy_loss_and_one_step_learns(setup):
    config, tokenizer = setup
    model = _model(config).train()
    batch = build_batch(config, tokenizer, batch_size=2, seed=4)
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        reference = float(policy_loss(model(model_inputs(batch)), batch)["loss"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = TrainStep(model, optimizer, device=CPU)
    losses = [step(batch).loss for _ in range(8)]
    assert losses[0] == pytest.approx(reference, rel=0.2)  # dropout in train mode: close, not equal
    assert losses[-1] < losses[0]
