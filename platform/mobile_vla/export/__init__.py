"""Export: the one-step recurrent ONNX graph (fp32, fp16), parity, `signature.json` and TensorRT plans.

    mobile-vla export --model models:/mobile-vla-policy@challenger --fp16

`publish.py` puts the graphs and a TensorRT plan on their MLflow model version (the CLI, the demo and
the TensorRT serving replicas all go through it). The backends that run them live in `mobile_vla.runtime`.

Light at import (the CLI imports this package): torch, onnx, onnxruntime and tensorrt load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_model": "mobile_vla.export.onnx_export",
    "ExportSignature": "mobile_vla.export.signature",
    "load_signature": "mobile_vla.export.signature",
    "build_engine": "mobile_vla.export.tensorrt_engine",
    "publish_onnx": "mobile_vla.export.publish",
    "publish_plan": "mobile_vla.export.publish",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mobile_vla.export' has no attribute {name!r}")
