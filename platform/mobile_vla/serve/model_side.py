"""What the ingress needs to know about the served model, read from the same version folder the
policy replicas load: the saved preprocessing (resize rule, S, K) and the name/version. The
instruction is not tokenised here: the policy replica does that once (and refuses, with a 422, an
instruction with more tokens than the model takes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mobile_vla.export.signature import load_signature
from mobile_vla.policy.novelty import SafetyThresholds
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.runtime.base import safety_for
from mobile_vla.tracking import resolve_model


@dataclass
class ModelSide:
    """The served version's identity and the request checks the ingress applies for it."""

    name: str
    version: str
    alias: str | None
    uri: str
    state_dim: int
    chunk: int
    prepare_image: Callable[[Any], np.ndarray]  # PIL image of any size -> uint8 [224, 224, 3]
    control_hz: float = 5.0  # the robots' control rate the model was trained at: a step's default deadline is 1 / it
    image_size: int = 224  # what prepare_image makes (JPEGs larger than it are DCT-downscaled while decoding)
    state_input: str = "previous_command"  # what robots send as `state` (signature.json preprocessing.state_input)
    from_cache: bool = False  # read from the verified local cache while the registry was unreachable
    novelty: bool = False  # whether the policy replicas score novelty for this version (runtime.base.safety_for)
    safety_note: str = ""  # why novelty is on or off (GET /v1/model)
    calibrated: SafetyThresholds | None = None  # the version's calibrated safety thresholds


def load_model_side(model_uri: str, alias: str | None = None) -> ModelSide:
    """Reads `model_uri`'s signature and saved preprocessing (fetching the version's files if needed)."""
    resolved = resolve_model(model_uri)
    signature = load_signature(resolved.path / "onnx")
    preprocessing = Preprocessing.load(resolved.path / signature.preprocessing.saved_at, with_tokenizer=False)
    calibration, safety_note = safety_for(resolved.path, signature)
    return ModelSide(
        name=signature.model.name or resolved.name or "unknown",
        version=str(signature.model.version or resolved.version or "unknown"),
        alias=alias or resolved.alias,
        uri=model_uri,
        state_dim=int(signature.preprocessing.state_dim),
        state_input=signature.preprocessing.state_input,
        chunk=int(signature.chunk),
        prepare_image=preprocessing.prepare_image,
        control_hz=float(preprocessing.control_hz),
        image_size=int(preprocessing.image_size),
        from_cache=resolved.from_cache,
        novelty=calibration is not None,
        safety_note=safety_note,
        calibrated=calibration.thresholds if calibration is not None else None,
    )
