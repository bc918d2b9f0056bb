"""The hybrid policy: Kosmos-2 + CLIP features, fused, LSTM head -> action chunk + confidence.

    from mobile_vla.policy import build_policy, presets
    model = build_policy(presets.tiny())

Light at import (the CLI imports this package): torch, transformers and open_clip load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mobile_vla.policy import presets
from mobile_vla.policy.config import ClipConfig, KosmosConfig, PolicyConfig

_LAZY = {
    "build_policy": "mobile_vla.policy.model",
    "MobileVLAPolicy": "mobile_vla.policy.model",
    "PolicyOutput": "mobile_vla.policy.model",
    "policy_loss": "mobile_vla.policy.losses",
    "action_metrics": "mobile_vla.policy.losses",
    "save_policy": "mobile_vla.policy.checkpoint",
    "load_policy": "mobile_vla.policy.checkpoint",
    "build_tokenizer": "mobile_vla.policy.text",
    "load_tokenizer": "mobile_vla.policy.text",
    "TextTokenizer": "mobile_vla.policy.text",
    "save_random_policy": "mobile_vla.policy.random_policy",
    "untrained_preprocessing": "mobile_vla.policy.random_policy",
}

__all__ = ["ClipConfig", "KosmosConfig", "PolicyConfig", "presets", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mobile_vla.policy' has no attribute {name!r}")
