import math

import numpy as np
import pytest
import torch

from mobile_vla.policy import PolicyOutput, action_metrics, policy_loss


def _output(actions, log_var=None):
    log_var = torch.zeros_like(actions) if log_var is None else log_var
    B, T = actions.shape[:2]
    return PolicyOutput(actions, log_var, torch.ones(B, T), (torch.zeros(1), torch.zeros(1)))


def test_perfect_prediction_has_zero_huber_and_nll_of_unit_gaussian():
    target = torch.rand(2, 3, 4, 3)
    losses = policy_loss(_output(target.clone()), {"actions": target})
    assert losses["huber"].item() == pytest.approx(0.0)
    assert losses["nll"].item() == pytest.approx(0.5 * math.log(2 * math.pi), abs=1e-6)


def test_masked_targets_do_not_count():
    pred = torch.zeros(1, 2, 4, 3)
    target = torch.zeros(1, 2, 4, 3)
    action_mask = torch.ones(1, 2, 4)
    action_mask[0, 0, 2:] = 0  # past the episode end
    frame_mask = torch.tensor([[1.0, 0.0]])  # second frame is padding
    wild = target.clone()
    wild[0, 0, 2:] = 50.0
    wild[0, 1] = -50.0
    batch = {"actions": wild, "action_mask": action_mask, "frame_mask": frame_mask}
    assert policy_loss(_output(pred), batch)["loss"].item() == pytest.approx(
        policy_loss(_output(pred), {**batch, "actions": target})["loss"].item()
    )
    # an unmasked error does count, averaged over the 2 valid steps x 3 axes
    target[0, 0, 0, 0] = 0.5
    huber = policy_loss(_output(pred), {**batch, "actions": target})["huber"].item()
    assert huber == pytest.approx(0.5 * 0.5**2 / 6)


def test_first_step_weight_counts_the_executed_step_w_times():
    pred = torch.zeros(1, 1, 4, 3)
    target = torch.zeros(1, 1, 4, 3)
    target[0, 0, 0, 0] = 0.4  # an error on the executed step (k = 0)
    target[0, 0, 2, 1] = 0.2  # and one on a later chunk step
    action_mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])  # k = 3 past the episode end
    batch = {"actions": target, "action_mask": action_mask}
    e0, e2 = 0.5 * 0.4**2, 0.5 * 0.2**2  # Huber (delta 1) of each error
    old = policy_loss(_output(pred), batch)["huber"].item()
    assert old == pytest.approx((e0 + e2) / 9)  # 3 steps x 3 axes, alike
    assert policy_loss(_output(pred), batch, first_step_weight=1.0)["huber"].item() == old
    weighted = policy_loss(_output(pred), batch, first_step_weight=5.0)
    # weighted mean: the k = 0 entries count 5 times, the denominator is the summed weight 5x3 + 2x3
    assert weighted["huber"].item() == pytest.approx((5 * e0 + e2) / 21)
    assert weighted["nll"].item() == pytest.approx(
        (0.5 * (5 * (3 * math.log(2 * math.pi) + 0.4**2) + 6 * math.log(2 * math.pi) + 0.2**2)) / 21
    )


def test_nll_trains_variance_not_mean():
    actions = torch.zeros(1, 1, 2, 3, requires_grad=True)
    log_var = torch.zeros(1, 1, 2, 3, requires_grad=True)
    target = torch.full((1, 1, 2, 3), 2.0)
    policy_loss(_output(actions, log_var), {"actions": target})["nll"].backward()
    assert actions.grad is None or torch.count_nonzero(actions.grad) == 0
    assert torch.all(log_var.grad < 0)  # squared error 4 > variance 1: raise the variance


def test_metrics_per_axis_and_overall():
    true = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 2.0], [2.0, 1.0, 4.0]])
    pred = true + np.array([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0], [0.1, 0.0, 3.0]])
    m = action_metrics(pred, true)
    assert m["mae_linear_x"] == pytest.approx(0.1)
    assert m["rmse_linear_x"] == pytest.approx(0.1)
    assert m["r2_linear_x"] == pytest.approx(1 - 0.03 / 2.0)
    assert m["mae_linear_y"] == 0.0 and math.isnan(m["r2_linear_y"])  # constant axis: R^2 undefined
    assert m["mae_angular_z"] == pytest.approx(1.0)
    assert m["r2_angular_z"] == pytest.approx(1 - 9.0 / 8.0)
    assert m["mae"] == pytest.approx((0.3 + 3.0) / 9)
    assert m["rmse"] == pytest.approx(math.sqrt((0.03 + 9.0) / 9))
    assert m["r2"] == pytest.approx((m["r2_linear_x"] + m["r2_angular_z"]) / 2)


def test_metrics_accept_tensors_and_chunks():
    true = torch.randn(4, 5, 3)
    m = action_metrics(true, true)
    assert m["mae"] == 0.0 and m["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        action_metrics(np.zeros((4, 3)), np.zeros((5, 3)))
