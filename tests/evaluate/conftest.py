"""Evaluation fixtures: a tiny random-weight policy saved as a model folder (torch backend, no export),
and the same policy registered as an MLflow model version in a platform home of its own."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from mobile_vla.policy import save_random_policy
from mobile_vla.tracking import configure_mlflow, get_or_create_experiment, register_policy

# the action range and state scaling of the evaluation policy (tests/evaluate/test_offline.py reads answers in it)
EVAL_POLICY_SCALING = {
    "action_low": [-0.2, -0.4, -1.0],
    "action_high": [0.75, 0.4, 1.0],
    "state_mean": [0.3, 0.0, 0.0],
    "state_std": [0.3, 0.2, 0.5],
}


def save_tiny_policy(root: Path, seed: int = 0) -> Path:
    """root/policy/: a tiny policy with random weights and plausible action/state scaling."""
    # the head starts near zero: a spread in its weights makes the commands vary so the robot moves
    save_random_policy("tiny", root, seed=seed, head_std=0.2, scaling=EVAL_POLICY_SCALING)
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
