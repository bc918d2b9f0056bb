"""Training fixtures: one real Ray Train run with every model and recipe option the option tests read.

Each of test_aux_training, test_recipe_training and test_measured_state trained its own tiny run, and a
Ray Train run spends about half a minute starting its workers on 2 cores before its first step. The
options are independent of one another (heads, pooling, loss weights, stride, state input), so one run
with all of them serves the three tests; each still asserts its own options on that run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
OPTIONS_RUN_EPOCHS = 3  # the recipe test's checkpoint selection needs several epochs to choose from


@dataclasses.dataclass
class OptionsRun:
    cfg: object  # TrainJobConfig
    result: object  # TrainResult
    home: Path  # its platform home (MLflow store, registered version, Ray results)


@pytest.fixture(scope="session")
def options_run(ray_cluster, tiny_dataset, tmp_path_factory) -> OptionsRun:
    """The tiny preset, one worker, registered as @challenger in a home of its own, with:
    auxiliary heads and text-attention pooling (test_aux_training); stride 4, first-step loss weight,
    state dropout, k = 0 confidence, 112 px with 16 px patches and selection by val_mae_now
    (test_recipe_training); the measured-velocity state input (test_measured_state)."""
    from mobile_vla.policy.config import MEASURED_VELOCITY
    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.trainer import run_training

    home = tmp_path_factory.mktemp("options_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILE_VLA_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_train_config(
            TINY,
            [
                f"data.path={tiny_dataset}",
                f"run.storage_path={home / 'ray_results'}",
                "run.name=options",
                "scaling.num_workers=1",
                f"train.epochs={OPTIONS_RUN_EPOCHS}",
                "train.keep_best=1",
                # auxiliary heads and text-attention pooling
                "loss.aux_weight=0.5",
                "model.overrides.fusion_pooling=text_attention",
                # the recipe options
                "train.select_by=val_mae_now",
                "data.stride=4",
                "loss.first_step_weight=5",
                "model.overrides.state_dropout=0.5",
                "model.overrides.confidence_steps=1",
                "model.overrides.image_size=112",
                "model.overrides.kosmos.patch_size=16",
                "model.overrides.clip.patch_size=16",
                # the measured state
                f"model.overrides.state_input={MEASURED_VELOCITY}",
            ],
        )
        result = run_training(cfg)
    return OptionsRun(cfg, result, home)


@pytest.fixture()
def options_home(options_run, monkeypatch) -> OptionsRun:
    """`options_run` with MOBILE_VLA_HOME pointed at its home for the test (its MLflow store, its models)."""
    monkeypatch.setenv("MOBILE_VLA_HOME", str(options_run.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return options_run
