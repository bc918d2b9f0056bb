"""The ONNX Runtime step through IO binding (`run_bound`, what CUDA sessions use) answers exactly like
plain `session.run`, on the real onnxruntime (CPU: no CUDA here) and the exported tiny model; which
path a provider gets, and its switch."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.runtime import onnx_backend
from mobile_vla.runtime.backends import load_backend


@pytest.fixture(scope="module")
def cpu_backend(exported_dir):
    backend = load_backend(exported_dir, prefer=("onnx-cpu",), threads=1)
    yield backend
    backend.close()


def test_bound_and_plain_runs_give_identical_outputs(cpu_backend):
    """The backend's step both ways, from the same non-zero memory: the same actions, confidence, memory."""
    assert cpu_backend.binding_device is None  # auto on the CPU: plain run
    frames = _frames(3, cpu_backend.image_size)
    state = np.linspace(-1, 1, 3 * cpu_backend.state_dim, dtype=np.float32).reshape(3, -1)  # [3, S]
    instructions = ["go to the red box", "turn left", "stop near the wall"]
    first = cpu_backend.predict(frames, state, instructions)
    assert np.abs(first.memory[0]).max() > 0  # the memory carried into the next step is not zero
    plain = cpu_backend.predict(frames, state, instructions, memory=first.memory)
    cpu_backend.binding_device = "cpu"  # what MOBILE_VLA_ORT_IO_BINDING=1 gives a CPU session
    try:
        bound = cpu_backend.predict(frames, state, instructions, memory=first.memory)
    finally:
        cpu_backend.binding_device = None
    np.testing.assert_array_equal(bound.actions, plain.actions)
    np.testing.assert_array_equal(bound.confidence, plain.confidence)
    for got, want in zip(bound.memory, plain.memory, strict=True):
        np.testing.assert_array_equal(got, want)


def _frames(batch: int, size: int) -> np.ndarray:
    """Noise frames [B, H, W, 3] uint8 (rendering MiniWorld takes seconds; any pixels do here)."""
    return np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _step_feeds(backend, batch: int) -> dict[str, np.ndarray]:
    """The step graph's feeds for `batch` robots, as the backend builds them (captured from predict)."""
    captured = {}
    step = backend._step
    backend._step = lambda feeds: captured.update(feeds) or step(feeds)
    try:
        frames = _frames(batch, backend.image_size)
        backend.predict(frames, np.zeros((batch, backend.state_dim), np.float32), ["go to the red box"] * batch)
    finally:
        del backend._step
    return captured


def test_run_bound_matches_run_on_the_step_session(cpu_backend):
    feeds = _step_feeds(cpu_backend, 2)
    names = [o.name for o in cpu_backend.session.get_outputs()]
    bound = onnx_backend.run_bound(cpu_backend.session, names, feeds, "cpu")
    plain = cpu_backend.session.run(names, feeds)
    for name, got, want in zip(names, bound, plain, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_which_providers_bind_and_the_switch():
    device = onnx_backend.io_binding_device
    assert device("CUDAExecutionProvider", {}) == "cuda"  # auto: CUDA binds
    assert device("CPUExecutionProvider", {}) is None  # auto: the CPU runs plainly
    assert device("CPUExecutionProvider", {onnx_backend.IO_BINDING_ENV: "1"}) == "cpu"
    assert device("CUDAExecutionProvider", {onnx_backend.IO_BINDING_ENV: "0"}) is None
    with pytest.raises(ConfigError, match="MOBILE_VLA_ORT_IO_BINDING = 'yes'"):
        device("CPUExecutionProvider", {onnx_backend.IO_BINDING_ENV: "yes"})
