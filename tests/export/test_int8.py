"""int8: the pixel-normalisation fold, the quantized step graph on a real export, its parity refusal,
and choosing it like any other precision (runtime, serve config, evaluate). Real ONNX Runtime throughout.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mobile_vla.config import validate_config
from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.export import quantize
from mobile_vla.export.onnx_export import add_int8
from mobile_vla.export.signature import load_signature
from mobile_vla.runtime.backends import load_backend
from mobile_vla.serve.settings import ServeAppConfig


def _patch_graph(pads: list[int], pooled: bool = False) -> onnx.ModelProto:
    """uint8 NHWC frames -> Cast -> * scale[3] + shift[3] -> Transpose -> Conv 4x4 stride 4 (+ bias)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0.02, 0.015, 0.01], np.float32), "scale"),
        numpy_helper.from_array(np.array([-1.5, -1.0, -0.5], np.float32), "shift"),
        numpy_helper.from_array(rng.normal(size=(5, 3, 4, 4)).astype(np.float32), "weight"),
        numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["normalised"]),
        helper.make_node("Transpose", ["normalised"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["nchw", "weight", "bias"], ["patches"], kernel_shape=[4, 4], strides=[4, 4], pads=pads
        ),
    ]
    outputs = [helper.make_tensor_value_info("patches", TensorProto.FLOAT, None)]
    if pooled:  # e.g. image statistics for novelty, read from the same normalised frames
        nodes.append(helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]))
        outputs.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "patches",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 8, 8, 3])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run_all(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def _run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return _run_all(model, images)[0]


def test_fold_moves_the_pixel_normalisation_into_the_patch_conv():
    images = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    model = _patch_graph(pads=[0, 0, 0, 0])
    before = _run(model, images)
    assert quantize.fold_pixel_affine(model) == 1
    assert sorted(n.op_type for n in model.graph.node) == ["Cast", "Conv", "Transpose"]  # Mul and Add gone
    np.testing.assert_allclose(_run(model, images), before, rtol=1e-5, atol=1e-4)

    pooled = _patch_graph(pads=[0, 0, 0, 0], pooled=True)  # another reader of the normalised frames
    before = _run_all(pooled, images)
    assert quantize.fold_pixel_affine(pooled) == 1
    ops = [n.op_type for n in pooled.graph.node]
    assert ops.count("Mul") == 1 and ops.count("Transpose") == 1  # one channel-first normalisation left
    for got, want in zip(_run_all(pooled, images), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    padded = _patch_graph(pads=[1, 1, 1, 1])  # padded zeros would be normalised differently: left alone
    assert quantize.fold_pixel_affine(padded) == 0
    assert "Mul" in [n.op_type for n in padded.graph.node]


@pytest.fixture(scope="module")
def int8_dir(exported_dir, frames_dataset, tmp_path_factory):
    """The session's tiny export (fp32 + fp16) with model.int8.onnx added, calibrated on dataset frames."""
    target = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(exported_dir, target)
    add_int8(target, data_dir=frames_dataset)
    return target


def test_add_int8_writes_a_checked_graph_and_its_figures(int8_dir):
    signature = load_signature(int8_dir / "onnx")
    graph = signature.graphs["step_int8"]
    assert graph.precision == "int8" and graph.file == quantize.STEP_INT8_FILE
    assert (int8_dir / "onnx" / graph.file).stat().st_size < 0.75 * signature.graphs[
        "step_fp32"
    ].bytes  # token tables stay fp32
    assert "quantize_static" in signature.exporter.int8_quantizer
    figures = signature.parity.int8
    window = signature.preprocessing.window
    assert set(figures.max_abs_diff) == {"batch_1", "batch_32", f"sequence_{window}"}
    assert quantize.int8_failures(figures) == []
    assert {"actions", "confidence", "h", "c"} <= set(figures.max_abs_diff["batch_32"])
    assert figures.calibration != figures.frames  # calibration frames are not the parity frames
    ops = {n.op_type for n in onnx.load(str(int8_dir / "onnx" / graph.file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_serves_like_the_other_precisions(int8_dir, real_frames):
    fp32 = load_backend(int8_dir, prefer=("onnx-cpu",))
    int8 = load_backend(int8_dir, prefer=("tensorrt", "onnx-cpu"), int8=True)  # TensorRT: no int8 plans
    assert int8.name == "onnx-cpu" and int8.precision == "int8"
    assert "int8" in int8.skipped["tensorrt"]
    state = np.zeros((4, 3), np.float32)
    texts = ["go to the red box"] * 4
    a, b = fp32.predict(real_frames[:4], state, texts), int8.predict(real_frames[:4], state, texts)
    assert a.actions.shape == b.actions.shape
    assert not np.array_equal(a.actions, b.actions)  # a different graph ran
    assert np.abs(a.confidence - b.confidence).max() <= quantize.INT8_CONFIDENCE_TOLERANCE
    with pytest.raises(ConfigError, match="fp16 and int8 exclude each other"):
        load_backend(int8_dir, prefer=("onnx-cpu",), fp16=True, int8=True)


def test_int8_out_of_tolerance_is_refused_and_nothing_changes(exported_copy, frames_dataset, monkeypatch):
    before = (exported_copy / "onnx" / "signature.json").read_text()
    monkeypatch.setattr(quantize, "INT8_ACTIONS_TOLERANCE", 0.0)  # any rounding is now too much
    with pytest.raises(ModelError, match=r"int8 export refused.*actions max abs diff .* > 0 .*no model.int8.onnx"):
        add_int8(exported_copy, data_dir=frames_dataset)
    assert (exported_copy / "onnx" / "signature.json").read_text() == before
    assert sorted(p.name for p in (exported_copy / "onnx").glob("*int8*")) == []
    with pytest.raises(ModelError, match=r"no step_int8 graph \(export with --int8\)"):
        load_backend(exported_copy, prefer=("onnx-cpu",), int8=True)


def test_serve_config_takes_int8_for_onnx_policies_only():
    assert validate_config({"int8": True}, ServeAppConfig, "args").int8
    with pytest.raises(ConfigError, match="int8 = true and fp16 = true"):
        validate_config({"int8": True, "fp16": True}, ServeAppConfig, "args")
    with pytest.raises(ConfigError, match="TensorRT has no int8 plans"):
        validate_config({"int8": True, "primary": "tensorrt", "fallback": "onnx"}, ServeAppConfig, "args")


def test_signature_records_int8_for_other_readers(int8_dir):
    data = json.loads((int8_dir / "onnx" / "signature.json").read_text())
    assert data["graphs"]["step_int8"]["precision"] == "int8"
    assert data["parity"]["int8"]["actions_tolerance"] == quantize.INT8_ACTIONS_TOLERANCE
