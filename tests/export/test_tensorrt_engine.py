"""The TensorRT parts that need neither TensorRT nor a GPU: naming, plan selection and its refusals,
profile shapes, the fp16 mode per major version. (Building and running plans: docs/gpu.md.)"""

from __future__ import annotations

import pytest

from mobile_vla.errors import ModelError, ResourceError
from mobile_vla.export import tensorrt_engine as trt_engine
from mobile_vla.export.publish import publish_plan
from mobile_vla.export.signature import load_signature
from mobile_vla.tracking import resolve_model

GPU = "NVIDIA H100 80GB HBM3"


def test_names_and_fp16_mode():
    assert trt_engine.gpu_slug(GPU) == "nvidia-h100-80gb-hbm3"
    assert trt_engine.engine_key(GPU, "10.12.0.36") == "nvidia-h100-80gb-hbm3__trt10.12.0.36"
    assert trt_engine.fp16_mode("10.12.0") == "builder-flag"
    assert trt_engine.fp16_mode("11.4.1") == "strongly-typed"
    with pytest.raises(ResourceError, match="need 10.x"):
        trt_engine.fp16_mode("8.6.1")


def test_profile_spans_batch_one_to_max(exported_dir):
    signature = load_signature(exported_dir / "onnx")
    shapes = trt_engine.profile_shapes(signature.inputs, max_batch=32, opt_batch=8)
    assert shapes["images"] == ((1, 224, 224, 3), (8, 224, 224, 3), (32, 224, 224, 3))
    assert shapes["h_in"] == ((1, 1, 64), (1, 8, 64), (1, 32, 64))  # batch is axis 1 of the state
    assert set(shapes) == {s.name for s in signature.inputs}


def _fake_plan(model_dir, signature, gpu=GPU, version="10.12.0", sha=None, fp16=False):
    """FAKE plan: a few bytes where a TensorRT plan would be (TensorRT cannot be installed here), with a
    real build record; select_plan reads only the record and the folder, never the plan's bytes."""
    folder = model_dir / "tensorrt" / trt_engine.engine_key(gpu, version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / trt_engine.plan_file_name(fp16)).write_bytes(b"plan bytes")
    trt_engine.EngineMeta(
        gpu=gpu,
        tensorrt=version,
        precision="fp16" if fp16 else "fp32",
        fp16_mode=None,
        max_batch=32,
        opt_batch=8,
        onnx_graph="step_fp32",
        onnx_sha256=sha or signature.graphs["step_fp32"].sha256,
        model_name=None,
        model_version=None,
        build_seconds=1.0,
    ).save(folder, fp16)
    return folder


def test_select_plan_finds_the_plan_for_this_gpu(exported_copy):
    signature = load_signature(exported_copy / "onnx")
    _fake_plan(exported_copy, signature)
    plan, meta = trt_engine.select_plan(exported_copy, signature, GPU, "10.12.0", fp16=False)
    assert plan.name == "model.plan" and meta.max_batch == 32


def test_select_plan_refuses_other_gpus_versions_and_stale_plans(exported_copy):
    signature = load_signature(exported_copy / "onnx")
    _fake_plan(exported_copy, signature, gpu="NVIDIA A10G")
    with pytest.raises(
        ModelError, match=r"no plan for nvidia-h100-80gb-hbm3__trt10.12.0 \(plans here: \['nvidia-a10g__trt10.12.0'\]\)"
    ):
        trt_engine.select_plan(exported_copy, signature, GPU, "10.12.0", fp16=False)
    with pytest.raises(ModelError, match="no fp16 plan"):
        trt_engine.select_plan(exported_copy, signature, "NVIDIA A10G", "10.12.0", fp16=True)
    # a plan copied into the wrong folder: its build record says where it belongs
    folder = _fake_plan(exported_copy, signature, gpu="NVIDIA L4")
    folder.rename(exported_copy / "tensorrt" / trt_engine.engine_key(GPU, "10.12.0"))
    with pytest.raises(ModelError, match="built for 'NVIDIA L4'"):
        trt_engine.select_plan(exported_copy, signature, GPU, "10.12.0", fp16=False)
    # built from other ONNX bytes than this version's graph
    _fake_plan(exported_copy, signature, gpu="NVIDIA T4", sha="0" * 64)
    with pytest.raises(ModelError, match="stale plan"):
        trt_engine.select_plan(exported_copy, signature, "NVIDIA T4", "10.12.0", fp16=False)
    # a plan with no build record
    folder = _fake_plan(exported_copy, signature, gpu="NVIDIA A100")
    (folder / trt_engine.ENGINE_META_FILE).unlink()
    with pytest.raises(ModelError, match="build record"):
        trt_engine.select_plan(exported_copy, signature, "NVIDIA A100", "10.12.0", fp16=False)


def test_without_tensorrt_the_runtime_says_how_to_install():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ResourceError, match="extra-index-url https://pypi.nvidia.com"):
            trt_engine.require_tensorrt()
    else:
        pytest.skip("tensorrt is importable here")


def test_publish_plan_without_tensorrt_changes_nothing(exported_copy):
    """The one "ensure a plan and attach it" step (CLI --tensorrt, TensorRT serving replicas) checks
    TensorRT and the GPU before any work."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ResourceError, match="TensorRT is not installed"):
            publish_plan(resolve_model(exported_copy))
        assert not (exported_copy / "tensorrt").exists()
    else:
        pytest.skip("tensorrt is importable here")
