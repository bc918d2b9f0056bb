"""TensorRT: run the plan built for this GPU model and TensorRT version (export/tensorrt_engine.py builds it).

    runner = TensorRTRunner(model_dir, signature, fp16=False)   # checks TensorRT, the GPU and the plan
    outs = runner.run({name: tensor, ...})                     # batch <= runner.max_batch; any thread

`tensorrt` itself is imported on first use (require_tensorrt): most machines have none. This module
never ran on the machines the platform was written on (no GPU, no TensorRT wheels); see docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mobile_vla.errors import ModelError
from mobile_vla.export.signature import ONNX_DIR, TEXT_OUTPUTS, ExportSignature
from mobile_vla.export.tensorrt_engine import (
    check_plan_batch,
    require_cuda_gpu,
    require_tensorrt,
    select_plan,
    tensorrt_logger,
)
from mobile_vla.runtime.base import Backend, LoadOptions, ModelFiles
from mobile_vla.runtime.onnx_backend import open_session
from mobile_vla.runtime.registry import BackendSpec


class TensorRTRunner:
    """Executes a plan on torch tensors (inputs are copied to the GPU; outputs are new CUDA tensors).

    Thread-safe: one lock guards the whole set_input_shape -> set_tensor_address -> execute_async_v3 ->
    synchronise sequence, because a TensorRT execution context keeps the shapes and addresses of the
    call in progress and must never be driven from two threads (the policy replica runs
    `CONCURRENT_BATCHES` batches at once, each through `asyncio.to_thread`). A lock, not a pool of
    contexts: a pool needs one optimisation profile per context in every plan (plans are built with
    one) and doubles the activation memory, while the replica's overlap only needs the CPU work around
    the step (unpacking, tokens, de-normalisation) to run beside it, which the lock leaves free.
    The runner enqueues on its own CUDA stream, never the legacy default stream (which synchronises
    with every other stream and makes TensorRT warn on each call).

    Args:
        model_dir: the model folder holding `tensorrt/<gpu>__trt<version>/`.
        signature: the version's signature.json (the plan must be built from its step graph).
        fp16: run the fp16 plan.
        device: where the I/O tensors live: "cuda" (tests drive a FAKE TensorRT with "cpu").

    Raises:
        ResourceError: no TensorRT or no CUDA GPU here.
        ModelError: no plan for this GPU and TensorRT version, a stale one, or one TensorRT cannot load.
    """

    def __init__(self, model_dir: str | Path, signature: ExportSignature, fp16: bool = False, device: str = "cuda"):
        trt = require_tensorrt()
        gpu_name = require_cuda_gpu()
        plan, meta = select_plan(model_dir, signature, gpu_name, trt.__version__, fp16)
        self._open(trt, plan.read_bytes(), meta, signature, plan, device)

    @classmethod
    def from_plan_bytes(
        cls, data: bytes, meta, signature: ExportSignature, where: str | Path, device: str = "cuda"
    ) -> TensorRTRunner:
        """A runner on a plan not yet written anywhere (the build-time parity check runs it first).

        Args:
            data: the serialized plan.
            meta: its build record (EngineMeta: max_batch).
            signature: the signature the plan was built from.
            where: how errors name the plan.
            device: as for the constructor.
        """
        runner = cls.__new__(cls)
        runner._open(require_tensorrt(), data, meta, signature, Path(where), device)
        return runner

    def _open(self, trt, data: bytes, meta, signature: ExportSignature, plan: Path, device: str) -> None:
        self.meta = meta
        self._runtime = trt.Runtime(tensorrt_logger())
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelError(f"{plan}: TensorRT cannot deserialize this plan (corrupt, or another TensorRT build)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ModelError(f"{plan}: TensorRT cannot create an execution context (GPU memory?)")
        self.plan = plan
        self.max_batch = self.meta.max_batch
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = threading.Lock()  # one call at a time on self.context (see the class docstring)
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
        """Runs one batch (any thread; calls are serialised).

        Args:
            feeds: input name -> tensor (any device and dtype: copied to the runner's device in the
                engine's dtype); batch <= max_batch.

        Returns:
            Output name -> a new tensor on the runner's device, complete when this returns.

        Raises:
            ModelError: a missing input, a shape outside the plan's profile, or TensorRT refused the call.
        """
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise ModelError(f"{self.plan}: feeds lack the inputs {missing}")
        with self._lock, self._on_stream():
            # keep the device copies referenced until the stream has finished with them
            inputs = {
                name: feeds[name].to(device=self.device, dtype=self._dtypes[name]).contiguous() for name in self.inputs
            }
            for name, tensor in inputs.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ModelError(
                        f"{self.plan}: TensorRT refused input {name!r} of shape {tuple(tensor.shape)} "
                        f"(the plan's profile takes batch 1..{self.max_batch})"
                    )
                self._bind(name, tensor)
            results = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ModelError(f"{self.plan}: output {name!r} shape {shape} is unresolved after the inputs")
                results[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self._bind(name, results[name])
            if not self.context.execute_async_v3(self._stream_handle()):
                raise ModelError(f"{self.plan}: TensorRT execute_async_v3 failed (see the TensorRT log)")
            if self._stream is not None:
                self._stream.synchronize()
            del inputs
        return results

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run` on numpy feeds (extra keys ignored) -> numpy float32 outputs on the host."""
        outs = self.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if k in self.inputs})
        return {k: v.float().cpu().numpy() for k, v in outs.items()}

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise ModelError(f"{self.plan}: TensorRT refused the address of tensor {name!r}")

    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _stream_handle(self) -> int:
        return self._stream.cuda_stream if self._stream is not None else 0


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
        if options.int8:  # the chain moves on to the ONNX Runtime backends, which run model.int8.onnx
            raise ModelError("TensorRT has no int8 plans here: int8 runs in ONNX Runtime (model.int8.onnx)")
        backend = cls(name, model.folder, signature, preprocessing, options.cache_size)
        backend.runner = TensorRTRunner(model.folder, signature, fp16=options.fp16)  # checks TensorRT, GPU, plan
        backend.max_batch = backend.runner.max_batch
        check_plan_batch(backend.max_batch, options.max_batch_size, backend.runner.plan)
        providers = [p for p in spec.providers if p in ort.get_available_providers()]
        backend.text_session = open_session(
            model.folder / ONNX_DIR, signature.graph("text_encoder"), providers, options.threads, options.spinning
        )
        return backend

    def _encode_text(self, clip_input_ids):
        return self.text_session.run(TEXT_OUTPUTS, {"clip_input_ids": clip_input_ids})[0]

    def _step(self, feeds):
        outs = self.runner.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        return {k: outs[k].float().cpu().numpy() for k in self.signature.output_names}

    def close(self):
        self.runner = self.text_session = None
