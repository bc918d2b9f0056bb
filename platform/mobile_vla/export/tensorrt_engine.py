"""TensorRT: build a plan from the exported step graph, keyed by GPU model and TensorRT version.

A plan only runs on the GPU model and TensorRT version that built it, so plans live in
`tensorrt/<gpu-slug>__trt<version>/` of the model version (next to `engine.json`, which records what
built it and from which ONNX bytes) and a replica only ever looks at the folder for its own GPU.

fp16 follows the installed major version: TensorRT 10.x builds the fp32 graph with the FP16 builder
flag (weak typing: TensorRT picks fp16 kernels where it judges them safe); 11.x removed weak typing, so
fp16 there means a strongly typed network built from `model.fp16.onnx` (converted at export time).

The plan's folder, its build record and `select_plan` (which plan a replica may load) live here with
the builder; running a plan is `mobile_vla.runtime.tensorrt_backend`, and attaching one to a model
version is `mobile_vla.export.publish`.

`tensorrt` is imported lazily (require_tensorrt): most machines have none. This module never ran on
the machines the platform was written on (no GPU, no TensorRT wheels); the parts that need neither
(naming, plan selection and checks, profile shapes) are tested, see docs/gpu.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mobile_vla.data.manifest import write_json_atomic
from mobile_vla.errors import ModelError, ResourceError
from mobile_vla.export.signature import BATCH, ONNX_DIR, ExportSignature, TensorSpec, file_sha256
from mobile_vla.tracking.registry import file_lock

log = logging.getLogger(__name__)
trt_log = logging.getLogger("mobile_vla.tensorrt")  # what TensorRT itself reports (tensorrt_logger)

PLAN_FILE = "model.plan"
FP16_PLAN_FILE = "model.fp16.plan"
ENGINE_META_FILE = "engine.json"
TENSORRT_DIR = "tensorrt"
DEFAULT_MAX_BATCH = 32  # the largest batch of the optimisation profile
DEFAULT_OPT_BATCH = 8  # the batch TensorRT tunes its kernels for
BUILD_RETRY_BASE_S = 300.0  # no new build of the same graphs for this long after a failed one (BuildFailures)
BUILD_RETRY_CAP_S = 3600.0  # doubling per further failure, up to this
INSTALL_HINT = 'pip install -e ".[gpu]" --extra-index-url https://pypi.nvidia.com'


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe as a folder and an artifact path)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"gpu name {gpu_name!r} gives an empty slug")
    return slug


def engine_key(gpu_name: str, tensorrt_version: str) -> str:
    """The plan folder's name: '<gpu-slug>__trt<version>' (a plan only runs where both match)."""
    return f"{gpu_slug(gpu_name)}__trt{tensorrt_version}"


def plan_file_name(fp16: bool) -> str:
    """model.plan or model.fp16.plan."""
    return FP16_PLAN_FILE if fp16 else PLAN_FILE


def fp16_mode(tensorrt_version: str) -> str:
    """How this TensorRT major version does fp16: 'builder-flag' (10.x) or 'strongly-typed' (11.x on)."""
    major = int(tensorrt_version.split(".")[0])
    if major < 10:
        raise ResourceError(f"TensorRT {tensorrt_version}: need 10.x or newer (name-based tensor API)")
    return "builder-flag" if major == 10 else "strongly-typed"


def profile_shapes(
    inputs: list[TensorSpec], max_batch: int, opt_batch: int | None = None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input: the symbolic batch axis spans 1..max_batch, the rest is fixed."""
    if max_batch < 1:
        raise ValueError(f"max_batch = {max_batch}: must be >= 1")
    opt_batch = min(opt_batch or max_batch, max_batch)
    shapes = {}
    for spec in inputs:
        if any(isinstance(d, str) and d != BATCH for d in spec.shape):
            raise ModelError(f"input {spec.name!r} shape {spec.shape}: only the batch axis may be symbolic")
        shapes[spec.name] = tuple(
            tuple(batch if d == BATCH else int(d) for d in spec.shape) for batch in (1, opt_batch, max_batch)
        )
    return shapes


@dataclass(frozen=True)
class EngineMeta:
    """engine.json: what built the plan, so a replica refuses a plan that is not for it."""

    gpu: str
    tensorrt: str
    precision: str  # "fp32" | "fp16"
    fp16_mode: str | None
    max_batch: int
    opt_batch: int
    onnx_graph: str  # the signature graph key the plan was built from
    onnx_sha256: str
    model_name: str | None
    model_version: str | None
    build_seconds: float
    tf32: bool = False  # TF32 kernels allowed (cleared for fp32 plans since issue 20)
    parity: dict | None = None  # the plan vs the fp32 ONNX graph at build time (publish.plan_parity)

    def save(self, folder: Path, fp16: bool) -> None:
        """Writes the record in one rename (temp + fsync + os.replace): never half a file."""
        write_json_atomic(folder / _meta_name(fp16), dict(self.__dict__))

    @classmethod
    def load(cls, folder: Path, fp16: bool) -> EngineMeta:
        path = folder / _meta_name(fp16)
        if not path.is_file():
            raise ModelError(f"{path}: missing (a plan without its build record is refused)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"{path}: invalid build record ({exc})") from None


def check_plan_batch(plan_max_batch: int, max_batch_size: int | None, plan: str | Path) -> None:
    """Refuses a plan whose profile takes fewer robots than the serve config batches.

    A batch above the plan's max batch would run in several calls (each one the whole step), against
    `primary_timeout_s`; the plan for the config is built with `--max-batch` = its `max_batch_size`
    (TensorRT replicas build it themselves when the version's plan is smaller).

    Args:
        plan_max_batch: the plan's largest batch (engine.json `max_batch`).
        max_batch_size: the serve config's `max_batch_size` (None: no serve config, nothing to check).
        plan: the plan file, for the message.

    Raises:
        ModelError: naming the config field, both batch sizes and the command that builds the right plan.
    """
    if max_batch_size is None or max_batch_size <= plan_max_batch:
        return
    calls = -(-max_batch_size // plan_max_batch)
    raise ModelError(
        f"serve config max_batch_size = {max_batch_size} exceeds the TensorRT plan's max batch = {plan_max_batch} "
        f"({plan}, engine.json max_batch): a full batch would run in {calls} calls; build a plan for the config: "
        f"mobile-vla export --model MODEL_URI --tensorrt --max-batch {max_batch_size} (a TensorRT replica builds "
        "one itself before it loads the version)"
    )


def _meta_name(fp16: bool) -> str:
    return "engine.fp16.json" if fp16 else ENGINE_META_FILE


def select_plan(
    model_dir: str | Path, signature: ExportSignature, gpu_name: str, tensorrt_version: str, fp16: bool
) -> tuple[Path, EngineMeta]:
    """The plan for this GPU and TensorRT version, checked against its build record and the signature."""
    root = Path(model_dir) / TENSORRT_DIR
    key = engine_key(gpu_name, tensorrt_version)
    folder = root / key
    plan = folder / plan_file_name(fp16)
    if not plan.is_file():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ModelError(
            f"{plan}: no {'fp16 ' if fp16 else ''}plan for {key} (plans here: {have or 'none'}); "
            f"build one on this GPU: mobile-vla export --model MODEL_URI --tensorrt{' --fp16' if fp16 else ''}"
        )
    meta = EngineMeta.load(folder, fp16)
    if meta.gpu != gpu_name or meta.tensorrt != tensorrt_version:
        raise ModelError(
            f"{plan}: built for {meta.gpu!r} with TensorRT {meta.tensorrt}, "
            f"this is {gpu_name!r} with TensorRT {tensorrt_version}"
        )
    graph = signature.graphs.get(meta.onnx_graph)
    if graph is None or graph.sha256 != meta.onnx_sha256:
        raise ModelError(
            f"{plan}: built from ONNX {meta.onnx_graph} sha256 {meta.onnx_sha256[:12]}..., which is not "
            f"the graph in this version's signature.json (stale plan: rebuild with --tensorrt)"
        )
    if signature.model.version is not None and meta.model_version not in (None, signature.model.version):
        raise ModelError(f"{plan}: built for model version {meta.model_version}, this is {signature.model.version}")
    return plan, meta


def save_plan(model_dir: str | Path, meta: EngineMeta, plan_bytes: bytes) -> Path:
    """Writes a built plan and then its build record into `tensorrt/<gpu>__trt<ver>/`; returns the folder.

    The plan goes through a temporary file unique to this call (in `tensorrt/`, outside the folder
    that is attached to the registry), fsynced and renamed over `model[.fp16].plan`; the record is
    written the same way. Callers that may race hold `plan_build_lock`.
    """
    root = Path(model_dir) / TENSORRT_DIR
    folder = root / engine_key(meta.gpu, meta.tensorrt)
    folder.mkdir(parents=True, exist_ok=True)
    fp16 = meta.precision == "fp16"
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{plan_file_name(fp16)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(plan_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / plan_file_name(fp16))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta.save(folder, fp16)
    return folder


def _build_state_name(model_dir: str | Path, gpu_name: str, tensorrt_version: str, fp16: bool) -> Path:
    # tensorrt/.<key>.<plan file>: the lock and the failure record live beside the plan folder, never
    # in it (the folder is attached to the registry whole)
    return Path(model_dir) / TENSORRT_DIR / f"{engine_key(gpu_name, tensorrt_version)}.{plan_file_name(fp16)}"


@contextmanager
def plan_build_lock(model_dir: str | Path, gpu_name: str, tensorrt_version: str, fp16: bool) -> Iterator[None]:
    """Holds the node-wide lock for building one plan (`tensorrt/.<key>.<plan>.lock`): two builders on
    one node (replicas, `mobile-vla export --tensorrt`) never write the same files; the second finds
    the first one's plan once it gets the lock.
    """
    with file_lock(_build_state_name(model_dir, gpu_name, tensorrt_version, fp16)):
        yield


class BuildFailures:
    """Failed builds of one plan on this node, so builders back off instead of retrying at once.

    Kept in `tensorrt/.<key>.<plan>.failed.json` (shared by the processes of the node, kept across
    restarts): after the n-th consecutive failure of the same ONNX graphs no build starts for
    `BUILD_RETRY_BASE_S * 2**(n-1)` seconds, at most `BUILD_RETRY_CAP_S`; a build of other graphs
    (a new export) or a forced rebuild goes ahead, and a success clears the record.

    Args:
        model_dir: the model folder.
        gpu_name: this GPU's name.
        tensorrt_version: the installed TensorRT version.
        fp16: the fp16 plan.
        clock: wall-clock seconds (the record outlives the process).
    """

    def __init__(
        self, model_dir: str | Path, gpu_name: str, tensorrt_version: str, fp16: bool, clock=time.time
    ) -> None:
        base = _build_state_name(model_dir, gpu_name, tensorrt_version, fp16)
        self.plan = base.name  # <key>.<plan file>
        self.path = base.with_name(f".{base.name}.failed.json")
        self.clock = clock

    def _load(self) -> dict:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def check(self, onnx_id: str) -> None:
        """Raises ModelError while the last failed build of these graphs is backing off."""
        record = self._load()
        if record.get("onnx") != onnx_id:
            return
        wait = float(record.get("retry_after", 0)) - self.clock()
        if wait > 0:
            raise ModelError(
                f"TensorRT build of {self.plan} failed {record.get('failures')} "
                f"time(s) here, last: {record.get('error')}; next try in {wait:.0f} s "
                "(or rebuild now: mobile-vla export --tensorrt --force)"
            )

    def record(self, onnx_id: str, error: str) -> float:
        """Records a failed build of these graphs; returns the seconds until the next try."""
        previous = self._load()
        failures = int(previous.get("failures", 0)) + 1 if previous.get("onnx") == onnx_id else 1
        delay = min(BUILD_RETRY_CAP_S, BUILD_RETRY_BASE_S * 2 ** (failures - 1))
        record = {"onnx": onnx_id, "failures": failures, "error": error[:1000], "retry_after": self.clock() + delay}
        write_json_atomic(self.path, record)
        return delay

    def clear(self) -> None:
        """Forgets the failures (after a build that worked)."""
        self.path.unlink(missing_ok=True)


def require_tensorrt():
    """The `tensorrt` module, or a ResourceError saying how to install it."""
    try:
        import tensorrt  # noqa: PLC0415 (lazy on purpose: most machines have no TensorRT)
    except ImportError as exc:
        raise ResourceError(f"TensorRT is not installed ({exc}); on a GPU node: {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):  # the PyPI stub package without NVIDIA's libraries
        raise ResourceError(f"the installed 'tensorrt' package has no libraries (PyPI stub); {INSTALL_HINT}")
    return tensorrt


@functools.cache
def tensorrt_logger():
    """The process's one TensorRT logger (warnings and errors into Python logging), shared by every
    builder and runtime: TensorRT expects one logger per process and warns when handed another.
    """
    trt = require_tensorrt()

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                trt_log.error("%s", msg)
            elif severity == trt.ILogger.WARNING:
                trt_log.warning("%s", msg)
            elif severity == trt.ILogger.INFO:
                trt_log.debug("%s", msg)  # TensorRT's INFO is build chatter

    return _Logger()


def require_cuda_gpu() -> str:
    """The name of the current CUDA GPU, or a ResourceError saying why there is none."""
    if not torch.cuda.is_available():
        raise ResourceError("no CUDA GPU visible to torch (TensorRT needs one); use the ONNX Runtime backends")
    return torch.cuda.get_device_name(torch.cuda.current_device())


def build_engine(
    model_dir: str | Path,
    signature: ExportSignature,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int = DEFAULT_OPT_BATCH,
    fp16: bool = False,
    workspace_gib: float = 4.0,
    check: Callable[[bytes, EngineMeta], dict] | None = None,
) -> Path:
    """Builds and writes `tensorrt/<gpu>__trt<ver>/model[.fp16].plan` + its build record; returns the folder.

    fp32 plans are built with TF32 cleared (TensorRT enables it by default: ~1e-3 differences, ten times
    the fp32 export tolerance). `check(plan_bytes, meta)` runs before anything is written: it returns
    the parity figures recorded in engine.json, or raises (then no plan is written).
    """
    trt = require_tensorrt()
    gpu_name = require_cuda_gpu()
    version = trt.__version__
    mode = fp16_mode(version) if fp16 else None
    graph_key = "step_fp16" if mode == "strongly-typed" else "step_fp32"
    graph = signature.graph(graph_key)
    onnx_path = Path(model_dir) / ONNX_DIR / graph.file

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    flags = 0
    if mode == "strongly-typed" and int(version.split(".")[0]) == 10:  # 11.x is always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if mode == "builder-flag":
        config.set_flag(trt.BuilderFlag.FP16)
    if not fp16:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(signature.inputs, max_batch, opt_batch).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)

    started = time.perf_counter()
    log.info(
        "building TensorRT %s plan for %s (%s), batch 1..%d", "fp16" if fp16 else "fp32", gpu_name, version, max_batch
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT build failed for {gpu_name} (see the TensorRT log above)")
    meta = EngineMeta(
        gpu=gpu_name,
        tensorrt=version,
        precision="fp16" if fp16 else "fp32",
        fp16_mode=mode,
        max_batch=max_batch,
        opt_batch=min(opt_batch, max_batch),
        onnx_graph=graph_key,
        onnx_sha256=file_sha256(onnx_path),
        model_name=signature.model.name,
        model_version=signature.model.version,
        build_seconds=round(time.perf_counter() - started, 1),
        tf32=fp16,  # fp32 plans: cleared; fp16 plans keep TensorRT's default (on)
    )
    plan_bytes = bytes(serialized)
    if check is not None:
        meta = dataclasses.replace(meta, parity=check(plan_bytes, meta))
    return save_plan(model_dir, meta, plan_bytes)
