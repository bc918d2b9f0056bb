"""The training side of the recipe options (issue 15): loss weights through the step and validation,
model selection by the executed step's error, the window stride; all without a cluster."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mobile_vla.errors import ConfigError
from mobile_vla.online.finetune import FinetuneConfig
from mobile_vla.policy.losses import policy_loss
from mobile_vla.policy.model import build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.presets import tiny
from mobile_vla.policy.text import build_tokenizer
from mobile_vla.train.evaluation import evaluate_windows, model_inputs
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.step import TrainStep
from mobile_vla.train.trainer import _best_checkpoint
from tests.policy.conftest import build_batch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    config = tiny()
    return config, build_tokenizer(config)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = build_policy(config, load_pretrained=False)
    with torch.no_grad():
        model.head[-1].weight.normal_(std=0.2)  # outputs that vary per chunk step
    return model


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.select_by=val_mae", "train.select_by = 'val_mae'"),
        ("loss.first_step_weight=0", "loss.first_step_weight = 0"),
        ("loss.nll_weight=-1", "loss.nll_weight = -1"),
        ("data.stride=0", "data.stride = 0"),
        ("data.stride=5", "data.stride = 5: must be at most data.window = 4"),
    ],
)
def test_bad_recipe_values_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(TINY, [override])
    assert message in str(info.value)


def test_defaults_keep_the_old_recipe():
    cfg = load_train_config(TINY)
    assert cfg.loss.weights() == {"nll_weight": 0.1, "first_step_weight": 1.0, "aux_weight": 0.0}
    assert cfg.train.select_by == "val_loss" and cfg.data.stride is None
    assert FinetuneConfig().loss.weights() == cfg.loss.weights()
    assert FinetuneConfig(loss={"first_step_weight": 5}).loss.first_step_weight == 5.0


def test_train_step_and_validation_use_the_loss_weights(setup):
    config, tokenizer = setup
    batch = build_batch(config, tokenizer, batch_size=2, seed=4)
    weights = {"nll_weight": 0.3, "first_step_weight": 5.0}
    model = _model(config).eval()  # tiny has dropout 0: train and eval forward agree
    with torch.no_grad():
        output = model(model_inputs(batch))
        plain = float(policy_loss(output, batch)["loss"])
        weighted = float(policy_loss(output, batch, **weights)["loss"])
    assert abs(weighted - plain) > 1e-4  # the weights matter on this batch

    pre = Preprocessing(action_low=[-1.0] * 3, action_high=[1.0] * 3, state_mean=[0.0] * 3, state_std=[1.0] * 3)
    scored = evaluate_windows(model, [batch], pre, device=CPU, loss_weights=weights)
    assert scored.loss_sum / scored.windows == pytest.approx(weighted, rel=1e-5)
    assert evaluate_windows(model, [batch], pre, device=CPU).loss_sum / 2 == pytest.approx(plain, rel=1e-5)

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    assert TrainStep(model, optimizer, device=CPU, loss_weights=weights)(batch).loss == pytest.approx(
        weighted, rel=1e-5
    )
    assert TrainStep(model, optimizer, device=CPU)(batch).loss == pytest.approx(plain, rel=1e-5)


def test_select_by_picks_the_checkpoint_with_the_lowest_score():
    kept = [
        ("epoch1", {"epoch": 1, "val_loss": 0.30, "val_mae_now": 0.20}),
        ("epoch2", {"epoch": 2, "val_loss": 0.10, "val_mae_now": 0.25}),
        ("epoch3", {"epoch": 3, "val_loss": 0.20, "val_mae_now": 0.15}),
    ]
    result = SimpleNamespace(best_checkpoints=kept, checkpoint="epoch3", metrics=kept[-1][1])
    assert _best_checkpoint(result, "val_loss")[0] == "epoch2"
    assert _best_checkpoint(result, "val_mae_now")[0] == "epoch3"
    older = SimpleNamespace(
        best_checkpoints=[(c, {"val_loss": m["val_loss"]}) for c, m in kept], checkpoint="x", metrics={}
    )
    assert _best_checkpoint(older, "val_mae_now")[0] == "x"  # no checkpoint has the score: the latest
