"""Tune config: search dimensions, keys the sweep owns, search-space checks against the training preset,
where the base preset is found, concurrency from cluster resources, and the seed-ensemble rewrite. No
cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from mobile_vla.errors import ConfigError, ResourceError
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.preflight import resolve_policy_config
from mobile_vla.tune.ensemble_build import seed_sweep_config
from mobile_vla.tune.search import build_search_algorithm
from mobile_vla.tune.sweep_config import (
    TuneJobConfig,
    apply_params,
    check_search_space,
    load_base_train_config,
    load_tune_config,
)
from mobile_vla.tune.trial_resources import concurrency, driver_resources, total_trials, trial_bundle

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = REPO / "jobs" / "configs" / "tune_tiny.yaml"
TUNE_SMALL = REPO / "jobs" / "configs" / "tune_small.yaml"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", [TUNE_TINY, TUNE_SMALL])
def test_shipped_configs_load_and_their_search_spaces_check(path):
    cfg = load_tune_config(path)
    assert path.read_text().startswith("# ")  # the launch line
    base = load_base_train_config(cfg)
    check_search_space(cfg, base)  # every edge value of every dimension is a valid TrainJobConfig
    assert {
        "optim.lr",
        "optim.weight_decay",
        "data.window",
        "data.chunk",
        "data.augment_strength",
        "model.overrides.fusion",
        "model.overrides.lstm_hidden",
    } <= set(cfg.search_space)
    assert cfg.tune.scheduler == "asha" and cfg.tune.search == "optuna"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("search_space:\n  optim.lr: {uniform: [0.1, 0.01]}\n", "low < high"),
        ("search_space:\n  optim.lr: {loguniform: [0, 0.01]}\n", "bounds must be > 0"),
        ("search_space:\n  optim.lr: {uniform: [0.1, 0.2], choice: [1]}\n", "exactly one of"),
        ("search_space:\n  optim.lr: {}\n", "exactly one of"),
        ("search_space:\n  run.name: {choice: [a, b]}\n", "set by the sweep"),
        ("search_space:\n  lr: {choice: [1]}\n", "dotted TrainJobConfig key"),
        ("search_space:\n  train.seed: {grid: [0, 1]}\n", "grid needs tune.search = 'random'"),
        ("tune:\n  points_to_evaluate: [{optim.momentum: 1}]\n", "not search_space keys"),
        ("tune:\n  scheduler: hyperband\n", "tune.scheduler"),
        ("ensemble:\n  members: 1\n", "at least 2 members"),
    ],
)
def test_bad_tune_configs_name_the_field(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_tune_config(_write(tmp_path, body))


@pytest.mark.parametrize(
    ("key", "rule", "message"),
    [
        ("optim.learning_rate", {"choice": [0.1]}, "search_space.optim.learning_rate: unknown training config key"),
        ("optim.lr", {"choice": [-1.0]}, "optim.lr"),
        ("model.overrides.fusion", {"choice": ["gated", "sum"]}, "fusion = 'sum'"),
        ("model.overrides.lstm_width", {"choice": [8]}, "lstm_width: unknown PolicyConfig field"),
        ("data.window", {"choice": [0, 4]}, "data.window"),
    ],
)
def test_search_space_is_checked_against_the_training_preset_before_any_trial(key, rule, message):
    cfg = TuneJobConfig.model_validate(
        {
            "train": {"config": str(REPO / "jobs/configs/tiny.yaml")},
            "search_space": {key: rule},
            "tune": {"search": "random"},
        }
    )
    with pytest.raises(ConfigError, match=message):
        check_search_space(cfg, load_base_train_config(cfg))


def test_sampled_values_land_in_the_trial_config():
    base = load_base_train_config(load_tune_config(TUNE_TINY))
    trial = apply_params(
        base,
        {
            "optim.lr": 0.02,
            "data.window": 3,
            "data.augment_strength": 1.5,
            "model.overrides.fusion": "film",
            "model.overrides.kosmos.dropout": 0.2,
        },
    )
    assert trial.optim.lr == 0.02 and trial.data.window == 3 and trial.data.augment_strength == 1.5
    policy = resolve_policy_config(trial)
    assert policy.fusion == "film" and policy.window == 3 and policy.kosmos.dropout == 0.2
    assert base.optim.lr != 0.02 and base.model.overrides == {}  # the base is left alone


def test_missing_base_preset_is_a_config_error(tmp_path):
    cfg = load_tune_config(_write(tmp_path, "train:\n  config: nowhere/preset.yaml\n"))
    with pytest.raises(ConfigError, match="train.config = 'nowhere/preset.yaml': no such file"):
        load_base_train_config(cfg, tmp_path)


def test_relative_base_preset_resolves_above_the_tune_config_from_any_directory(tmp_path, monkeypatch):
    """`mobile-vla tune --config jobs/configs/tune_tiny.yaml` from another directory: its train.config
    (jobs/configs/tiny.yaml, relative) is found above the tune config's folder, at the repository root."""
    monkeypatch.chdir(tmp_path)
    cfg = load_tune_config(TUNE_TINY)
    expected = load_train_config(REPO / cfg.train.config, cfg.train.overrides)
    assert load_base_train_config(cfg, TUNE_TINY.parent) == expected
    with pytest.raises(ConfigError, match="no such file"):
        load_base_train_config(cfg)  # without the tune config's folder: not from this directory


def test_concurrency_follows_cluster_resources():
    cfg = load_tune_config(TUNE_TINY, ["tune.driver_cpus=0.5"])
    base = load_base_train_config(cfg)  # 1 worker x 1 CPU per trial
    assert trial_bundle(cfg, base) == {"CPU": 1.5}
    assert concurrency(cfg, base, {"CPU": 4.0}) == 2  # (4 - 1 CPU for data loading) // 1.5
    assert concurrency(cfg, base, {"CPU": 64.0}) == 4  # never more than the 4 trials
    capped = load_tune_config(TUNE_TINY, ["tune.driver_cpus=0.5", "tune.max_concurrent_trials=1"])
    assert concurrency(capped, base, {"CPU": 64.0}) == 1
    laptop = load_tune_config(TUNE_TINY)  # driver_cpus 0: a default 2-CPU `ray.init()` runs one trial
    assert concurrency(laptop, base, {"CPU": 2.0}) == 1
    gpu = base.model_copy(update={"scaling": base.scaling.model_copy(update={"use_gpu": True, "num_workers": 2})})
    assert concurrency(laptop, gpu, {"CPU": 32.0, "GPU": 4.0}) == 2  # GPUs bound it: 2 workers x 1 GPU each
    with pytest.raises(ResourceError, match="one trial needs"):
        concurrency(laptop, gpu, {"CPU": 32.0})


def test_seed_ensemble_config_is_a_grid_over_seeds_without_early_stopping():
    cfg = seed_sweep_config(load_tune_config(TUNE_SMALL), 3)
    assert list(cfg.search_space) == ["train.seed"] and cfg.search_space["train.seed"].grid == [0, 1, 2]
    assert cfg.tune.scheduler == "fifo" and cfg.tune.search == "random" and total_trials(cfg) == 3
    assert cfg.ensemble.members == 3 and cfg.tune.points_to_evaluate == []


def test_trial_driver_bundle_is_never_empty():
    """Tune refuses an all-zero bundle; with driver_cpus 0 the driver still reserves (logical) memory."""

    resources = driver_resources(load_tune_config(TUNE_TINY))
    assert resources["CPU"] == 0 and resources["memory"] > 0
    wrapped = tune.with_resources(lambda config: None, resources)  # raises on an empty bundle
    [bundle] = wrapped._resources.bundles  # what Tune will reserve for each trial's driver
    assert bundle == {"memory": float(resources["memory"])}


def test_random_search_carries_the_concurrency_limit_itself():
    """Tune applies max_concurrent_trials only to a Searcher; a BasicVariantGenerator must hold it."""

    search = build_search_algorithm(seed_sweep_config(load_tune_config(TUNE_TINY), 3), 1)
    assert search.max_concurrent == 1
