"""Plan builds on one node: atomic plan + engine.json, one builder at a time, a backoff after a failure.

TensorRT cannot be installed on these machines (no GPU; the PyPI wheels are stubs), so the tests that
go through `publish_plan` replace `require_tensorrt`, `require_cuda_gpu` and `build_engine` with FAKES
(a module with a version string, a GPU name, a builder that writes a few bytes through the real
`save_plan`); the lock, the plan selection, the failure record and the files are the real ones.
The last tests check that the plans' max batch follows the serve configs' `max_batch_size`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from mobile_vla.errors import ModelError
from mobile_vla.export import publish
from mobile_vla.export import tensorrt_engine as trt_engine
from mobile_vla.export.signature import load_signature
from mobile_vla.tracking import resolve_model

GPU = "NVIDIA H100 80GB HBM3"
VERSION = "10.13.3"


def _meta(signature, fp16=False, max_batch=32) -> trt_engine.EngineMeta:
    return trt_engine.EngineMeta(
        gpu=GPU,
        tensorrt=VERSION,
        precision="fp16" if fp16 else "fp32",
        fp16_mode=None,
        max_batch=max_batch,
        opt_batch=8,
        onnx_graph="step_fp32",
        onnx_sha256=signature.graphs["step_fp32"].sha256,
        model_name=None,
        model_version=None,
        build_seconds=1.0,
    )


def _leftovers(model_dir):
    return sorted(p.name for p in (model_dir / "tensorrt").rglob("*.tmp"))


def test_save_plan_writes_plan_and_record_whole(exported_copy, monkeypatch):
    signature = load_signature(exported_copy / "onnx")
    folder = trt_engine.save_plan(exported_copy, _meta(signature), b"FAKE plan 1")
    assert (folder / "model.plan").read_bytes() == b"FAKE plan 1"
    assert json.loads((folder / "engine.json").read_text())["tensorrt"] == VERSION
    assert _leftovers(exported_copy) == []

    def rename_fails(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(trt_engine.os, "replace", rename_fails)
    with pytest.raises(OSError, match="disk full"):
        trt_engine.save_plan(exported_copy, _meta(signature), b"FAKE plan 2")
    assert (folder / "model.plan").read_bytes() == b"FAKE plan 1"  # the old plan stays whole
    assert _leftovers(exported_copy) == []  # and no temporary file is left behind
    assert sorted(p.name for p in folder.iterdir()) == ["engine.json", "model.plan"]  # nothing else gets attached


@pytest.fixture()
def fake_builder(monkeypatch):
    """FAKE TensorRT and GPU for publish_plan; `builds` counts build_engine calls, `fail` makes them raise."""
    state = types.SimpleNamespace(builds=0, fail=False)

    def build_engine(model_dir, signature, max_batch, fp16, check=None):
        state.builds += 1
        time.sleep(0.2)  # a build takes a while: a second builder arrives meanwhile
        if state.fail:
            raise ModelError("FAKE parser error")
        return trt_engine.save_plan(model_dir, _meta(signature, fp16, max_batch), b"FAKE plan")

    monkeypatch.setattr(publish, "require_tensorrt", lambda: types.SimpleNamespace(__version__=VERSION))
    monkeypatch.setattr(publish, "require_cuda_gpu", lambda: GPU)
    monkeypatch.setattr(publish, "build_engine", build_engine)
    return state


def test_two_builders_on_one_node_build_once(exported_copy, fake_builder):
    """FAKE TensorRT (module docstring): two replicas of one node asking at once get one build."""
    resolved = resolve_model(exported_copy)
    plans, start = [], threading.Barrier(2)

    def builder():
        start.wait()
        plans.append(publish.publish_plan(resolved, attach=False))

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake_builder.builds == 1
    assert len(plans) == 2 and plans[0] == plans[1] and plans[0].read_bytes() == b"FAKE plan"
    assert _leftovers(exported_copy) == []


def test_a_failed_build_backs_off(exported_copy, fake_builder):
    """FAKE TensorRT (module docstring): after a failure no build starts until the backoff has passed."""
    resolved = resolve_model(exported_copy)
    fake_builder.fail = True
    with pytest.raises(ModelError, match="FAKE parser error"):
        publish.publish_plan(resolved, attach=False)
    with pytest.raises(ModelError, match=r"failed 1 time\(s\) here, last: ModelError: FAKE parser error; next try in"):
        publish.publish_plan(resolved, attach=False)
    assert fake_builder.builds == 1  # the second call did not build

    failures = trt_engine.BuildFailures(exported_copy, GPU, VERSION, fp16=False)
    record = json.loads(failures.path.read_text())
    assert record["failures"] == 1
    assert record["retry_after"] - time.time() == pytest.approx(trt_engine.BUILD_RETRY_BASE_S, abs=60)
    record["retry_after"] = 0  # the backoff has passed
    failures.path.write_text(json.dumps(record))
    with pytest.raises(ModelError, match="FAKE parser error"):
        publish.publish_plan(resolved, attach=False)
    assert fake_builder.builds == 2
    record = json.loads(failures.path.read_text())
    assert record["failures"] == 2  # the wait doubles
    assert record["retry_after"] - time.time() == pytest.approx(2 * trt_engine.BUILD_RETRY_BASE_S, abs=60)

    fake_builder.fail = False  # a forced rebuild ignores the backoff; its success clears the record
    plan = publish.publish_plan(resolved, rebuild=True, attach=False)
    assert plan.read_bytes() == b"FAKE plan" and not failures.path.exists()


def test_backoff_is_capped_and_other_graphs_go_ahead(tmp_path):
    now = [1000.0]
    failures = trt_engine.BuildFailures(tmp_path, GPU, VERSION, fp16=True, clock=lambda: now[0])
    (tmp_path / "tensorrt").mkdir()
    delays = [failures.record("graphs-a", "boom") for _ in range(10)]
    assert delays[:3] == [
        trt_engine.BUILD_RETRY_BASE_S,
        2 * trt_engine.BUILD_RETRY_BASE_S,
        4 * trt_engine.BUILD_RETRY_BASE_S,
    ]
    assert max(delays) == trt_engine.BUILD_RETRY_CAP_S
    with pytest.raises(ModelError, match="model.fp16.plan failed 10 time"):
        failures.check("graphs-a")
    failures.check("graphs-b")  # a new export: no backoff
    now[0] += trt_engine.BUILD_RETRY_CAP_S + 1
    failures.check("graphs-a")
    assert os.path.basename(failures.path).startswith(".")  # hidden, beside (not in) the plan folder


# -- the plan's max batch follows the serve config ------------------------------------------------

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").glob("*.yaml"))
GPU_DOC = Path(__file__).resolve().parents[2] / "docs" / "gpu.md"


def _plan_max_batch(plan) -> int:
    return json.loads((plan.parent / "engine.json").read_text())["max_batch"]


def test_a_plan_smaller_than_the_serve_batch_is_refused_by_name():
    with pytest.raises(ModelError) as refused:
        trt_engine.check_plan_batch(32, 64, "tensorrt/x/model.plan")
    message = str(refused.value)
    assert "max_batch_size = 64" in message and "max batch = 32" in message and "2 calls" in message
    assert "--max-batch 64" in message and "tensorrt/x/model.plan" in message
    trt_engine.check_plan_batch(64, 64, "p")  # equal or larger: fine
    trt_engine.check_plan_batch(64, 8, "p")
    trt_engine.check_plan_batch(8, None, "p")  # no serve config: nothing to check


def test_provisioning_rebuilds_a_plan_smaller_than_the_deployment_batch(exported_copy, fake_builder):
    """FAKE TensorRT (module docstring): a 32 plan (the CLI default) is rebuilt for a deployment that
    batches 64; a plan at or above the deployment's batch is kept."""
    from mobile_vla.serve.engine_provision import ensure_engine

    assert _plan_max_batch(publish.publish_plan(resolve_model(exported_copy), max_batch=32, attach=False)) == 32
    plan = ensure_engine(str(exported_copy), max_batch_size=64)
    assert _plan_max_batch(plan) == 64 and fake_builder.builds == 2
    assert _plan_max_batch(ensure_engine(str(exported_copy), max_batch_size=48)) == 64  # kept: takes 48
    assert _plan_max_batch(publish.publish_plan(resolve_model(exported_copy), max_batch=32, attach=False)) == 64
    assert fake_builder.builds == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_batch_matches_the_plans_built_for_it(path, exported_copy, fake_builder):
    """FAKE TensorRT (module docstring). For every shipped serve config: the plan a TensorRT replica
    provisions for its `max_batch_size` (PolicyUserConfig -> _prepare_version -> ensure_engine) takes
    a full batch in one call and passes the load-time check; and when the config batches more than
    `mobile-vla export --tensorrt` builds by default, the config and docs/gpu.md give the export
    command with a `--max-batch` that covers it (plans built at promotion, not in replicas)."""
    from mobile_vla.config import validate_config
    from mobile_vla.export.commands import register
    from mobile_vla.serve.app import ServeAppConfig
    from mobile_vla.serve.deployments import TensorRTReplica
    from mobile_vla.serve.settings import PolicyUserConfig

    text = path.read_text()
    args = validate_config(yaml.safe_load(text)["applications"][0]["args"], ServeAppConfig, str(path))
    config = PolicyUserConfig(model_uri=str(exported_copy), max_batch_size=args.max_batch_size)
    TensorRTReplica._prepare_version(object.__new__(TensorRTReplica), config)
    plan = publish.publish_plan(resolve_model(exported_copy), attach=False)  # what the replica left there
    assert _plan_max_batch(plan) >= args.max_batch_size
    trt_engine.check_plan_batch(_plan_max_batch(plan), args.max_batch_size, plan)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cli_default = parser.parse_args(["export", "--model", "m", "--tensorrt"]).max_batch
    if args.max_batch_size > cli_default:
        for where, source in ((path.name, text), ("docs/gpu.md", GPU_DOC.read_text())):
            given = [int(n) for n in re.findall(r"--tensorrt[^\n]*--max-batch (\d+)", source)]
            assert given and min(given) >= args.max_batch_size, (where, given, args.max_batch_size)
