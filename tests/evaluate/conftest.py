"""Evaluation fixtures: a tiny random-weight policy saved as a model folder (torch backend, no export),
and the same policy registered as an MLflow model version in a platform home of its own."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from mobile_vla.policy import build_policy, build_tokenizer, presets, save_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.tracking import configure_mlflow, get_or_create_experiment, register_policy


def save_tiny_policy(root: Path, seed: int = 0) -> Path:
    """root/policy/: a tiny policy with random weights and plausible action/state scaling."""
    config = presets.tiny()
    torch.manual_seed(seed)
    model = build_policy(config).eval()
    with torch.no_grad():  # the head starts near zero: make the commands vary so the robot moves
        model.head[-1].weight.normal_(std=0.2)
    preprocessing = Preprocessing(
        action_low=[-0.2, -0.4, -1.0],
        action_high=[0.75, 0.4, 1.0],
        state_mean=[0.3, 0.0, 0.0],
        state_std=[0.3, 0.2, 0.5],
        state_dim=config.state_dim,
        window=config.window,
        chunk=config.chunk,
        tokenizer=build_tokenizer(config),
    )
    save_policy(root / "policy", model, preprocessing)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("eval-model") / "model")


@pytest.fixture()
def registered_model(platform_home, tiny_model_dir) -> tuple[str, str]:
    """(name, version) of the tiny policy registered in this test's platform home."""
    configure_mlflow()
    experiment_id = get_or_create_experiment("evaluate-tests")
    with mlflow.start_run(experiment_id=experiment_id, run_name="tiny") as run:
        version = register_policy(tiny_model_dir, run.info.run_id, name="eval-policy", alias="challenger")
    return "eval-policy", version
