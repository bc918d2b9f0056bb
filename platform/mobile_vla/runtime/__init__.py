"""Inference runtimes: one predict interface over TensorRT, ONNX Runtime (CUDA, CPU) and PyTorch.

    backend = load_backend(model_dir)          # tensorrt -> onnx-cuda -> onnx-cpu -> torch
    out = backend.predict(images, state, instructions, memory)

Modules: `registry` (the BACKENDS table, standard library only), `backends` (load_backend: the
fallback chain over the table), `base` (Backend, BackendOutput, the model files a backend opens),
`instruction_cache` (the one per-instruction cache), one module per backend: `onnx_backend`,
`torch_backend`, `tensorrt_backend`.

Adding a backend (say OpenVINO):
1. a `Backend` subclass in its own module, e.g. `runtime/openvino_backend.py`, with
   `open(name, spec, model, options)` (load it, or raise why it cannot run here: the chain moves on),
   `_encode_text(clip_input_ids)` and `_step(feeds)` (numpy in, numpy out, named as in signature.json);
2. one row in `BACKENDS` (runtime/registry.py), e.g. `"openvino": BackendSpec(backend=
   "mobile_vla.runtime.openvino_backend:OpenVinoBackend", artifact="onnx/", gpu=False)`. Its position
   in the table is its place in the default chain; `BACKEND_NAMES`, `load_backend(prefer=...)` and
   serving's configuration read the table.
An ONNX Runtime execution provider needs no class at all: a row naming `OnnxBackend` and its providers.

Light at import (serve and the CLI import this package): `BACKENDS` and `BACKEND_NAMES` cost nothing;
load_backend's modules load on first use and each backend's (torch, onnxruntime) when the chain tries
it; `tensorrt` only when a TensorRT plan is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_backend": "mobile_vla.runtime.backends",
    "BACKENDS": "mobile_vla.runtime.registry",
    "BACKEND_NAMES": "mobile_vla.runtime.registry",
    "BackendSpec": "mobile_vla.runtime.registry",
    "Backend": "mobile_vla.runtime.base",
    "BackendOutput": "mobile_vla.runtime.base",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mobile_vla.runtime' has no attribute {name!r}")
