"""The TensorRT plan a policy replica needs before it can serve a version on this GPU.

A thin serving face of `mobile_vla.export.publish.publish_plan` (the one "ensure a plan and attach
it" step, shared with `mobile-vla export --tensorrt`): the replica resolves the URI afresh, so plans
other replicas attached meanwhile are fetched instead of built again.
"""

from __future__ import annotations

from pathlib import Path

from mobile_vla.export.publish import publish_plan
from mobile_vla.tracking import resolve_model


def ensure_engine(model_uri: str, fp16: bool = False, max_batch_size: int | None = None) -> Path:
    """Returns the plan for this GPU and TensorRT version, building (and attaching) it if none exists.

    `max_batch_size` is the deployment's (PolicyUserConfig): a plan whose profile stops below it is
    rebuilt for it (the warning names both), so a full batch runs in one call. Plans built at promotion
    time with `mobile-vla export --tensorrt --max-batch <max_batch_size>` are kept as they are.
    """
    return publish_plan(resolve_model(model_uri), fp16=fp16, max_batch=max_batch_size)
