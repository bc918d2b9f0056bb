"""The shipped Serve configs must be valid for `serve deploy` (Ray's own schema) and for our app."""

import json
from pathlib import Path

import pytest
import yaml

from mobile_vla.config import validate_config
from mobile_vla.errors import ConfigError
from mobile_vla.serve.app import ServeAppConfig
from mobile_vla.serve.settings import ingress_limits

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "serve_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_ray_schema_and_app_args(path):
    from ray.serve.schema import ServeDeploySchema

    text = path.read_text()
    assert text.startswith("# Launch:") and "serve" in text.splitlines()[0]  # how to launch it, first
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = schema.applications[0]
    assert app.import_path == "mobile_vla.serve.app:build_app"
    args = validate_config(app.args, ServeAppConfig, str(path))
    names = {d.name for d in app.deployments}
    expected = {"PolicyIngress", {"onnx": "OnnxPolicy", "tensorrt": "TensorRTPolicy"}[args.primary]}
    if args.fallback:
        expected.add("OnnxPolicy")
    assert names == expected
    _, ingress_ongoing = ingress_limits(args.max_pending_requests, args.max_batch_size)
    for deployment in app.deployments:
        if deployment.name != "PolicyIngress" and deployment.max_ongoing_requests is not None:
            assert deployment.max_ongoing_requests >= args.max_batch_size
        if deployment.name == "PolicyIngress":  # Serve must not admit past the ingress's own gate (issue 16)
            written = deployment.model_dump(exclude_unset=True)
            limit = written.get("max_ongoing_requests")
            assert limit is None or limit == ingress_ongoing, (limit, ingress_ongoing)
            target = (written.get("autoscaling_config") or {}).get("target_ongoing_requests")
            assert target is None or target < ingress_ongoing, (target, ingress_ongoing)


def test_the_import_path_builder_takes_only_the_args():
    # Serve refuses an application builder with any parameter besides the config's args (the drills
    # go through compose_app instead).
    import inspect

    from mobile_vla.serve.app import build_app

    assert list(inspect.signature(build_app).parameters) == ["args"]


def test_local_config_binds_loopback_only():
    data = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    assert data["http_options"]["host"] == "127.0.0.1"
    assert ServeAppConfig.model_validate(data["applications"][0]["args"]).primary == "onnx"


def test_bad_app_args_name_field_and_value():
    with pytest.raises(ConfigError, match="max_batch_size"):
        validate_config({"max_batch_size": 0}, ServeAppConfig, "args")
    with pytest.raises(ConfigError, match="unknown key 'batch'"):
        validate_config({"batch": 4}, ServeAppConfig, "args")
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        validate_config({"max_batch_size": 64, "max_ongoing_requests": 8}, ServeAppConfig, "args")


def test_openapi_document_is_current():
    from mobile_vla.serve.openapi_doc import openapi_document

    saved = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert saved == openapi_document(), "regenerate: python -m mobile_vla.serve.openapi_doc docs/openapi.json"
    assert {"/v1/act", "/v1/feedback", "/v1/model", "/healthz", "/readyz"} <= set(saved["paths"])


def test_mobile_vla_serve_pins_loopback_and_names_bad_fields(tmp_path, capsys):
    from mobile_vla.serve.commands import load_serve_config

    config = load_serve_config(ROOT / "serve_configs" / "gpu.yaml", port=8123, model_uri="models:/other/2")
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8123)
    assert config.applications[0].args["model_uri"] == "models:/other/2"
    assert "replaced by 127.0.0.1" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: mobile_vla.serve.app:build_app\n    route_prefix: 7\n")
    with pytest.raises(ConfigError, match="bad.yaml: applications.0.route_prefix"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_serve_config(tmp_path / "missing.yaml")


def test_replica_grpc_messages_fit_a_full_batch_of_frames(monkeypatch):
    # Throughput mode sends replica-to-replica calls over gRPC (4 MiB by default = 27 decoded frames);
    # a batch of 64 robots' frames is ~9.6 MB and must fit, or every large batch fails.
    from mobile_vla.serve.app import FRAME_BYTES, _replica_env

    monkeypatch.delenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", raising=False)
    assert int(_replica_env(64)["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 64 * FRAME_BYTES
    assert int(_replica_env(1)["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) == 4 * 1024 * 1024
    monkeypatch.setenv("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", "123456789")  # an operator's choice wins
    assert _replica_env(64)["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == "123456789"


def test_serve_command_proxy_environment(monkeypatch):
    from mobile_vla.serve.commands import proxy_environment

    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    monkeypatch.delenv(drain, raising=False)
    # no HAProxy unless asked; a stopping replica is not held 30 s for a load balancer a local Ray does not have
    assert proxy_environment(False) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", drain: "0"}
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    monkeypatch.setenv(drain, "5")
    assert proxy_environment(False) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", drain: "5"}  # the operator's values hold
    assert proxy_environment(True) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        drain: "5",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
    }


def test_test_only_drills_are_no_app_argument():
    # Fault injection and the fake engine-build pause reach the primary only through compose_app(drill=...).
    from mobile_vla.serve.drills import DrillConfig, DrillPolicyConfig
    from mobile_vla.serve.settings import PolicyUserConfig

    for key, value in [("primary_faults", [{"mode": "error"}]), ("primary_prepare_delay_s", 5.0)]:
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            validate_config({key: value}, ServeAppConfig, "args")
    with pytest.raises(ValueError, match="faults"):
        PolicyUserConfig.model_validate({"model_uri": "models:/m/1", "faults": []})
    drill = DrillConfig(primary_faults=[{"mode": "slow", "delay_s": 2}], primary_prepare_delay_s=3)
    primary = drill.policy_config(PolicyUserConfig(model_uri="models:/m/1", max_batch_size=8))
    assert isinstance(primary, DrillPolicyConfig) and primary.max_batch_size == 8
    assert (primary.faults[0].robot_prefix, primary.prepare_delay_s) == ("drill-", 3)


def test_serving_reads_the_runtime_backend_table():
    from typing import get_args

    from mobile_vla.runtime import BACKEND_NAMES
    from mobile_vla.serve.schemas import ActResponse
    from mobile_vla.serve.settings import POLICY_BACKENDS, FallbackKind

    assert get_args(ActResponse.model_fields["backend"].annotation) == BACKEND_NAMES
    for kind, backends in POLICY_BACKENDS.items():
        assert backends and set(backends) <= set(BACKEND_NAMES), kind
    assert set(get_args(ServeAppConfig.model_fields["primary"].annotation)) == set(POLICY_BACKENDS)
    # GPU placement follows the table's gpu flags: a kind reserves a GPU only when it cannot run without one
    from mobile_vla.runtime import BACKENDS
    from mobile_vla.serve.deployments import REPLICA_RESOURCES

    for kind, backends in POLICY_BACKENDS.items():
        assert ("num_gpus" in REPLICA_RESOURCES[kind]) == all(BACKENDS[name].gpu for name in backends), kind
    fallback_kinds = get_args(FallbackKind)
    assert fallback_kinds and all("num_gpus" not in REPLICA_RESOURCES[kind] for kind in fallback_kinds)
