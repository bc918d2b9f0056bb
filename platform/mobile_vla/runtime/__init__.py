"""Inference runtimes: one predict interface over TensorRT, ONNX Runtime (CUDA, CPU) and PyTorch.

    backend = load_backend(model_dir)          # tensorrt -> onnx-cuda -> onnx-cpu -> torch
    out = backend.predict(images, state, instructions, memory)

Light at import (serve and the CLI import this package): torch, onnxruntime and tensorrt load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_backend": "mobile_vla.runtime.backends",
    "Backend": "mobile_vla.runtime.backends",
    "BackendOutput": "mobile_vla.runtime.backends",
    "BACKEND_NAMES": "mobile_vla.runtime.backends",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mobile_vla.runtime' has no attribute {name!r}")
