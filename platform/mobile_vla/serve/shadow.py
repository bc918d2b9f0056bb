"""Shadow mode: a copy of live /v1/act steps goes to the shadow deployment (the challenger alias),
off the request path; only the agreement with the champion's answer is recorded.

After the champion's answer is computed, a background task sends the step to the shadow with the
shadow's own recurrent state for that robot (kept here, LRU, never in the robot's memory token).
Copies beyond `max_in_flight` are dropped, never queued, so a slow shadow cannot slow serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from mobile_vla.serve.metrics import IngressMetrics
from mobile_vla.serve.schemas import ShadowSummary, StepRequest, StepResult
from mobile_vla.serve.settings import ShadowConfig

logger = logging.getLogger("ray.serve")


class ShadowMirror:
    """Copies sampled steps to the shadow deployment and keeps the running agreement of this ingress."""

    def __init__(
        self,
        config: ShadowConfig,
        handle,
        metrics: IngressMetrics,
        on_compare: Callable[[StepResult, StepResult, float], None] | None = None,
    ):
        """`on_compare(served, mirrored, diff)` sees every comparison (the canary's divergence KPI)."""
        self.config, self._handle, self._metrics = config, handle, metrics
        self._on_compare = on_compare
        self._tasks: set[asyncio.Task] = set()
        self._memory: OrderedDict[str, tuple] = OrderedDict()  # robot_id -> (name, version, h, c)
        self._compared = self._agreed = self._errors = self._dropped = 0
        self._diff_sum = 0.0
        self._version: str | None = None

    def copy(self, step: StepRequest, champion: StepResult) -> None:
        """Fire and forget: the robot's answer is already computed and never waits for this."""
        if random.random() >= self.config.sample_rate:
            return
        if len(self._tasks) >= self.config.max_in_flight:
            self._dropped += 1
            self._metrics.shadow.inc(tags={"outcome": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._compare(step, champion))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, step: StepRequest, champion: StepResult) -> None:
        memory = self._memory.pop(step.robot_id, None)  # the shadow's own state for this robot
        name, version, h, c = memory if memory else (None, None, None, None)
        copy = dataclasses.replace(step, memory_name=name, memory_version=version, h=h, c=c)
        try:
            shadow = await self._handle.step.remote(copy)
        except Exception as exc:
            self._errors += 1
            self._metrics.shadow.inc(tags={"outcome": "error"})
            logger.warning("shadow failed: %s", str(exc).splitlines()[0][:200])
            return
        self._memory[step.robot_id] = (shadow.model_name, shadow.model_version, shadow.h, shadow.c)
        while len(self._memory) > self.config.memory_robots:
            self._memory.popitem(last=False)
        diff = float(np.abs(shadow.actions - champion.actions).mean())  # [K, 3] both
        agree = bool(np.abs(shadow.actions[0] - champion.actions[0]).max() <= self.config.tolerance)
        self._compared += 1
        self._agreed += agree
        self._diff_sum += diff
        self._version = shadow.model_version
        self._metrics.shadow.inc(tags={"outcome": "agree" if agree else "disagree"})
        self._metrics.shadow_action_diff.observe(diff)
        if self._on_compare is not None:
            self._on_compare(champion, shadow, diff)

    def summary(self) -> ShadowSummary:
        compared = self._compared
        return ShadowSummary(
            alias=self.config.alias,
            version=self._version,
            compared=compared,
            agreed=self._agreed,
            errors=self._errors,
            dropped=self._dropped,
            agreement=self._agreed / compared if compared else None,
            mean_abs_action_diff=self._diff_sum / compared if compared else None,
            in_flight=len(self._tasks),
        )
