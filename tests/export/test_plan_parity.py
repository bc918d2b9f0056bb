"""A new TensorRT plan is run on real frames against the fp32 ONNX graph before it is written; one that
answers differently is refused, nothing is written, and the version keeps serving on ONNX Runtime.

TensorRT cannot be installed on these machines (no GPU; the PyPI wheels are stubs), so these tests put
a FAKE `tensorrt` module in sys.modules: its builder "builds" a plan that names the ONNX file, its
engine runs that file in the real ONNX Runtime behind TensorRT's name-based tensor API (shapes and
addresses per context, reading and writing the CPU tensors behind those addresses), optionally adding
an error to the actions (what a bad kernel or precision would do). The parity check, the runner, the
build lock, the failure record and the files are the real ones.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from mobile_vla.errors import ModelError
from mobile_vla.export import publish
from mobile_vla.export import tensorrt_engine as trt_engine
from mobile_vla.export.signature import load_signature
from mobile_vla.runtime import tensorrt_backend
from mobile_vla.runtime.backends import load_backend
from mobile_vla.tracking import resolve_model

GPU = "NVIDIA H100 80GB HBM3"
NUMPY = {"float": np.float32, "i64": np.int64, "u8": np.uint8, "half": np.float16}
ORT_TO_TRT = {"tensor(float)": "float", "tensor(int64)": "i64", "tensor(uint8)": "u8", "tensor(float16)": "half"}


def _array(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The array at a CPU address (what TensorRT would read or write on the GPU)."""
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return shape[0] <= self.engine.max_batch

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        batch = self.shapes["images"][0]
        spec = next(s for s in self.engine.outputs if s.name == name)
        return tuple(batch if d == "B" else d for d in spec.shape)

    def execute_async_v3(self, stream_handle):
        feeds = {
            i.name: _array(self.addresses[i.name], self.shapes[i.name], NUMPY[ORT_TO_TRT[i.type]]).copy()
            for i in self.engine.session.get_inputs()
        }
        names = [o.name for o in self.engine.session.get_outputs()]
        for name, value in zip(names, self.engine.session.run(names, feeds), strict=True):
            if name == "actions":
                value = value + self.engine.error
            _array(self.addresses[name], value.shape, np.float32)[:] = value
        return True


class _FakeEngine:
    def __init__(self, trt, onnx_path: str, error: float, max_batch: int):
        self.trt, self.error, self.max_batch = trt, error, max_batch
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.outputs = load_signature(onnx_path.rsplit("/", 1)[0]).outputs
        self.io = [(i.name, "input", ORT_TO_TRT[i.type]) for i in self.session.get_inputs()]
        self.io += [(o.name, "output", "float") for o in self.session.get_outputs()]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0]

    def get_tensor_mode(self, name):
        return next(mode for n, mode, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return next(dtype for n, _, dtype in self.io if n == name)

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeConfig:
    def __init__(self, state):
        self.state, self.max_batch = state, 0

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.state.flags.add(flag)

    def clear_flag(self, flag):
        self.state.cleared.add(flag)

    def add_optimization_profile(self, profile):
        self.max_batch = profile.max_batch


class _FakeProfile:
    max_batch = 0

    def set_shape(self, name, low, opt, high):
        self.max_batch = max(self.max_batch, high[0])


def _fake_tensorrt(state) -> types.ModuleType:
    """FAKE `tensorrt`: builder, parser, runtime; `state.error` is what the next plan adds to actions."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.3"

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return types.SimpleNamespace(path=None)

        def create_builder_config(self):
            return _FakeConfig(state)

        def create_optimization_profile(self):
            return _FakeProfile()

        def build_serialized_network(self, network, config):
            return json.dumps({"onnx": network.path, "error": state.error, "max_batch": config.max_batch}).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.path = path
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            plan = json.loads(data)
            return _FakeEngine(trt, plan["onnx"], plan["error"], plan["max_batch"])

    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, OnnxParser, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.DataType = types.SimpleNamespace(FLOAT="float", HALF="half", INT32="i32", INT64="i64", UINT8="u8", BOOL="b")
    return trt


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    """FAKE TensorRT and GPU (module docstring); the plan check runs the plan on the CPU."""
    state = types.SimpleNamespace(error=0.0, flags=set(), cleared=set())
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(state))
    for module in (publish, trt_engine, tensorrt_backend):
        monkeypatch.setattr(module, "require_cuda_gpu", lambda: GPU)
    monkeypatch.setattr(publish, "PLAN_DEVICE", "cpu")
    trt_engine.tensorrt_logger.cache_clear()
    yield state
    trt_engine.tensorrt_logger.cache_clear()


def test_a_plan_that_answers_like_onnx_is_written_with_its_figures(exported_copy, frames_dataset, fake_tensorrt):
    plan = publish.publish_plan(resolve_model(exported_copy), attach=False, max_batch=8, data_dir=frames_dataset)
    meta = json.loads((plan.parent / "engine.json").read_text())
    assert meta["tf32"] is False and "TF32" in fake_tensorrt.cleared  # fp32 plans: TF32 off
    figures = meta["parity"]
    assert figures["tolerance"] == publish.PLAN_TOLERANCE["fp32"]
    assert set(figures["max_abs_diff"]) >= {"batch_1", "batch_8"}
    assert max(d["actions"] for d in figures["max_abs_diff"].values()) <= 1e-5  # the same graph ran


def test_a_plan_over_tolerance_is_refused_and_onnx_keeps_serving(exported_copy, frames_dataset, fake_tensorrt):
    fake_tensorrt.error = 0.01  # every action off by 0.01: ten times the fp32 plan tolerance
    resolved = resolve_model(exported_copy)
    with pytest.raises(ModelError, match=r"TensorRT fp32 plan refused .*batch_1 actions max abs diff 0.01 > 0.001"):
        publish.publish_plan(resolved, attach=False, max_batch=8, data_dir=frames_dataset)
    assert sorted(p.name for p in (exported_copy / "tensorrt").rglob("*.plan")) == []  # nothing written
    with pytest.raises(ModelError, match="failed 1 time"):  # refused like a failed build: it backs off
        publish.publish_plan(resolved, attach=False, max_batch=8, data_dir=frames_dataset)
    backend = load_backend(exported_copy, prefer=("tensorrt", "onnx-cpu"))
    assert backend.name == "onnx-cpu" and "no plan" in backend.skipped["tensorrt"]


def test_a_plan_smaller_than_the_serve_batch_is_refused_at_load(
    exported_copy, frames_dataset, fake_tensorrt, monkeypatch
):
    """FAKE TensorRT (module docstring): a replica whose config batches more robots than the plan's
    profile takes does not load the plan (the chain names both sizes); one within it loads."""

    class CpuRunner(tensorrt_backend.TensorRTRunner):  # the FAKE engine reads CPU tensors
        def __init__(self, model_dir, signature, fp16=False):
            super().__init__(model_dir, signature, fp16=fp16, device="cpu")

    monkeypatch.setattr(tensorrt_backend, "TensorRTRunner", CpuRunner)
    publish.publish_plan(resolve_model(exported_copy), attach=False, max_batch=8, data_dir=frames_dataset)
    backend = load_backend(exported_copy, prefer=("tensorrt", "onnx-cpu"), max_batch_size=8)
    assert backend.name == "tensorrt" and backend.max_batch == 8
    backend = load_backend(exported_copy, prefer=("tensorrt", "onnx-cpu"), max_batch_size=16)
    assert backend.name == "onnx-cpu"
    reason = backend.skipped["tensorrt"]
    assert "max_batch_size = 16 exceeds the TensorRT plan's max batch = 8" in reason and "--max-batch 16" in reason
