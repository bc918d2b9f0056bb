"""The TensorRT plan a policy replica needs before it can serve a version on this GPU.

A plan is tied to the GPU model and the TensorRT version (`tensorrt/<gpu>__trt<ver>/` in the model
version's folder). A replica that lacks one first looks in the registry (another replica or
`mobile-vla export --tensorrt` may have attached it), else builds it here and attaches it, so the
other replicas on this GPU model fetch it instead of building again. Replicas that start building
at the same moment each build once; the plans are equivalent and the last attached one stays.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("ray.serve")


def ensure_engine(model_uri: str, fp16: bool = False) -> Path:
    """Returns the plan for this GPU and TensorRT version, building (and attaching) it if none exists."""
    from mobile_vla.errors import ModelError
    from mobile_vla.export.signature import load_signature
    from mobile_vla.export.tensorrt_engine import (
        TENSORRT_DIR,
        build_engine,
        require_cuda_gpu,
        require_tensorrt,
        select_plan,
    )
    from mobile_vla.tracking import attach_artifacts, resolve_model

    trt = require_tensorrt()
    gpu_name = require_cuda_gpu()
    resolved = resolve_model(model_uri)  # also fetches plans attached to the version since the last call
    signature = load_signature(resolved.path / "onnx")
    try:
        plan, _ = select_plan(resolved.path, signature, gpu_name, trt.__version__, fp16)
        return plan
    except ModelError as missing:
        logger.info("no usable TensorRT plan for %s (%s); building one", model_uri, missing)
    folder = build_engine(resolved.path, signature, fp16=fp16)
    if resolved.name and resolved.version:
        attach_artifacts(resolved.name, resolved.version, folder, f"{TENSORRT_DIR}/{folder.name}")
    plan, _ = select_plan(resolved.path, signature, gpu_name, trt.__version__, fp16)
    return plan
