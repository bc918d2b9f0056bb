"""Spreading evaluation over Ray tasks, shared by closed-loop and offline evaluation.

    rows = fan_out(rollout_seeds, chunks, (spec_json, policy, settings), "closed loop val", progress=True)

Ray: `mobile_vla.ray_session.ensure_ray` (the running cluster, `RAY_ADDRESS`, or a local one).
One task per chunk of work, one CPU each; a task's user error (a bad model file, a refused
request) comes back as itself, anything else as a ResourceError naming the chunk; on failure or
Ctrl-C the remaining tasks are cancelled.

The tasks run in worker processes of their own (a runtime env that only adds WORKER_POOL_VAR): a
worker that already rendered MiniWorld frames for another job (data generation, parity checks)
crashes when torch later loads triton into it (two LLVMs: triton's and Mesa's software GL), and
Ray would otherwise hand such a worker to an evaluation task. Evaluation workers load triton before
any GL (see rollout.py), so they can run both kinds of task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mobile_vla.errors import MobileVLAError, ResourceError
from mobile_vla.ray_session import ensure_ray

WORKER_POOL_VAR = "MOBILE_VLA_WORKER_POOL"


def fan_out(
    body: Callable, chunks: list[list], args: tuple, description: str, progress: bool = True, num_gpus: float = 0
) -> list:
    """Runs `body(chunk, *args)` as one Ray task per chunk; returns the tasks' lists concatenated
    (in completion order) while a progress bar counts finished chunk items.
    """
    ensure_ray()
    task = ray.remote(
        num_cpus=1, num_gpus=num_gpus, max_retries=0, runtime_env={"env_vars": {WORKER_POOL_VAR: "evaluate"}}
    )(body)
    pending = {task.remote(chunk, *args): chunk for chunk in chunks}
    results: list = []
    with _Progress(progress, description, sum(len(c) for c in chunks)) as advance:
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                chunk = pending.pop(done[0])
                results.extend(_get(done[0], chunk, description))
                advance(len(chunk))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    return results


def _get(ref, chunk: list, description: str):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MobileVLAError):
            raise type(cause)(str(cause)) from None
        shown = f"{chunk[0]!r}..{chunk[-1]!r}" if len(chunk) > 1 else repr(chunk[0])
        raise ResourceError(f"{description}: task for {shown} failed: {type(cause).__name__}: {cause or exc}") from exc


class _Progress:
    """A rich progress bar (or nothing): `with _Progress(...) as advance: advance(n)`."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def jsonable(value: Any) -> Any:
    """Results as JSON: arrays to (rounded) lists, NaN/inf to null."""
    if isinstance(value, np.ndarray):
        return jsonable(np.round(value.astype(np.float64), 4).tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value
