"""signature.json: it describes the graphs exactly, and bad files are refused with the field named."""

from __future__ import annotations

import json

import onnx
import pytest

from mobile_vla.errors import ModelError
from mobile_vla.export.signature import (
    SIGNATURE_FILE,
    STEP_INPUTS,
    STEP_OUTPUTS,
    file_sha256,
    load_signature,
    verify_graph_file,
)

ONNX_TYPES = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}


def _graph_io(path):
    """(name, dtype, shape with symbolic dims as 'B') straight from the ONNX protobuf."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else "B" for d in tensor.shape.dim]
        return value.name, ONNX_TYPES[tensor.elem_type], dims

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def test_signature_matches_every_graph(exported_dir):
    folder = exported_dir / "onnx"
    signature = load_signature(folder)
    assert set(signature.graphs) == {"step_fp32", "step_fp16", "text_encoder"}
    for graph in signature.graphs.values():
        inputs, outputs = _graph_io(folder / graph.file)
        assert inputs == [(s.name, s.dtype, s.shape) for s in graph.inputs]
        assert outputs == [(s.name, s.dtype, s.shape) for s in graph.outputs]
        assert graph.sha256 == file_sha256(folder / graph.file)
        assert graph.bytes == (folder / graph.file).stat().st_size
    # fp32 and fp16 step graphs share the contract (fp16 keeps fp32 I/O)
    assert signature.graphs["step_fp16"].inputs == signature.graphs["step_fp32"].inputs == signature.inputs
    assert [s.name for s in signature.inputs] == STEP_INPUTS
    assert [s.name for s in signature.outputs] == STEP_OUTPUTS


def test_signature_contract_fields(exported_dir):
    """What a non-Python server needs: shapes, scaling constants, tokenizer, chunk, recurrent state."""
    from mobile_vla.policy import load_policy

    model, preprocessing = load_policy(exported_dir)
    signature = load_signature(exported_dir / "onnx")
    specs = {s.name: s for s in signature.inputs}
    assert specs["images"].dtype == "uint8" and specs["images"].shape == ["B", 224, 224, 3]
    assert specs["h_in"].shape == [1, "B", 64]
    assert specs["kosmos_input_ids"].shape == ["B", model.config.token_length]
    assert signature.signature_version == 2
    outputs = {s.name: s for s in signature.outputs}  # version 2: the safety ladder's two outputs
    assert outputs["confidence_now"].shape == ["B"]
    assert outputs["vision_features"].shape == ["B", model.vision_feature_dim]
    assert signature.has_safety_outputs
    assert signature.chunk == signature.actions.chunk == 10
    assert signature.recurrent.layers == 1 and signature.recurrent.hidden == 64
    assert signature.actions.low == preprocessing.action_low and signature.actions.high == preprocessing.action_high
    assert signature.preprocessing.state_mean == preprocessing.state_mean
    assert signature.preprocessing.image_mean == preprocessing.image_mean
    assert (exported_dir / signature.tokenizer.path).is_dir()
    assert signature.tokenizer.text_encoder == "text_encoder.onnx"
    assert signature.opset == signature.exporter.opset == 18
    assert signature.exporter.dynamo is True and signature.exporter.offline_optimisation == "ORT_ENABLE_BASIC"


def test_graphs_are_standard_onnx_for_tensorrt(exported_dir):
    """The offline optimisation must not leave ORT-only (com.microsoft) ops: TensorRT parses these files."""
    for name in ("model.onnx", "model.fp16.onnx", "text_encoder.onnx"):
        nodes = onnx.load(str(exported_dir / "onnx" / name)).graph.node
        assert {n.domain for n in nodes} <= {"", "ai.onnx"}
        onnx.checker.check_model(str(exported_dir / "onnx" / name), full_check=True)


def test_unknown_signature_version_is_refused(exported_copy):
    path = exported_copy / "onnx" / SIGNATURE_FILE
    data = json.loads(path.read_text())
    data["signature_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="signature_version = 99"):
        load_signature(path.parent)


def test_invalid_signature_names_the_field(exported_copy):
    path = exported_copy / "onnx" / SIGNATURE_FILE
    data = json.loads(path.read_text())
    data["inputs"][0]["dtype"] = "complex64"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"inputs\.0\.dtype"):
        load_signature(path.parent)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_signature(path.parent)


def test_truncated_graph_file_is_refused(exported_copy):
    folder = exported_copy / "onnx"
    signature = load_signature(folder)
    graph = signature.graphs["step_fp32"]
    data = (folder / graph.file).read_bytes()
    (folder / graph.file).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or replaced"):
        verify_graph_file(folder, graph)
