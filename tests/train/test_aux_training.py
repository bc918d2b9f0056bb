"""A real Ray Train run on the tiny preset with both issue-15 model options: the auxiliary heads learn
from the generated episodes' simulator labels and their loss terms reach MLflow every epoch, next to
train_loss and val_loss; the saved model rebuilds text-attention pooling and the heads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow  # one real Ray Train run: about a minute on 2 cores


def test_aux_terms_are_logged_per_epoch_and_the_options_are_saved(ray_cluster, tiny_dataset, platform_home):
    from mlflow import MlflowClient

    from mobile_vla.policy import load_policy
    from mobile_vla.policy.losses import AUX_TERMS
    from mobile_vla.tracking import configure_mlflow
    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.trainer import run_training

    epochs = 2
    cfg = load_train_config(
        TINY,
        [
            f"data.path={tiny_dataset}",
            f"run.storage_path={platform_home / 'ray_results'}",
            "run.name=aux",
            "scaling.num_workers=1",
            f"train.epochs={epochs}",
            "train.keep_best=1",
            "loss.aux_weight=0.5",
            "model.overrides.fusion_pooling=text_attention",
            "mlflow.registered_model=null",
        ],
    )
    result = run_training(cfg)

    client = MlflowClient(tracking_uri=configure_mlflow())
    for key in ["train_loss", "val_loss"] + [f"{split}_{term}" for split in ("train", "val") for term in AUX_TERMS]:
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
        assert all(math.isfinite(m.value) and m.value > 0 for m in history), key
    metrics = result.final_metrics
    parts = sum(metrics[f"val_{term}"] for term in AUX_TERMS[1:])
    assert metrics["val_aux"] == pytest.approx(parts, rel=1e-4)  # the terms add up to the aux loss

    model, _ = load_policy(result.best_checkpoint_dir / "policy")
    assert (model.config.fusion_pooling, model.config.aux_heads) == ("text_attention", True)
    assert model.patch_attention is not None and model.aux_head is not None
