"""What the ingress needs to know about the served model, read from the same version folder the
policy replicas load: the saved preprocessing (resize rule, S, K), the instruction tokenizer
(to refuse an instruction the model cannot take instead of truncating it) and the name/version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mobile_vla.errors import MobileVLAError


@dataclass
class ModelSide:
    name: str
    version: str
    alias: str | None
    uri: str
    state_dim: int
    chunk: int
    max_tokens: int | None
    prepare_image: Callable[[Any], np.ndarray]  # PIL image of any size -> uint8 [224, 224, 3]
    tokenize_one: Callable[[str], Any] | None


def load_model_side(model_uri: str, alias: str | None = None) -> ModelSide:
    from mobile_vla.export import load_signature
    from mobile_vla.policy.preprocessing import Preprocessing
    from mobile_vla.tracking import resolve_model

    resolved = resolve_model(model_uri)
    signature = load_signature(resolved.path / "onnx")
    preprocessing = Preprocessing.load(resolved.path / signature.preprocessing.saved_at)
    tokenizer = getattr(preprocessing, "tokenizer", None)

    def tokenize_one(text: str):
        try:
            return preprocessing.tokenize([text])
        except MobileVLAError as exc:
            raise ValueError(str(exc)) from None

    return ModelSide(
        name=signature.model.name or resolved.name or "unknown",
        version=str(signature.model.version or resolved.version or "unknown"),
        alias=alias or resolved.alias,
        uri=model_uri,
        state_dim=int(signature.preprocessing.state_dim),
        chunk=int(signature.chunk),
        max_tokens=getattr(tokenizer, "max_instruction_tokens", None),
        prepare_image=preprocessing.prepare_image,
        tokenize_one=tokenize_one,
    )
