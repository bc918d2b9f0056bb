"""Offline metrics: known numbers on synthetic predictions, and a real run over a generated split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mobile_vla.errors import DataError


def synthetic_episode(T: int = 6, K: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    true = rng.uniform(-0.5, 0.5, (T, 3)).astype(np.float32)  # [T, 3]
    frames = np.minimum(np.arange(T)[:, None] + np.arange(K)[None, :], T - 1)  # [T, K]
    return {"name": f"ep{seed}", "true": true, "pred": true[frames].copy()}  # pred[t, k] = true[t + k]


def test_perfect_predictions_score_zero_error():
    from mobile_vla.evaluate.offline import offline_metrics

    metrics = offline_metrics([synthetic_episode(seed=0), synthetic_episode(T=4, seed=1)])
    assert metrics["episodes"] == 2 and metrics["frames"] == 10
    for key in ("mae", "rmse", "mae_linear_x", "rmse_angular_z", "chunk_mae", "chunk_rmse"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-7)
    assert metrics["r2"] == pytest.approx(1.0) and metrics["chunk_r2"] == pytest.approx(1.0)


def test_errors_per_axis_and_chunk_alignment():
    from mobile_vla.evaluate.offline import offline_metrics

    episode = synthetic_episode(T=5, K=2)
    episode["pred"][:, 0, 0] += 0.1  # executed command: linear_x off by 0.1 m/s
    episode["pred"][:, 1, 2] -= 0.4  # second chunk entry: angular_z off by 0.4 rad/s
    metrics = offline_metrics([episode])
    assert metrics["mae_linear_x"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["mae_linear_y"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["mae"] == pytest.approx(0.1 / 3, abs=1e-6)
    # chunk: 5 entries k=0 (x off 0.1) + 4 valid entries k=1 (z off 0.4; the last frame has no t+1)
    assert metrics["chunk_mae"] == pytest.approx((5 * 0.1 + 4 * 0.4) / (9 * 3), abs=1e-6)


@pytest.mark.slow  # the policy replayed over a split in Ray tasks: ~15 s on a loaded 2-core box
def test_offline_on_a_generated_split(tiny_dataset, tiny_model_dir):
    from mobile_vla.data.manifest import load_manifest
    from mobile_vla.evaluate.offline import offline_report, save_offline

    report = offline_report(str(tiny_model_dir), tiny_dataset, "val", episodes_per_task=1, progress=False)
    manifest = load_manifest(tiny_dataset)
    names = manifest["splits"]["val"]
    assert [e["name"] for e in report.episodes] == names
    assert report.metrics["frames"] == sum(manifest["episodes"][n]["frames"] for n in names)
    for axis in ("linear_x", "linear_y", "angular_z"):
        assert 0.0 <= report.metrics[f"mae_{axis}"] <= report.metrics[f"rmse_{axis}"]
    assert math.isfinite(report.metrics["chunk_mae"])
    low, high = np.array([-0.2, -0.4, -1.0]), np.array([0.75, 0.4, 1.0])  # the fixture's action range
    for episode in report.episodes:
        assert episode["pred"].shape == (len(episode["true"]), 10, 3)
        assert (episode["pred"] >= low - 1e-5).all() and (episode["pred"] <= high + 1e-5).all()  # de-normalised

    metrics = report.version_metrics()
    assert metrics["offline.val.mae"] == metrics["offline.mae"] == report.metrics["mae"]
    assert "offline.mae" not in report.version_metrics(primary=False)
    files = save_offline(report, tiny_dataset.parent / "offline-out")
    assert [f.name for f in files] == ["offline.json", "offline_actions.png"] and all(f.stat().st_size for f in files)


def test_offline_refuses_unknown_split(tiny_dataset, tiny_model_dir):
    from mobile_vla.evaluate.offline import evaluate_offline

    with pytest.raises(DataError, match="split 'nope' not in manifest"):
        evaluate_offline(str(tiny_model_dir), tiny_dataset, "nope")
