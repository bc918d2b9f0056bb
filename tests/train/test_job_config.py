"""Bad training configs fail on the driver, before any worker starts, with a message naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_vla.errors import ConfigError, DataError, ResourceError
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.preflight import (
    ClusterCapacity,
    check_data,
    check_resources,
    resolve_policy_config,
    workers_that_fit,
)

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "jobs" / "configs"


@pytest.mark.parametrize("name", ["tiny", "small", "small_drive", "small_aux", "full_gpu"])
def test_presets_load_and_say_how_to_launch(name):
    path = PRESETS / f"{name}.yaml"
    cfg = load_train_config(path)
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and ("mobile-vla train --config" in header or "jobs/train.py" in header)
    policy = resolve_policy_config(cfg)
    assert (policy.window, policy.chunk) == (cfg.data.window, cfg.data.chunk)


def test_full_preset_follows_the_original_recipe():
    cfg = load_train_config(PRESETS / "full_gpu.yaml")
    assert cfg.optim.lr == 1e-4 and cfg.train.epochs == 100
    assert cfg.train.batch_size * cfg.scaling.num_workers * cfg.optim.accumulate == 32
    assert cfg.train.strategy == "fsdp" and cfg.train.precision == "bf16" and cfg.scaling.use_gpu


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match=r"unknown key 'optim.momentum'"):
        load_train_config(PRESETS / "tiny.yaml", ["optim.momentum=0.9"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"train.strategy = 'zero3'"):
        load_train_config(PRESETS / "tiny.yaml", ["train.strategy=zero3"])
    with pytest.raises(ConfigError, match=r"optim.lr = -1"):
        load_train_config(PRESETS / "tiny.yaml", ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"val_split"):
        load_train_config(PRESETS / "tiny.yaml", ["data.val_split=train"])


def test_unknown_policy_override_is_named():
    cfg = load_train_config(PRESETS / "tiny.yaml", ["model.overrides.lstm_size=3"])
    with pytest.raises(ConfigError, match=r"model.overrides.lstm_size: unknown PolicyConfig field"):
        resolve_policy_config(cfg)
    cfg = load_train_config(PRESETS / "tiny.yaml", ["model.overrides.kosmos.depth=3"])
    with pytest.raises(ConfigError, match=r"model.overrides.kosmos.depth: unknown KosmosConfig field"):
        resolve_policy_config(cfg)
    cfg = load_train_config(PRESETS / "tiny.yaml", ["model.overrides.fusion=sum"])
    with pytest.raises(ConfigError, match=r"fusion = 'sum'"):
        resolve_policy_config(cfg)
    nested = load_train_config(
        PRESETS / "tiny.yaml", ["model.overrides.kosmos.text_layers=2", "model.overrides.fusion=film"]
    )
    policy = resolve_policy_config(nested)
    assert policy.kosmos.text_layers == 2 and policy.fusion == "film"


def test_data_folder_without_manifest_is_refused(tmp_path):
    cfg = load_train_config(PRESETS / "tiny.yaml", [f"data.path={tmp_path}"])
    with pytest.raises(DataError, match=r"manifest"):
        check_data(cfg)
    cfg = load_train_config(PRESETS / "tiny.yaml", [f"data.path={tmp_path / 'absent'}"])
    with pytest.raises(DataError, match=r"no such folder"):
        check_data(cfg)


def test_missing_split_is_named(tiny_dataset):
    cfg = load_train_config(PRESETS / "tiny.yaml", [f"data.path={tiny_dataset}", "data.val_split=nope"])
    with pytest.raises(ConfigError, match=r"data.val_split = 'nope'"):
        check_data(cfg)


def test_workers_are_packed_per_node():
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 4.0, "GPU": 4.0}]
    assert workers_that_fit({"CPU": 8.0, "GPU": 1.0}, nodes) == 2  # 2 on the first node, 0 on the second
    assert workers_that_fit({"CPU": 1.0, "GPU": 1.0}, nodes) == 8
    assert workers_that_fit({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 64.0}]) == 0


def test_impossible_scaling_fails_fast_with_the_numbers():
    capacity = ClusterCapacity(nodes=[{"CPU": 4.0}])
    gpu = load_train_config(PRESETS / "tiny.yaml", ["scaling.use_gpu=true", "scaling.num_workers=2"])
    with pytest.raises(ResourceError, match=r"2 workers x \{CPU: 1, GPU: 1\} can never be placed.*GPU: 0"):
        check_resources(gpu, capacity)
    many = load_train_config(PRESETS / "tiny.yaml", ["scaling.num_workers=9"])
    with pytest.raises(ResourceError, match=r"holds at most 4 such workers"):
        check_resources(many, capacity)
    greedy = load_train_config(PRESETS / "tiny.yaml", ["scaling.resources_per_worker.CPU=2"])
    with pytest.raises(ResourceError, match=r"Ray Data pipeline"):
        check_resources(greedy, capacity)
    check_resources(load_train_config(PRESETS / "tiny.yaml"), capacity)  # 2 x 1 CPU of 4: fine


def test_autoscaler_maximum_counts_as_capacity(tmp_path, monkeypatch):
    from mobile_vla.train import preflight

    spec = tmp_path / "bootstrap.yaml"
    spec.write_text(
        "max_workers: 3\navailable_node_types:\n"
        "  gpu_worker: {max_workers: 5, resources: {CPU: 8, GPU: 1}}\n"
        "  head: {max_workers: 0, resources: {CPU: 4}}\n"
    )
    nodes, unknown = preflight._autoscaler_nodes(spec)
    assert nodes == [{"CPU": 8.0, "GPU": 1.0}] * 3 and unknown == []  # capped by the global max_workers
    capacity = ClusterCapacity(nodes=[{"CPU": 4.0}, *nodes])
    ok = load_train_config(PRESETS / "full_gpu.yaml", ["scaling.num_workers=3"])
    check_resources(ok, capacity)
    with pytest.raises(ResourceError):
        check_resources(load_train_config(PRESETS / "full_gpu.yaml", ["scaling.num_workers=4"]), capacity)


def test_impossible_gpu_request_on_the_real_cluster_fails_fast(ray_cluster, tiny_dataset):
    """The real local cluster has no GPU: preflight says so instead of Ray waiting forever."""
    from mobile_vla.train.preflight import preflight

    cfg = load_train_config(PRESETS / "tiny.yaml", [f"data.path={tiny_dataset}", "scaling.use_gpu=true"])
    with pytest.raises(ResourceError, match=r"can never be placed.*GPU: 0"):
        preflight(cfg)


def test_cli_prints_one_line_and_exits_2_on_a_bad_config(platform_home):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobile_vla.cli",
            "train",
            "--config",
            str(PRESETS / "tiny.yaml"),
            "train.learning_rate=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MOBILE_VLA_HOME": str(platform_home)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mobile-vla train: error: {PRESETS / 'tiny.yaml'}: unknown key 'train.learning_rate'"
    ]
