"""Chunk execution on the robot: run the current action chunk at the control rate while the next
request is in flight (docs/http_api.md "Chunk execution").

The core, `ChunkExecutor`, does no I/O and reads no clock: it holds the chunk being executed, indexed
by control step, and answers "which action now?" for a step cursor that the caller advances once per
control tick. A new answer is taken in with `accept(actions, anchor_step, model_version)`:

- **skip**: `actions[i]` is for step `anchor_step + i` (the server echoes the request's `step` as
  `anchor_step`); rows for steps the robot has already passed while the request was in flight are
  dropped (overtaken);
- **aligned replace**: the remaining rows replace the current chunk from the current step on;
- **blend**: over the first `blend_steps` steps after the seam the command moves linearly from the
  old chunk's to the new chunk's (weight of the new one (j + 1) / (blend_steps + 1) at the j-th step),
  where the old chunk still has a row for that step;
- **model-version change**: a chunk of another model version replaces without blending (two models'
  plans do not mix), and so does a chunk accepted with `blend=False` (e.g. a safety stop: zeros at once).

A chunk all of whose rows are overtaken, or one anchored before the chunk being executed (an answer
that arrived out of order), is ignored. Past the end of its chunk the robot gets zeros (stand still):
`exhausted` says so.

The drivers that tick it at the control rate with one request in flight live in `runners.py`:
`ChunkRunner` (a thread, over a `Client`) and `AsyncChunkRunner` (an asyncio loop, over an `AsyncClient`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ACTION_DIM = 3  # linear_x m/s, linear_y m/s, angular_z rad/s


@dataclass(frozen=True)
class Accepted:
    """What `ChunkExecutor.accept` did with an answer."""

    used: bool  # the chunk replaced the current one (False: ignored, see `reason`)
    skipped: int  # rows already overtaken when it arrived (steps anchor_step .. step - 1)
    blended: int  # steps after the seam whose command mixes the old chunk's and the new one's
    reason: str  # replaced | version_change | no_blend | first | overtaken | out_of_order


class ChunkExecutor:
    """The action for each control step from the latest action chunk (pure: no clock, no I/O).

        executor = ChunkExecutor(blend_steps=2)
        executor.accept(answer.actions, answer.anchor_step, answer.model.version)  # when an answer arrives
        action = executor.tick()  # once per control tick: float64 [3] for the step `executor.step`, then step += 1

    `step` is the robot's step cursor: the step the next `tick()` executes. Send it as the request's
    `step` when the frame is taken (`Client.act(..., step=executor.step)`).
    """

    def __init__(self, blend_steps: int = 2, start_step: int = 0) -> None:
        if isinstance(blend_steps, bool) or not isinstance(blend_steps, int) or blend_steps < 0:
            raise ValueError(f"blend_steps: expected a whole number >= 0, got {blend_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected a whole number >= 0, got {start_step!r}")
        self.blend_steps = blend_steps
        self.step = start_step
        self._chunk = np.zeros((0, ACTION_DIM))  # float64 [R, 3]: row r is for step self._first + r
        self._first = start_step
        self._anchor: int | None = None  # anchor_step of the chunk being executed
        self._version: str | None = None
        self._blend_until = start_step  # steps < this mix self._old in
        self._old = np.zeros((0, ACTION_DIM))  # float64 [R', 3]: the previous chunk from self._first
        self.last_seam_step: int | None = None  # the first step executed from the latest accepted chunk

    @property
    def model_version(self) -> str | None:
        """The model version of the chunk being executed (None before the first, or when not given)."""
        return self._version

    @property
    def exhausted(self) -> bool:
        """No row of the current chunk is left for the current step: `tick()` gives zeros (stand still)."""
        return not 0 <= self.step - self._first < len(self._chunk)

    def remaining(self) -> int:
        """Rows of the current chunk left from the current step on."""
        return max(0, self._first + len(self._chunk) - self.step)

    def accept(
        self,
        actions: Sequence[Sequence[float]] | np.ndarray,
        anchor_step: int,
        model_version: str | None = None,
        blend: bool = True,
    ) -> Accepted:
        """Takes in an answer's chunk, `actions[i]` for step `anchor_step + i`; see the module docstring."""
        chunk = np.asarray(actions, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or not len(chunk):
            raise ValueError(f"actions: expected K x {ACTION_DIM} with K >= 1, got shape {list(chunk.shape)}")
        if not np.isfinite(chunk).all():
            raise ValueError("actions: not all finite")
        anchor = int(anchor_step)
        if anchor > self.step:
            raise ValueError(f"anchor_step {anchor} is ahead of the step cursor {self.step}: send the cursor as `step`")
        skipped = max(0, self.step - anchor)
        if self._anchor is not None and anchor < self._anchor:
            return Accepted(False, skipped, 0, "out_of_order")
        if skipped >= len(chunk):
            return Accepted(False, skipped, 0, "overtaken")
        version = None if model_version is None else str(model_version)
        first_chunk = self._anchor is None
        changed = not first_chunk and version is not None and self._version is not None and version != self._version
        old = self._rows_from(self.step)  # [R', 3]: what the old chunk still had for steps >= self.step
        if first_chunk:
            reason = "first"
        elif changed:
            reason = "version_change"
        elif not blend:
            reason = "no_blend"
        else:
            reason = "replaced"
        mixing = reason == "replaced"
        blended = min(self.blend_steps, len(chunk) - skipped, len(old)) if mixing else 0
        self._old = old if blended else np.zeros((0, ACTION_DIM))
        self._chunk, self._first = chunk[skipped:], self.step
        self._anchor, self._version = anchor, version if version is not None else self._version
        self._blend_until = self.step + blended
        self.last_seam_step = self.step
        return Accepted(True, skipped, blended, reason)

    def action_at(self, step: int) -> np.ndarray:
        """The command for `step` from the current chunk (blended near the seam), float64 [3]; zeros
        outside it. Does not move the cursor.
        """
        r = step - self._first
        if not 0 <= r < len(self._chunk):
            return np.zeros(ACTION_DIM)
        action = self._chunk[r]
        if step < self._blend_until and r < len(self._old):
            weight = (r + 1) / (self.blend_steps + 1)  # of the new chunk
            action = weight * action + (1.0 - weight) * self._old[r]
        return action.copy()

    def tick(self) -> np.ndarray:
        """The command to execute now (float64 [3]), and the cursor moves to the next step."""
        action = self.action_at(self.step)
        self.step += 1
        return action

    def _rows_from(self, step: int) -> np.ndarray:
        """The rows of the current chunk, as executed (blend included), for steps `step`, `step + 1`, ..."""
        r = max(0, step - self._first)
        return np.array([self.action_at(self._first + i) for i in range(r, len(self._chunk))]).reshape(-1, ACTION_DIM)
