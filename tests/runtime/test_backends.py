"""The fallback chain: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU -> PyTorch, each skip explained,
bad files refused, and every backend giving the same answers through one predict interface."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mobile_vla.errors import ConfigError, DataError, ModelError, ResourceError
from mobile_vla.export.signature import SIGNATURE_FILE, file_sha256
from mobile_vla.runtime import registry
from mobile_vla.runtime.backends import load_backend
from mobile_vla.runtime.base import Backend
from mobile_vla.runtime.onnx_backend import OnnxBackend
from mobile_vla.runtime.registry import BACKEND_NAMES, BACKENDS, BackendSpec

INSTRUCTIONS = ["go to the red box", "go to the red box", "drive to the yellow box", "navigate to the target"]


@pytest.fixture(scope="module")
def inputs(real_frames):
    rng = np.random.default_rng(3)
    return real_frames[:4], rng.normal(0.1, 0.2, size=(4, 3)).astype(np.float32)


def _three_steps(backend, images, state):
    memory, outs = None, []
    for t in range(3):
        out = backend.predict(images, state + 0.05 * t, INSTRUCTIONS, memory)
        memory = out.memory
        outs.append(out)
    return outs


def test_without_tensorrt_the_chain_picks_onnx_cpu_and_says_why(exported_dir):
    backend = load_backend(exported_dir)
    assert backend.name == "onnx-cpu"
    assert list(backend.skipped) == ["tensorrt", "onnx-cuda"]
    assert "TensorRT" in backend.skipped["tensorrt"]
    assert "CUDAExecutionProvider" in backend.skipped["onnx-cuda"]
    assert backend.signature.chunk == 10


def test_backends_give_the_same_answers(exported_dir, inputs):
    images, state = inputs
    onnx_cpu = _three_steps(load_backend(exported_dir, prefer=("onnx-cpu",)), images, state)
    torch_ = _three_steps(load_backend(exported_dir, prefer=("torch",)), images, state)
    fp16 = _three_steps(load_backend(exported_dir, prefer=("onnx-cpu",), fp16=True), images, state)
    for a, b, c in zip(onnx_cpu, torch_, fp16, strict=True):
        assert a.actions.shape == (4, 10, 3) and a.confidence.shape == (4,) and a.memory[0].shape == (1, 4, 64)
        assert np.abs(a.actions - b.actions).max() <= 1e-4
        assert np.abs(a.confidence - b.confidence).max() <= 1e-4
        assert max(np.abs(x - y).max() for x, y in zip(a.memory, b.memory, strict=True)) <= 1e-4
        assert np.abs(c.actions - b.actions).max() <= 5e-2
    # de-normalised into the recorded range, and not constant
    low, high = np.array([-0.2, -0.3, -1.0]), np.array([0.6, 0.3, 1.0])
    assert (onnx_cpu[0].actions >= low - 1e-6).all() and (onnx_cpu[0].actions <= high + 1e-6).all()
    assert onnx_cpu[0].actions.std() > 1e-3
    assert np.abs(onnx_cpu[2].actions - onnx_cpu[0].actions).max() > 1e-4  # memory and state carry through


def test_clip_text_is_computed_once_per_instruction(exported_dir, inputs):
    backend = load_backend(exported_dir, prefer=("onnx-cpu",), self_test=False)
    images, state = inputs
    backend.predict(images, state, INSTRUCTIONS)
    backend.predict(images, state, INSTRUCTIONS)
    assert backend.cache_stats["misses"] == 3  # three distinct instructions, encoded once each
    assert backend.cache_stats["hits"] == 5


def test_corrupt_onnx_is_refused_and_the_chain_moves_on(exported_copy):
    path = exported_copy / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    backend = load_backend(exported_copy)
    assert backend.name == "torch"
    assert "model.onnx" in backend.skipped["onnx-cpu"] and "sha256" in backend.skipped["onnx-cpu"]


def _resign(folder, key, new_file_bytes):
    """Replaces a graph file AND updates its checksum, as a careless hand-edit would."""
    signature_path = folder / SIGNATURE_FILE
    data = json.loads(signature_path.read_text())
    path = folder / data["graphs"][key]["file"]
    path.write_bytes(new_file_bytes)
    data["graphs"][key]["sha256"] = file_sha256(path)
    data["graphs"][key]["bytes"] = path.stat().st_size
    signature_path.write_text(json.dumps(data))


def test_mismatched_onnx_graph_is_refused(exported_copy):
    """Checksums fine, but the graph is not the one the signature describes (here: the text encoder)."""
    folder = exported_copy / "onnx"
    _resign(folder, "step_fp32", (folder / "text_encoder.onnx").read_bytes())
    backend = load_backend(exported_copy, prefer=("onnx-cpu", "torch"))
    assert backend.name == "torch"
    assert "inputs ['clip_input_ids'] do not match" in backend.skipped["onnx-cpu"]


def test_unparseable_onnx_is_refused(exported_copy):
    _resign(exported_copy / "onnx", "step_fp32", b"this is not a protobuf" * 10)
    backend = load_backend(exported_copy, prefer=("onnx-cpu", "torch"))
    assert backend.name == "torch"
    assert "ONNX Runtime cannot load it" in backend.skipped["onnx-cpu"]


def test_missing_fp16_graph_is_a_reason(exported_dir):
    backend = load_backend(exported_dir, prefer=("onnx-cpu",), fp16=True)
    assert backend.name == "onnx-cpu"  # present here
    with pytest.raises(ModelError, match="no backend could serve"):
        load_backend(exported_dir, prefer=("tensorrt", "onnx-cuda"))


def test_model_without_export_is_served_by_torch(make_policy_dir, tmp_path):
    folder = make_policy_dir(tmp_path)
    backend = load_backend(folder)
    assert backend.name == "torch"
    assert "signature.json: missing" in backend.skipped["onnx-cpu"]
    assert backend.signature.parity is None and backend.signature.chunk == 10


def test_bad_predict_inputs_raise_data_errors(exported_dir, inputs):
    backend = load_backend(exported_dir, prefer=("onnx-cpu",), self_test=False)
    images, state = inputs
    with pytest.raises(DataError, match=r"images: expected uint8 \[B,224,224,3\]"):
        backend.predict(images[:, :100], state, INSTRUCTIONS)
    with pytest.raises(DataError, match="images: expected uint8"):
        backend.predict(images.astype(np.float32), state, INSTRUCTIONS)
    with pytest.raises(DataError, match="state: contains NaN"):
        backend.predict(images, np.full_like(state, np.nan), INSTRUCTIONS)
    with pytest.raises(DataError, match=r"state: expected \[4,3\]"):
        backend.predict(images, state[:, :2], INSTRUCTIONS)
    with pytest.raises(DataError, match="list of 4 strings"):
        backend.predict(images, state, INSTRUCTIONS[:2])
    h, c = backend.initial_memory(3)
    with pytest.raises(DataError, match=r"memory h: expected \[1, 4, 64\]"):
        backend.predict(images, state, INSTRUCTIONS, (h, c))


def test_unknown_backend_name_is_a_config_error(exported_dir):
    with pytest.raises(ConfigError, match="prefer"):
        load_backend(exported_dir, prefer=("tensorrt", "openvino"))


def test_signature_from_another_version_is_refused(exported_copy):
    (exported_copy / "model_version.json").write_text(json.dumps({"name": "mobile-vla-policy", "version": "7"}))
    path = exported_copy / "onnx" / SIGNATURE_FILE
    data = json.loads(path.read_text())
    data["model"] = {"name": "mobile-vla-policy", "version": "6"}
    path.write_text(json.dumps(data))
    backend = load_backend(exported_copy, prefer=("onnx-cpu", "torch"))
    assert backend.name == "torch" and backend.model_version == "7"
    assert "exported from model version 6, this is version 7" in backend.skipped["onnx-cpu"]


def test_serving_sessions_use_the_given_threads_and_never_spin(exported_dir, inputs):
    """A serving replica shares its cores with the ingress and proxy: its ORT pool must not busy-wait."""
    images, state = inputs
    default = load_backend(exported_dir, prefer=("onnx-cpu",))
    serving = load_backend(exported_dir, prefer=("onnx-cpu",), threads=1, spinning=False)
    for backend, spin, threads in ((default, "1", 0), (serving, "0", 1)):
        for session in (backend.session, backend.text_session):
            options = session.get_session_options()
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == spin
            assert options.intra_op_num_threads == threads
    a = default.predict(images, state, INSTRUCTIONS, None)
    b = serving.predict(images, state, INSTRUCTIONS, None)
    assert np.abs(a.actions - b.actions).max() <= 1e-5


# --- the table is the chain ----------------------------------------------------------------------


class RefusingBackend(Backend):
    """A test backend that can never run here (as TensorRT on a CPU box): the chain must move on."""

    @classmethod
    def open(cls, name, spec, model, options):
        raise ResourceError(f"{name}: the {spec.artifact} device is not on this machine")


class NonFiniteOnnxBackend(OnnxBackend):
    """Real ONNX Runtime sessions whose step answers NaN actions: loads fine, must fail the self-test."""

    def _step(self, feeds):
        out = super()._step(feeds)
        return {**out, "actions": np.full_like(out["actions"], np.nan)}


def test_backend_names_are_the_table_in_chain_order():
    assert BACKEND_NAMES == tuple(BACKENDS) == ("tensorrt", "onnx-cuda", "onnx-cpu", "torch")
    for name, spec in BACKENDS.items():
        assert issubclass(spec.load_class(), Backend), name
    assert BACKENDS["onnx-cuda"].gpu and BACKENDS["tensorrt"].gpu and not BACKENDS["onnx-cpu"].gpu
    assert BACKENDS["onnx-cuda"].providers[0] == "CUDAExecutionProvider"


def test_a_backend_added_to_the_table_is_tried_in_its_place(exported_dir, inputs, monkeypatch):
    """Adding a backend = one class + one row: the default chain, `prefer` and the skip reasons follow."""
    table = {
        "refusing": BackendSpec(backend=f"{__name__}:RefusingBackend", artifact="fake-accelerator/"),
        "non-finite": BackendSpec(
            backend=f"{__name__}:NonFiniteOnnxBackend", artifact="onnx/", providers=("CPUExecutionProvider",)
        ),
        **BACKENDS,
        "onnx-cpu-one-thread": BackendSpec(  # a new ONNX Runtime row needs no class of its own
            backend="mobile_vla.runtime.onnx_backend:OnnxBackend", artifact="onnx/", providers=("CPUExecutionProvider",)
        ),
    }
    monkeypatch.setattr(registry, "BACKENDS", table)

    backend = load_backend(exported_dir)  # default chain = table order
    assert backend.name == "onnx-cpu"
    assert list(backend.skipped) == ["refusing", "non-finite", "tensorrt", "onnx-cuda"]
    assert "fake-accelerator/ device is not on this machine" in backend.skipped["refusing"]
    assert "non-finite: self-test step gave actions" in backend.skipped["non-finite"]

    extra = load_backend(exported_dir, prefer=("refusing", "onnx-cpu-one-thread"), threads=1)
    assert extra.name == "onnx-cpu-one-thread" and list(extra.skipped) == ["refusing"]
    images, state = inputs
    a = backend.predict(images, state, INSTRUCTIONS)
    b = extra.predict(images, state, INSTRUCTIONS)
    assert np.abs(a.actions - b.actions).max() <= 1e-5

    with pytest.raises(ConfigError, match="onnx-cpu-one-thread"):  # the error lists the table's names
        load_backend(exported_dir, prefer=("openvino",))


def test_the_backend_table_is_free_to_import():
    """Serving's request schemas and settings read BACKEND_NAMES: that must not load torch or onnxruntime."""
    script = (
        "import sys\n"
        "from mobile_vla.runtime import BACKEND_NAMES, BACKENDS\n"
        "assert BACKEND_NAMES == tuple(BACKENDS)\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'numpy', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
