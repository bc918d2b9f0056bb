"""The one table of backends: name -> which class runs it and what it needs. Its order is the default chain.

    BACKENDS["onnx-cpu"].providers      # ("CPUExecutionProvider",)
    BACKEND_NAMES                       # ("tensorrt", "onnx-cuda", "onnx-cpu", "torch")

Standard library only, and classes are named, not imported: serving's request schemas and settings
(the ingress, the CLI) read the names without loading torch or onnxruntime; `load_backend`
(runtime/backends.py) imports a class when the chain tries it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table: which class runs it and what it needs from the machine and model.

    Args:
        backend: "module:Class" of a `Backend` subclass (its `open(name, spec, model, options)` loads it).
        artifact: the files it serves from, relative to the model folder.
        gpu: whether it needs a CUDA GPU (serving places it on a GPU node).
        providers: ONNX Runtime execution providers, most preferred first (the first must initialise).
    """

    backend: str
    artifact: str
    gpu: bool = False
    providers: tuple[str, ...] = ()

    def load_class(self) -> type:
        """Imports the backend's module (torch, onnxruntime, ... come with it) and returns its Backend class."""
        module, _, name = self.backend.partition(":")
        return getattr(importlib.import_module(module), name)


_CUDA_FIRST = ("CUDAExecutionProvider", "CPUExecutionProvider")

BACKENDS: dict[str, BackendSpec] = {
    "tensorrt": BackendSpec(
        backend="mobile_vla.runtime.tensorrt_backend:TensorRTBackend",
        artifact="tensorrt/<gpu>__trt<version>/model[.fp16].plan + onnx/text_encoder.onnx",
        gpu=True,
        providers=_CUDA_FIRST,  # the text encoder's, where available
    ),
    "onnx-cuda": BackendSpec(
        backend="mobile_vla.runtime.onnx_backend:OnnxBackend", artifact="onnx/", gpu=True, providers=_CUDA_FIRST
    ),
    "onnx-cpu": BackendSpec(
        backend="mobile_vla.runtime.onnx_backend:OnnxBackend", artifact="onnx/", providers=("CPUExecutionProvider",)
    ),
    "torch": BackendSpec(backend="mobile_vla.runtime.torch_backend:TorchBackend", artifact="policy/"),  # GPU if any
}
BACKEND_NAMES = tuple(BACKENDS)
