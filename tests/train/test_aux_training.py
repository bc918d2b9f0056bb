"""A real Ray Train run on the tiny preset with both issue-15 model options (the shared options run of
tests/train/conftest.py): the auxiliary heads learn from the generated episodes' simulator labels and their
loss terms reach MLflow every epoch, next to train_loss and val_loss; the saved model rebuilds
text-attention pooling and the heads."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow  # one real Ray Train run (shared with the recipe and measured-state tests)


def test_aux_terms_are_logged_per_epoch_and_the_options_are_saved(options_home):
    from mlflow import MlflowClient

    from mobile_vla.policy import load_policy
    from mobile_vla.policy.losses import AUX_TERMS
    from mobile_vla.tracking import configure_mlflow

    cfg, result = options_home.cfg, options_home.result
    assert cfg.loss.aux_weight == 0.5
    epochs = cfg.train.epochs
    client = MlflowClient(tracking_uri=configure_mlflow())
    for key in ["train_loss", "val_loss"] + [f"{split}_{term}" for split in ("train", "val") for term in AUX_TERMS]:
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history if m.step > 0) == list(range(1, epochs + 1)), key
        assert all(math.isfinite(m.value) and m.value > 0 for m in history), key
    metrics = result.final_metrics
    parts = sum(metrics[f"val_{term}"] for term in AUX_TERMS[1:])
    assert metrics["val_aux"] == pytest.approx(parts, rel=1e-4)  # the terms add up to the aux loss

    model, _ = load_policy(result.best_checkpoint_dir / "policy")
    assert (model.config.fusion_pooling, model.config.aux_heads) == ("text_attention", True)
    assert model.patch_attention is not None and model.aux_head is not None
