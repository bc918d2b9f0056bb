"""Publish an export on its MLflow model version: the ONNX graphs, and a TensorRT plan for this GPU.

    published = publish_onnx(resolve_model("models:/mobile-vla-policy/3"), fp16=True, int8=True)
    plan = publish_plan(resolve_model("models:/mobile-vla-policy/3"), fp16=True)    # on a GPU node

The one place that decides what a version gets and attaches it, used by `mobile-vla export`, the demo
and the TensorRT serving replicas. A version that already holds verified graphs keeps them (a plan
is built from exactly those bytes) and one that holds a valid plan for this GPU keeps it, unless
forced. Nothing is attached for a plain model folder (no registered name and version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mobile_vla.errors import ModelError
from mobile_vla.export import parity
from mobile_vla.export.graph_parity import compare_steps, over_tolerance, session_step
from mobile_vla.export.onnx_export import DEFAULT_OPSET, add_int8, export_model
from mobile_vla.export.signature import ONNX_DIR, ExportSignature, load_signature, verify_graph_file
from mobile_vla.export.tensorrt_engine import (
    DEFAULT_MAX_BATCH,
    TENSORRT_DIR,
    BuildFailures,
    EngineMeta,
    build_engine,
    plan_build_lock,
    plan_file_name,
    require_cuda_gpu,
    require_tensorrt,
    select_plan,
)
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.runtime.tensorrt_backend import TensorRTRunner
from mobile_vla.tracking import ResolvedModel, attach_artifacts, log_version_metrics, set_version_tags

log = logging.getLogger(__name__)

# A plan against the fp32 ONNX graph (ONNX Runtime CPU), on actions and confidence: fp32 plans are built
# with TF32 off, so GPU and CPU kernels differ only in summation order (1e-3 leaves room for the full
# model's depth; TF32 left on gives about that much by itself); fp16 plans as the fp16 ONNX graph.
PLAN_TOLERANCE = {"fp32": 1e-3, "fp16": parity.FP16_TOLERANCE}
PLAN_PARITY_BATCHES = (1, 8)
PLAN_DEVICE = "cuda"  # where the build-time check runs the plan (tests drive a FAKE TensorRT on "cpu")


@dataclass
class PublishedOnnx:
    """What publish_onnx did: the graphs' signature, whether it exported them, whether it attached them."""

    signature: ExportSignature
    exported: bool  # False: the version already held verified graphs and keeps them
    attached: bool
    notes: list[str] = field(default_factory=list)  # exporter notes (e.g. dynamo fell back to legacy)


def is_registered(resolved: ResolvedModel) -> bool:
    """Whether `resolved` is a registry version (artifacts can be attached), not a plain folder."""
    return bool(resolved.name and resolved.version)


def verified_signature(folder: Path, fp16: bool) -> ExportSignature | None:
    """The folder's signature if every graph it names verifies (and an fp16 graph exists when asked).

    An int8 graph is not asked for here: publish_onnx adds one to verified graphs without re-exporting.
    """
    try:
        signature = load_signature(folder / ONNX_DIR)
        for graph in signature.graphs.values():
            verify_graph_file(folder / ONNX_DIR, graph)
    except ModelError:
        return None
    if fp16 and "step_fp16" not in signature.graphs:
        return None
    return signature


def publish_onnx(
    resolved: ResolvedModel,
    *,
    fp16: bool = False,
    int8: bool = False,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    data_dir: str | Path | None = None,
    force: bool = False,
    attach: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PublishedOnnx:
    """Makes sure the version has verified ONNX graphs: keeps the ones it has, else exports and attaches them.

    Args:
        resolved: the model version (resolve_model), or a plain folder.
        fp16: also the fp16 step graph.
        int8: also the int8 step graph (added to verified graphs that lack it, from their model.onnx).
        exporter: "dynamo" or "legacy" (export_model).
        opset: the ONNX opset.
        data_dir: dataset folder whose frames the parity check uses (None: MiniWorld renders).
        force: export again even if the version has verified graphs.
        attach: attach new graphs to the registry version (False: local files only).
        progress: called with a short text per export step.

    Returns:
        The signature of the graphs the version now has, and what was done.

    Raises:
        ModelError: the export or its parity check failed (the version's onnx/ is left as it was).
    """
    signature = None if force else verified_signature(resolved.path, fp16)
    if signature is not None:
        if not int8 or "step_int8" in signature.graphs:
            return PublishedOnnx(signature=signature, exported=False, attached=False)
        signature = add_int8(resolved.path, data_dir=data_dir, progress=progress)
        attached = attach and is_registered(resolved)
        if attached:
            attach_onnx(resolved, signature)
        return PublishedOnnx(signature=signature, exported=True, attached=attached)
    result = export_model(
        resolved.path,
        name=resolved.name,
        version=resolved.version,
        fp16=fp16,
        int8=int8,
        exporter=exporter,
        opset=opset,
        data_dir=data_dir,
        progress=progress,
    )
    attached = attach and is_registered(resolved)
    if attached:
        attach_onnx(resolved, result.signature)
    return PublishedOnnx(signature=result.signature, exported=True, attached=attached, notes=result.exporter_notes)


def attach_onnx(resolved: ResolvedModel, signature: ExportSignature) -> None:
    """Puts onnx/ on the registry version it came from, with tags and the parity figures as metrics."""
    attach_artifacts(resolved.name, resolved.version, resolved.path / ONNX_DIR, ONNX_DIR)
    parity = signature.parity
    set_version_tags(
        resolved.name,
        resolved.version,
        {
            "export.onnx": ",".join(g.precision for k, g in sorted(signature.graphs.items()) if k.startswith("step")),
            "export.opset": signature.opset,
            "export.exporter": "dynamo" if signature.exporter.dynamo else "legacy",
        },
    )
    metrics = {
        "parity_fp32_max_abs_diff": max(parity.fp32_max_abs_diff.values()),
        "parity_sequence_max_abs_diff": parity.sequence_max_abs_diff,
    }
    if parity.fp16_max_abs_diff:
        metrics["parity_fp16_max_abs_diff"] = max(parity.fp16_max_abs_diff.values())
    if parity.int8 is not None:
        metrics["parity_int8_actions_max_abs_diff"] = max(d["actions"] for d in parity.int8.max_abs_diff.values())
    log_version_metrics(resolved.name, resolved.version, metrics)


def publish_plan(
    resolved: ResolvedModel,
    *,
    fp16: bool = False,
    max_batch: int | None = None,
    rebuild: bool = False,
    attach: bool = True,
    data_dir: str | Path | None = None,
) -> Path:
    """The TensorRT plan for this GPU model and TensorRT version: the version's own, else built here and attached.

    A plan is tied to the GPU model and the TensorRT version (`tensorrt/<gpu>__trt<ver>/`). One that
    another replica or `mobile-vla export --tensorrt` attached arrives with resolve_model; without
    one it is built here and attached, so the other replicas on this GPU model fetch it instead of
    building again. On one node, builders take turns (`plan_build_lock`): the second one waits and
    then keeps the plan the first one wrote. Builders on different nodes each build once; the plans
    are equivalent and the last attached one stays. After a failed build of the same graphs on this
    node no new build starts until its backoff has passed (`BuildFailures`: 5 min doubling to 1 h);
    `rebuild` ignores the backoff. A new plan is run on real frames against the fp32 ONNX graph before
    it is written (`plan_parity`): one above PLAN_TOLERANCE is refused like a failed build.

    Args:
        resolved: the model version (resolve it just before: that fetches plans attached since).
        fp16: the fp16 plan.
        max_batch: the largest batch the plan must take (a serve config's `max_batch_size`): a plan
            whose profile stops below it is rebuilt with this max batch, one at or above it is kept
            (None: keep any valid plan, build with DEFAULT_MAX_BATCH).
        rebuild: build even if a valid plan exists.
        attach: attach a new plan to the registry version.
        data_dir: dataset folder whose frames the parity check uses (None: MiniWorld renders).

    Returns:
        The plan file.

    Raises:
        ResourceError: no TensorRT or no CUDA GPU here.
        ModelError: the version has no verified ONNX graphs, TensorRT cannot build the plan, the plan
            answers too differently from the fp32 graph, or an earlier failed build here is still backing off.
    """
    trt = require_tensorrt()
    gpu_name = require_cuda_gpu()
    version = trt.__version__
    signature = load_signature(resolved.path / ONNX_DIR)
    with plan_build_lock(resolved.path, gpu_name, version, fp16):  # a builder beside us: wait, then use its plan
        if not rebuild:
            try:
                plan, meta = select_plan(resolved.path, signature, gpu_name, version, fp16)
            except ModelError as missing:
                log.info("no usable TensorRT plan for %s (%s); building one", resolved.uri, missing)
            else:
                if max_batch is None or meta.max_batch >= max_batch:
                    return plan
                log.warning(
                    "%s: the plan's max batch = %d is below the %d asked (a serve config's max_batch_size); "
                    "building one for %d",
                    plan,
                    meta.max_batch,
                    max_batch,
                    max_batch,
                )
        failures = BuildFailures(resolved.path, gpu_name, version, fp16)
        onnx_id = ",".join(sorted(graph.sha256 for graph in signature.graphs.values()))
        if not rebuild:
            failures.check(onnx_id)  # a failed build here backs off before the next one
        try:
            check = plan_parity(resolved.path, signature, data_dir)
            folder = build_engine(
                resolved.path, signature, max_batch=max_batch or DEFAULT_MAX_BATCH, fp16=fp16, check=check
            )
        except Exception as exc:  # TensorRT raises its own classes too; each failure counts
            delay = failures.record(onnx_id, f"{type(exc).__name__}: {str(exc).splitlines()[0][:500]}")
            log.warning("TensorRT build for %s failed; no new build here for %.0f s", resolved.uri, delay)
            raise
        failures.clear()
        plan, _ = select_plan(resolved.path, signature, gpu_name, version, fp16)
    if attach and is_registered(resolved):
        attach_artifacts(resolved.name, resolved.version, folder, f"{TENSORRT_DIR}/{folder.name}")
        precision = "fp16" if fp16 else "fp32"
        set_version_tags(resolved.name, resolved.version, {f"export.tensorrt.{folder.name}": precision})
    return plan


def plan_parity(model_dir: Path, signature: ExportSignature, data_dir: str | Path | None = None):
    """The build-time check of a new plan (build_engine's `check`): it runs the plan bytes on real frames
    (graph_parity.compare_steps: batch 1 and 8, a window-step round trip) against the fp32 ONNX graph on
    the CPU, returns the figures for engine.json, or raises ModelError naming each figure over
    PLAN_TOLERANCE (nothing is written then; serving keeps the version on ONNX Runtime).
    """

    def check(plan_bytes: bytes, meta: EngineMeta) -> dict:
        precision = meta.precision
        onnx_dir = Path(model_dir) / ONNX_DIR
        preprocessing = Preprocessing.load(Path(model_dir) / signature.preprocessing.saved_at)
        text = parity.cpu_session(onnx_dir / signature.graph("text_encoder").file)

        def encode(clip_input_ids):
            return text.run(None, {"clip_input_ids": clip_input_ids})[0]

        where = f"new {plan_file_name(precision == 'fp16')} for {meta.gpu} (not written)"
        runner = TensorRTRunner.from_plan_bytes(plan_bytes, meta, signature, where, device=PLAN_DEVICE)
        batches = tuple(b for b in PLAN_PARITY_BATCHES if b <= meta.max_batch)
        count = max(max(batches), 2 * preprocessing.window)
        frames = parity.parity_frames(count, preprocessing.image_size, data_dir)
        reference = session_step(parity.cpu_session(onnx_dir / signature.graph("step_fp32").file))
        memory = (signature.recurrent.layers, signature.recurrent.hidden)
        figures = compare_steps(reference, runner.run_numpy, preprocessing, encode, memory, frames.images, batches)
        tolerance = PLAN_TOLERANCE[precision]
        failures = over_tolerance(figures, {"actions": tolerance, "confidence": tolerance})
        if failures:
            raise ModelError(
                f"TensorRT {precision} plan refused for {meta.gpu}: it answers differently from the fp32 ONNX "
                f"graph ({'; '.join(failures)}); no plan written, the version keeps serving on ONNX Runtime"
            )
        return {"frames": frames.source, "tolerance": tolerance, "reference": "onnx step_fp32", "max_abs_diff": figures}

    return check
