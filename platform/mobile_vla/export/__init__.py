"""Export: the one-step recurrent ONNX graph (fp32, fp16), TensorRT plans, and the backend fallback chain.

    mobile-vla export --model models:/mobile-vla-policy@challenger --fp16
    backend = load_backend(model_dir)          # tensorrt -> onnx-cuda -> onnx-cpu -> torch
    out = backend.predict(images, state, instructions, memory)

Light at import (the CLI imports this package): torch, onnx, onnxruntime and tensorrt load on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_backend": "mobile_vla.export.backends",
    "Backend": "mobile_vla.export.backends",
    "BackendOutput": "mobile_vla.export.backends",
    "BACKEND_NAMES": "mobile_vla.export.backends",
    "export_model": "mobile_vla.export.onnx_export",
    "ExportSignature": "mobile_vla.export.signature",
    "load_signature": "mobile_vla.export.signature",
    "build_engine": "mobile_vla.export.tensorrt_engine",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mobile_vla.export' has no attribute {name!r}")
