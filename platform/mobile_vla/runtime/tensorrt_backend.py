"""TensorRT: run the plan built for this GPU model and TensorRT version (export/tensorrt_engine.py builds it).

    runner = TensorRTRunner(model_dir, signature, fp16=False)   # checks TensorRT, the GPU and the plan
    outs = runner.run({name: cuda_tensor, ...})                # batch <= runner.max_batch

`tensorrt` itself is imported on first use (require_tensorrt): most machines have none. This module
never ran on the machines the platform was written on (no GPU, no TensorRT wheels); see docs/gpu.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mobile_vla.errors import ModelError
from mobile_vla.export.signature import ONNX_DIR, STEP_OUTPUTS, TEXT_OUTPUTS, ExportSignature
from mobile_vla.export.tensorrt_engine import require_cuda_gpu, require_tensorrt, select_plan
from mobile_vla.runtime.base import Backend, LoadOptions, ModelFiles
from mobile_vla.runtime.onnx_backend import open_session
from mobile_vla.runtime.registry import BackendSpec


class TensorRTRunner:
    """Executes a plan on torch CUDA tensors (inputs stay on the GPU; outputs are new CUDA tensors).

    Args:
        model_dir: the model folder holding `tensorrt/<gpu>__trt<version>/`.
        signature: the version's signature.json (the plan must be built from its step graph).
        fp16: run the fp16 plan.

    Raises:
        ResourceError: no TensorRT or no CUDA GPU here.
        ModelError: no plan for this GPU and TensorRT version, a stale one, or one TensorRT cannot load.
    """

    def __init__(self, model_dir: str | Path, signature: ExportSignature, fp16: bool = False):
        trt = require_tensorrt()
        gpu_name = require_cuda_gpu()
        plan, self.meta = select_plan(model_dir, signature, gpu_name, trt.__version__, fp16)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ModelError(f"{plan}: TensorRT cannot deserialize this plan (corrupt, or another TensorRT build)")
        self.context = self.engine.create_execution_context()
        self.max_batch = self.meta.max_batch
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = {s.name for s in signature.inputs}
        want_out = {s.name for s in signature.outputs}
        if set(self.inputs) != want_in or set(self.outputs) != want_out:
            raise ModelError(
                f"{plan}: engine I/O {sorted(self.inputs)} -> {sorted(self.outputs)} does not match "
                f"signature.json {sorted(want_in)} -> {sorted(want_out)}"
            )
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds: name -> tensor (moved to CUDA in the engine's dtype); batch <= max_batch. Returns name -> tensor."""
        for name in self.inputs:
            tensor = feeds[name].to(device="cuda", dtype=self._dtypes[name]).contiguous()
            feeds[name] = tensor  # keep a reference until the work has run
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ModelError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return results


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise ModelError(f"TensorRT I/O dtype {dtype} is not supported by this runner")
    return table[dtype]


class TensorRTBackend(Backend):
    """A TensorRT plan for this GPU; the (cached, once per instruction) text encoder runs in ONNX Runtime."""

    @classmethod
    def open(cls, name: str, spec: BackendSpec, model: ModelFiles, options: LoadOptions) -> TensorRTBackend:
        signature, preprocessing = model.exported()
        backend = cls(name, model.folder, signature, preprocessing, options.cache_size)
        backend.runner = TensorRTRunner(model.folder, signature, fp16=options.fp16)  # checks TensorRT, GPU, plan
        backend.max_batch = backend.runner.max_batch
        providers = [p for p in spec.providers if p in ort.get_available_providers()]
        backend.text_session = open_session(
            model.folder / ONNX_DIR, signature.graph("text_encoder"), providers, options.threads, options.spinning
        )
        return backend

    def _encode_text(self, clip_input_ids):
        return self.text_session.run(TEXT_OUTPUTS, {"clip_input_ids": clip_input_ids})[0]

    def _step(self, feeds):
        outs = self.runner.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        return {k: outs[k].float().cpu().numpy() for k in STEP_OUTPUTS}

    def close(self):
        self.runner = self.text_session = None
