"""TensorRTRunner driven from two threads at once, as the policy replica does (two concurrent batches,
each through asyncio.to_thread).

TensorRT cannot be installed on these machines (no GPU; the PyPI wheels are stubs), so every test here
runs the real runner against a FAKE `tensorrt` module put in sys.modules: its execution context keeps
the shapes and addresses of the call in progress, as TensorRT's does, and reads and writes the CPU
tensors behind those addresses. Without the runner's lock two threads overwrite each other's bindings
and get each other's (or no) answers: the first test fails on the runner of commit fe8ea8a.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.errors import ModelError
from mobile_vla.export import tensorrt_engine
from mobile_vla.runtime import tensorrt_backend

GPU = "NVIDIA H100 80GB HBM3"
WIDTH = 4  # the fake engine's feature width: x [B, 4] -> y [B, 4] = 2 x + 1


def _view(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array at a CPU address (what TensorRT would read or write on the GPU)."""
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


class _FakeContext:
    """FAKE IExecutionContext: per-context shapes and addresses, like TensorRT's; refuses batch > 32."""

    def __init__(self, refuse_address: bool = False):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.refuse_address = refuse_address

    def set_input_shape(self, name, shape):
        time.sleep(0)  # let another thread in between the calls, as a GIL switch would
        if shape[0] > 32:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        time.sleep(0)
        if self.refuse_address:
            return False
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"] if name == "y" else self.shapes[name]

    def execute_async_v3(self, stream_handle):
        x = _view(self.addresses["x"], self.shapes["x"]).copy()
        time.sleep(0.0005)  # the kernels run; another thread may rebind meanwhile
        _view(self.addresses["y"], self.shapes["x"])[:] = 2.0 * x + 1.0
        return True


class _FakeEngine:
    def __init__(self, trt, context):
        self._trt = trt
        self._context = context
        self.num_io_tensors = 2

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_mode(self, name):
        return self._trt.TensorIOMode.INPUT if name == "x" else self._trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._trt.DataType.FLOAT

    def create_execution_context(self):
        return self._context


def _fake_tensorrt(context: _FakeContext) -> types.ModuleType:
    """FAKE `tensorrt` module: the names the runner touches, nothing else."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.3"
    trt.Builder = object  # require_tensorrt tells the PyPI stub apart by this attribute

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data):
            return _FakeEngine(trt, context)

    trt.ILogger = ILogger
    trt.Runtime = Runtime
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.DataType = types.SimpleNamespace(FLOAT="float", HALF="half", INT32="i32", INT64="i64", UINT8="u8", BOOL="b")
    return trt


def _runner(monkeypatch, tmp_path: Path, context: _FakeContext) -> tensorrt_backend.TensorRTRunner:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(context))
    tensorrt_engine.tensorrt_logger.cache_clear()
    monkeypatch.setattr(tensorrt_backend, "require_cuda_gpu", lambda: GPU)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"FAKE plan")
    meta = types.SimpleNamespace(max_batch=32)
    monkeypatch.setattr(tensorrt_backend, "select_plan", lambda *args: (plan, meta))
    x, y = types.SimpleNamespace(name="x"), types.SimpleNamespace(name="y")
    signature = types.SimpleNamespace(inputs=[x], outputs=[y])
    runner = tensorrt_backend.TensorRTRunner(tmp_path, signature, device="cpu")
    tensorrt_engine.tensorrt_logger.cache_clear()  # the next test's fake module gets its own
    return runner


def test_two_threads_each_get_their_own_answers(monkeypatch, tmp_path):
    """FAKE TensorRT (see the module docstring). 2 threads x 60 calls, every call with distinct inputs
    and batch sizes: each must get 2 x + 1 of its own x."""
    runner = _runner(monkeypatch, tmp_path, _FakeContext())
    calls = 60
    start = threading.Barrier(2)
    wrong: list[str] = []

    def caller(worker: int) -> None:
        start.wait()
        for i in range(calls):
            batch = 1 + (i + worker) % 5
            x = torch.full((batch, WIDTH), float(worker * 1000 + i))
            y = runner.run({"x": x})["y"]
            if y.shape != x.shape or not torch.equal(y, 2 * x + 1):
                wrong.append(f"worker {worker} call {i}: {y[:, 0].tolist()} for x = {x[0, 0].item()}")

    threads = [threading.Thread(target=caller, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} of {2 * calls} calls got another call's answer, e.g. {wrong[:3]}"


def test_refused_shapes_and_addresses_raise_a_clear_error(monkeypatch, tmp_path):
    """FAKE TensorRT: a False from set_input_shape / set_tensor_address is an error naming the tensor."""
    runner = _runner(monkeypatch, tmp_path, _FakeContext())
    with pytest.raises(ModelError, match=r"refused input 'x' of shape \(33, 4\).*batch 1..32"):
        runner.run({"x": torch.zeros(33, WIDTH)})
    with pytest.raises(ModelError, match=r"feeds lack the inputs \['x'\]"):
        runner.run({})
    runner = _runner(monkeypatch, tmp_path, _FakeContext(refuse_address=True))
    with pytest.raises(ModelError, match="refused the address of tensor 'x'"):
        runner.run({"x": torch.zeros(2, WIDTH)})
