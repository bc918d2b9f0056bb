"""ONNX Runtime: the exported graphs on any execution provider (CPU, CUDA, ...), with no torch at run time.

    session = open_session(model_dir / "onnx", signature.graph("text_encoder"), ["CPUExecutionProvider"])

A session is only opened on a file whose sha256 and I/O match signature.json.

CUDA sessions (`session_providers`): before the first one, `onnxruntime.preload_dlls()` (where this
onnxruntime has it) loads the CUDA and cuDNN libraries of the nvidia-* wheels, so the CUDA provider
initialises whether or not torch was imported first; the CUDA provider gets a memory limit and an
arena strategy, because on a GPU node the ONNX Runtime fallback replica shares the GPU with a
TensorRT replica and must not grow into its memory:
- `MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB` (default 16; 0 = no limit): ONNX Runtime's `gpu_mem_limit`,
  the most its CUDA arena may hold (the `full` model's fp32 weights take about 6.6 GB of it);
- `MOBILE_VLA_ORT_CUDA_ARENA` (default `kSameAsRequested`): `arena_extend_strategy`; grow by what is
  asked rather than ONNX Runtime's default `kNextPowerOfTwo`, which can reserve up to twice that.

The step runs through ONNX Runtime's IO binding (`run_bound`) on CUDA and through plain `run` on the
CPU (`MOBILE_VLA_ORT_IO_BINDING`: `auto`, the default, or `1`/`0` to force it). On CUDA the binding
asks for the outputs in device memory and copies them to the host once the run is done (ONNX
Runtime's documented way to control the copies around a CUDA run; what it saves for this model was
never measured on a GPU). On the CPU it saves nothing (measured: docs/gpu.md). Both paths give
identical answers (tests/runtime/test_io_binding.py).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobile_vla.errors import ConfigError, ModelError, ResourceError
from mobile_vla.export.signature import (
    ONNX_DIR,
    TEXT_OUTPUTS,
    GraphFile,
    TensorSpec,
    check_io_matches,
    verify_graph_file,
)
from mobile_vla.runtime.base import Backend, LoadOptions, ModelFiles
from mobile_vla.runtime.registry import BackendSpec

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
}
_PROVIDER_HINTS = {"CUDAExecutionProvider": "install onnxruntime-gpu on GPU nodes"}
CUDA_PROVIDER = "CUDAExecutionProvider"
CUDA_MEM_LIMIT_ENV = "MOBILE_VLA_ORT_CUDA_MEM_LIMIT_GIB"
CUDA_ARENA_ENV = "MOBILE_VLA_ORT_CUDA_ARENA"
DEFAULT_CUDA_MEM_LIMIT_GIB = 16.0
DEFAULT_CUDA_ARENA = "kSameAsRequested"
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
IO_BINDING_ENV = "MOBILE_VLA_ORT_IO_BINDING"
_BINDING_DEVICES = {CUDA_PROVIDER: "cuda", "CPUExecutionProvider": "cpu"}  # where outputs are bound

log = logging.getLogger(__name__)


def session_io(args) -> list[TensorSpec]:
    """A session's inputs or outputs (`get_inputs()`), as signature TensorSpecs (symbolic axes -> "B")."""
    specs = []
    for arg in args:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ModelError(f"graph {arg.name!r} has unsupported type {arg.type}")
        shape = [d if isinstance(d, int) else "B" for d in arg.shape]
        specs.append(TensorSpec(name=arg.name, dtype=dtype, shape=shape))
    return specs


def require_provider(provider: str) -> None:
    """Raises ResourceError when this onnxruntime build lacks `provider`."""
    available = ort.get_available_providers()
    if provider not in available:
        hint = _PROVIDER_HINTS.get(provider)
        raise ResourceError(
            f"onnxruntime {ort.__version__} has no {provider} (has {available})" + (f"; {hint}" if hint else "")
        )


@functools.cache
def preload_cuda_libraries() -> bool:
    """Calls `onnxruntime.preload_dlls()` once per process where it exists; returns whether it ran.

    A failure is logged, not raised: the session that follows then says what is missing.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return False
    try:
        preload()
    except Exception as exc:  # its own OSErrors and RuntimeErrors, depending on what is missing
        log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        return False
    return True


def cuda_provider_options(environ: dict[str, str] | None = None) -> dict[str, str | int]:
    """The CUDA provider's options: memory limit and arena strategy (module docstring), from the environment.

    Raises:
        ConfigError: a value that is not a number >= 0, or an unknown arena strategy.
    """
    environ = os.environ if environ is None else environ
    raw_limit = environ.get(CUDA_MEM_LIMIT_ENV, str(DEFAULT_CUDA_MEM_LIMIT_GIB))
    try:
        limit_gib = float(raw_limit)
    except ValueError:
        limit_gib = -1.0
    if not limit_gib >= 0:
        raise ConfigError(f"{CUDA_MEM_LIMIT_ENV} = {raw_limit!r}: expected a number of GiB >= 0 (0: no limit)")
    arena = environ.get(CUDA_ARENA_ENV, DEFAULT_CUDA_ARENA)
    if arena not in ARENA_STRATEGIES:
        raise ConfigError(f"{CUDA_ARENA_ENV} = {arena!r}: expected one of {list(ARENA_STRATEGIES)}")
    options: dict[str, str | int] = {"arena_extend_strategy": arena}
    if limit_gib > 0:
        options["gpu_mem_limit"] = int(limit_gib * (1 << 30))
    return options


def session_providers(providers: list[str]) -> list[str | tuple[str, dict]]:
    """`providers` as InferenceSession takes them: the CUDA provider with its options, after
    `preload_cuda_libraries()`; other providers as they are (nothing is preloaded for them).
    """
    if CUDA_PROVIDER not in providers:
        return list(providers)
    options = cuda_provider_options()
    preload_cuda_libraries()
    return [(p, options) if p == CUDA_PROVIDER else p for p in providers]


def io_binding_device(provider: str, environ: dict[str, str] | None = None) -> str | None:
    """The device a session on `provider` binds its step outputs to, or None for plain `run`.

    `MOBILE_VLA_ORT_IO_BINDING`: `auto` (default: CUDA binds, the CPU runs plainly), `1` (bind on any
    provider with a known device), `0` (never).

    Raises:
        ConfigError: another value.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(IO_BINDING_ENV, "auto")
    if mode not in ("auto", "1", "0"):
        raise ConfigError(f"{IO_BINDING_ENV} = {mode!r}: expected auto, 1 or 0")
    if mode == "0" or (mode == "auto" and provider != CUDA_PROVIDER):
        return None
    return _BINDING_DEVICES.get(provider)


def run_bound(
    session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray], device: str
) -> list[np.ndarray]:
    """`session.run(names, feeds)` through IO binding: host inputs bound as they are, outputs bound to
    `device` ("cuda" or "cpu") and copied to the host once the run is done.

    A binding per call: the serving replica runs two batches at once on one session.
    """
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def open_session(
    folder: Path, graph: GraphFile, providers: list[str], threads: int = 0, spinning: bool = True
) -> ort.InferenceSession:
    """An ONNX Runtime session for a graph named in signature.json, refused unless bytes and I/O match.

    Args:
        folder: the folder holding signature.json and the graph files.
        graph: the graph's entry in the signature.
        providers: execution providers, most preferred first.
        threads: intra-op threads (0: ORT's default, one per core).
        spinning: False stops idle pool threads from busy-waiting (a serving replica shares its cores
            with the ingress and the proxy).

    Returns:
        The session.

    Raises:
        ModelError: the file is missing, corrupt, unloadable or has other I/O than the signature says.
    """
    path = verify_graph_file(folder, graph)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    provider_list = session_providers(providers)  # a bad option is a ConfigError, not a load failure
    try:
        session = ort.InferenceSession(str(path), options, providers=provider_list)
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... classes
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0][:300]}") from None
    check_io_matches(str(path), graph.inputs, session_io(session.get_inputs()), "inputs")
    check_io_matches(str(path), graph.outputs, session_io(session.get_outputs()), "outputs")
    return session


class OnnxBackend(Backend):
    """The step and text-encoder graphs in ONNX Runtime, on the providers its table row names."""

    binding_device: str | None = None  # the step's IO binding output device (io_binding_device); None: plain run

    @classmethod
    def open(cls, name: str, spec: BackendSpec, model: ModelFiles, options: LoadOptions) -> OnnxBackend:
        signature, preprocessing = model.exported()
        backend = cls(name, model.folder, signature, preprocessing, options.cache_size)
        providers = list(spec.providers)
        require_provider(providers[0])
        folder = model.folder / ONNX_DIR
        step_key = f"step_{options.precision}"
        if step_key not in signature.graphs:
            hint = f" (export with --{options.precision})" if options.precision != "fp32" else ""
            raise ModelError(f"{folder}: no {step_key} graph{hint}")
        backend.session = open_session(folder, signature.graphs[step_key], providers, options.threads, options.spinning)
        if backend.session.get_providers()[0] != providers[0]:
            raise ResourceError(f"{providers[0]} did not initialise (providers: {backend.session.get_providers()})")
        check_io_matches(
            str(folder / signature.graphs[step_key].file),
            signature.inputs,
            session_io(backend.session.get_inputs()),
            "inputs",
        )
        backend.text_session = open_session(
            folder, signature.graph("text_encoder"), providers, options.threads, options.spinning
        )
        backend.precision = options.precision
        backend.binding_device = io_binding_device(providers[0])  # None: plain run
        return backend

    def _encode_text(self, clip_input_ids):
        return self.text_session.run(TEXT_OUTPUTS, {"clip_input_ids": clip_input_ids})[0]

    def _step(self, feeds):
        names = self.signature.output_names  # STEP_OUTPUTS; STEP_OUTPUTS_V1 for a version 1 export
        if self.binding_device is None:
            return dict(zip(names, self.session.run(names, feeds), strict=True))
        return dict(zip(names, run_bound(self.session, names, feeds, self.binding_device), strict=True))

    def close(self):
        self.session = self.text_session = None
