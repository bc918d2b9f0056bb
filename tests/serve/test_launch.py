"""How `mobile-vla serve` deploys a Serve config (serve/launch.py, serve/deploy_options.py), without Ray:
a config's deployment options merged over the code's without dropping the replicas' environment, what a
stop deletes (never the fleet's application on a cluster unless asked), and the shipped configs' own
environment for Ray's `serve deploy`, which replaces `ray_actor_options` whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mobile_vla.errors import ConfigError
from mobile_vla.serve.deploy_options import (
    DeploymentOverrides,
    grpc_limit_shortfall,
    grpc_message_bytes,
    merge_deployment_options,
)
from mobile_vla.serve.launch import shutdown_on_exit, stop_serving

ROOT = Path(__file__).resolve().parents[2]
GRPC = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
CODE = {
    "max_ongoing_requests": 64,
    "user_config": {"model_uri": "models:/m/1"},
    "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {GRPC: "21364736", "MOBILE_VLA_HOME": "/code"}}},
}


def test_config_actor_options_keep_the_code_environment():
    # serve_configs/gpu.yaml's TensorRTPolicy entry: Serve's own override would leave only num_cpus/num_gpus
    entry = {
        "name": "TensorRTPolicy",
        "max_ongoing_requests": 128,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5},
    }
    merged = merge_deployment_options(CODE, entry)
    assert merged == {
        "max_ongoing_requests": 128,
        "user_config": {"model_uri": "models:/m/1"},
        "ray_actor_options": {
            "num_cpus": 2,
            "num_gpus": 0.5,
            "runtime_env": {"env_vars": {GRPC: "21364736", "MOBILE_VLA_HOME": "/code"}},
        },
    }
    assert "runtime_env" not in entry["ray_actor_options"] and CODE["ray_actor_options"]["num_cpus"] == 1  # unchanged


def test_environment_precedence_is_app_then_code_then_deployment():
    app_env = {"working_dir": "local://app", "env_vars": {"MOBILE_VLA_HOME": "/app", "ONLY_APP": "a"}}
    entry = {"ray_actor_options": {"runtime_env": {"env_vars": {GRPC: "999"}}}}
    env = merge_deployment_options(CODE, entry, app_env)["ray_actor_options"]["runtime_env"]
    # as Serve merges an app's runtime_env under a deployment's: the code's own value beats the app's,
    # an operator's per-deployment value beats both; other fields of the app's runtime_env carry over
    assert env == {"working_dir": "local://app", "env_vars": {"MOBILE_VLA_HOME": "/code", "ONLY_APP": "a", GRPC: "999"}}
    assert merge_deployment_options({"num_replicas": 2}) == {"num_replicas": 2}  # nothing to add: no empty options


def test_overrides_name_a_deployment_the_app_lacks():
    overrides = DeploymentOverrides(deployments={"TensorRTPolicy": {}, "Typo": {}}, source="gpu.yaml")
    with pytest.raises(ConfigError, match=r"gpu.yaml: deployments: Typo is not a deployment .*OnnxPolicy"):
        overrides.check_names({"PolicyIngress", "OnnxPolicy", "TensorRTPolicy"})
    DeploymentOverrides().check_names({"PolicyIngress"})


def test_stop_deletes_only_when_asked_and_never_serve_on_a_cluster(monkeypatch, capsys):
    from ray import serve

    calls = []
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name, *a, **k: calls.append(f"delete {name}"))
    cases = [  # (--shutdown-on-exit flag, attached to RAY_ADDRESS) -> Serve calls on Ctrl-C
        ((None, True), []),  # an operator's Ctrl-C against the fleet's cluster: the application stays
        ((False, True), []),
        ((True, True), ["delete mobile-vla"]),  # asked: our application only, Serve and other apps stay
        ((None, False), ["shutdown"]),  # its own local Ray: everything goes
        ((True, False), ["shutdown"]),
    ]
    for (flag, attached), expected in cases:
        calls.clear()
        stop_serving(["mobile-vla"], shutdown=shutdown_on_exit(flag, attached), attached=attached)
        assert calls == expected, (flag, attached)
    assert "left ['mobile-vla'] running" in capsys.readouterr().out


def test_cli_flags_keep_the_old_contract():
    from mobile_vla.cli import build_parser

    parser = build_parser()
    old = parser.parse_args(["serve", "--config", "serve_configs/local.yaml", "--port", "8001"])
    assert old.shutdown_on_exit is None and old.dashboard_port == 8265 and old.port == 8001
    assert parser.parse_args(["serve", "--shutdown-on-exit"]).shutdown_on_exit is True
    assert parser.parse_args(["serve", "--no-shutdown-on-exit", "--dashboard-port", "8300"]).shutdown_on_exit is False


def test_mobile_vla_serve_builds_only_the_platform_app(tmp_path):
    from ray.serve.schema import ServeApplicationSchema

    from mobile_vla.serve.launch import build_application

    app = ServeApplicationSchema.model_validate({"name": "other", "import_path": "my_pkg.app:build"})
    with pytest.raises(ConfigError, match=r"import_path = 'my_pkg.app:build'.*serve deploy"):
        build_application(app, "x.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "serve_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_give_replicas_the_grpc_limit_under_serve_deploy(path, monkeypatch):
    # Ray's `serve deploy` keeps only the app-level runtime_env of a deployment whose ray_actor_options the
    # config sets: such a config must carry the gRPC limit there, sized as the code sizes it.
    from mobile_vla.serve.app import _replica_env
    from mobile_vla.serve.settings import DEFAULT_MAX_BATCH_SIZE

    monkeypatch.delenv(GRPC, raising=False)
    for app in yaml.safe_load(path.read_text())["applications"]:
        if not any("ray_actor_options" in d for d in app.get("deployments", [])):
            continue
        needed = int(_replica_env(app["args"].get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))[GRPC])
        carried = (app.get("runtime_env") or {}).get("env_vars", {}).get(GRPC)
        assert carried is not None and int(carried) >= needed, f"{path.name}: {app['name']}: {GRPC} = {carried}"


def test_a_replica_names_a_grpc_limit_too_small_for_its_batches():
    # what a policy replica logs at start when a config dropped the limit the code sets (Ray's `serve deploy`)
    assert grpc_message_bytes(64) == 21364736 and grpc_message_bytes(8) == 4 * 1024 * 1024
    assert grpc_limit_shortfall(8, {}) is None  # 8 frames fit gRPC's default 4 MiB
    assert grpc_limit_shortfall(64, {GRPC: "21364736"}) is None
    missing = grpc_limit_shortfall(64, {})
    assert missing is not None and f"{GRPC} = 4194304" in missing and "21364736" in missing
    assert "runtime_env" in missing  # says where to set it
    assert "no number" in grpc_limit_shortfall(64, {GRPC: "lots"})
