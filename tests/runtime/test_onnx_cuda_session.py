"""ONNX Runtime on CUDA, as far as a CPU-only machine with the real onnxruntime can check it: the CUDA
libraries are preloaded only when a session asks for CUDA, the CUDA provider gets its memory limit and
arena strategy, and the cluster check catches a CUDA session that silently runs on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.export.signature import load_signature
from mobile_vla.runtime import onnx_backend


@pytest.fixture()
def preload_calls(monkeypatch):
    """Records calls to onnxruntime.preload_dlls (the real one stays untouched: no CUDA here)."""
    calls = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *args, **kwargs: calls.append((args, kwargs)), raising=False)
    onnx_backend.preload_cuda_libraries.cache_clear()
    yield calls
    onnx_backend.preload_cuda_libraries.cache_clear()


def _cluster_check():
    path = Path(__file__).resolve().parents[2] / "jobs" / "cluster_check.py"
    spec = importlib.util.spec_from_file_location("cluster_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_sessions_work_and_preload_nothing(exported_dir, preload_calls, monkeypatch):
    monkeypatch.delenv(onnx_backend.CUDA_MEM_LIMIT_ENV, raising=False)
    signature = load_signature(exported_dir / "onnx")
    session = onnx_backend.open_session(
        exported_dir / "onnx", signature.graph("text_encoder"), ["CPUExecutionProvider"], threads=1
    )
    ids = np.zeros((1, 77), np.int64)
    (clip_text,) = session.run(["clip_text"], {"clip_input_ids": ids})
    assert np.isfinite(clip_text).all()
    assert preload_calls == []


def test_cuda_request_preloads_once_and_limits_the_arena(preload_calls, monkeypatch):
    monkeypatch.delenv(onnx_backend.CUDA_MEM_LIMIT_ENV, raising=False)
    monkeypatch.delenv(onnx_backend.CUDA_ARENA_ENV, raising=False)
    providers = onnx_backend.session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    onnx_backend.session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert len(preload_calls) == 1  # once per process
    assert providers == [
        ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested", "gpu_mem_limit": 16 << 30}),
        "CPUExecutionProvider",
    ]


def test_cuda_options_come_from_the_environment_and_are_checked():
    options = onnx_backend.cuda_provider_options
    assert options({"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB": "0"}) == {"arena_extend_strategy": "kSameAsRequested"}
    assert options({"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB": "2.5", "MOBILE_VLA_ORT_CUDA_ARENA": "kNextPowerOfTwo"}) == {
        "arena_extend_strategy": "kNextPowerOfTwo",
        "gpu_mem_limit": int(2.5 * (1 << 30)),
    }
    with pytest.raises(ConfigError, match=r"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB = 'lots'"):
        options({"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB": "lots"})
    with pytest.raises(ConfigError, match=r"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB = '-1'"):
        options({"MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB": "-1"})
    with pytest.raises(ConfigError, match=r"MOBILE_VLA_ORT_CUDA_ARENA = 'kBig'"):
        options({"MOBILE_VLA_ORT_CUDA_ARENA": "kBig"})


def test_cluster_check_catches_the_silent_cpu_fallback(preload_calls):
    """The real onnxruntime of this CPU-only machine, asked for CUDA, runs the session on the CPU
    without an error: exactly the fallback the cluster check must fail on."""
    check = _cluster_check()
    session = check.run_cuda_session()
    assert session["providers"][0] == "CPUExecutionProvider" and session["correct"]
    problem = check.cuda_fallback_problem(session)
    assert problem and "silent CPU fallback" in problem and "CUDAExecutionProvider" in problem
    assert (
        check.cuda_fallback_problem({**session, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}) is None
    )
    gpu = {
        "hostname": "gpu-1",
        "cuda_available": True,
        "onnxruntime_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "onnxruntime_cuda_session": session,
        "tensorrt_network": {"error": "AttributeError: module 'tensorrt' has no attribute 'Builder'"},
    }
    problems = check.gpu_problems(gpu)
    assert len(problems) == 2
    assert "silent CPU fallback" in problems[0] and "TensorRT one-layer network failed" in problems[1]
