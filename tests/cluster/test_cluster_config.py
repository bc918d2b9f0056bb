"""The `ray up` file passes Ray's own cluster-config validation and keeps its security promises."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILES = sorted((REPO / "clusters").glob("gpu*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(raw: dict) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def all_commands(config: dict) -> str:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands",
            "worker_setup_commands", "worker_start_ray_commands"]  # fmt: skip
    return "\n".join(cmd for key in keys for cmd in config.get(key, []))


@pytest.fixture(params=CLUSTER_FILES, ids=lambda p: p.name)
def cluster_file(request) -> Path:
    return request.param


def test_cluster_files_exist():
    assert REPO / "clusters" / "gpu.yaml" in CLUSTER_FILES


def test_validates_against_rays_schema(cluster_file):
    config = prepared(load(cluster_file))
    assert config["head_node_type"] in config["available_node_types"]


def test_schema_validation_catches_mistakes(cluster_file):
    """The validator is not a no-op: a misspelt key or a bad resource value is refused."""
    import jsonschema

    raw = load(cluster_file)
    typo = copy.deepcopy(raw)
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        prepared(typo)
    negative = copy.deepcopy(raw)
    worker_type = next(k for k in negative["available_node_types"] if k != negative["head_node_type"])
    negative["available_node_types"][worker_type]["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        prepared(negative)


def test_head_schedules_no_work_and_gpu_workers_autoscale(cluster_file):
    config = load(cluster_file)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]


def test_image_is_ray_2_60_with_cuda_and_setup_installs_the_gpu_extra(cluster_file):
    import ray

    config = load(cluster_file)
    image = config["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)", image)
    assert match, image
    assert match.group(1).split(".")[:2] == ray.__version__.split(".")[:2] == ["2", "60"]
    setup = "\n".join(config["setup_commands"])
    assert 'pip install -q -e ./client -e ".[gpu]" --extra-index-url https://pypi.nvidia.com' in setup


def test_nothing_is_exposed_and_token_auth_is_on(cluster_file):
    config = load(cluster_file)
    commands = all_commands(config)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "export RAY_AUTH_MODE=token" in commands
    assert "mobile_vla_env; ray start" in head_start
    assert "mobile_vla_env; ray start" in " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_TOKEN_PATH=/etc/mobile-vla/ray_auth_token" in commands
    assert config["file_mounts"]["/etc/mobile-vla"] == "~/.mobile_vla/cluster"
    if config["provider"]["type"] == "aws":
        # Ray adds only intra-cluster traffic and SSH; no extra inbound rule may open a port.
        assert config["provider"]["security_group"]["IpPermissions"] == []
    assert "mlflow_server.sh start" in head_start


def test_mounts_never_include_the_checkout_root(cluster_file):
    """`ray up` reads every file under each mount: `.` would mean all of .venv and data/."""
    config = load(cluster_file)
    for remote, local in config["file_mounts"].items():
        assert local.rstrip("/") not in (".", "./", ""), remote
        if local.startswith("./"):
            assert (REPO / local).exists(), local


def test_mlflow_server_script_is_valid_bash_and_uses_auth():
    script = REPO / "clusters" / "mlflow_server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--app-name basic-auth" in text
    bad = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
