"""ChunkExecutor: skip, aligned replace, blend at the seam, version change (pure: no clock, no sleeping).
Its drivers, ChunkRunner and AsyncChunkRunner: test_runners.py."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla_client import ChunkExecutor


def _chunk(base: float, k: int = 5) -> np.ndarray:
    """K x 3 rows whose linear_x is base, base + 1, ... (row i identifies itself)."""
    return np.stack([np.array([base + i, 0.0, 0.0]) for i in range(k)])


def _run(executor: ChunkExecutor, ticks: int) -> list[float]:
    return [float(executor.tick()[0]) for _ in range(ticks)]


def test_before_any_chunk_and_past_its_end_the_robot_stands_still():
    executor = ChunkExecutor(blend_steps=0)
    assert executor.exhausted and _run(executor, 2) == [0.0, 0.0]
    assert executor.accept(_chunk(10, k=3), anchor_step=2).reason == "first"
    assert _run(executor, 4) == [10.0, 11.0, 12.0, 0.0] and executor.exhausted and executor.step == 6


def test_overtaken_actions_are_skipped_and_the_rest_replace_aligned():
    executor = ChunkExecutor(blend_steps=0)
    executor.accept(_chunk(0), anchor_step=0)
    assert _run(executor, 2) == [0.0, 1.0]  # steps 0, 1 from the first chunk; a request went out at step 1
    assert _run(executor, 2) == [2.0, 3.0]  # steps 2, 3 executed while it was in flight
    accepted = executor.accept(_chunk(100), anchor_step=1)  # its rows are for steps 1..5
    assert (accepted.used, accepted.skipped, accepted.blended, accepted.reason) == (True, 3, 0, "replaced")
    assert executor.remaining() == 2 and _run(executor, 3) == [103.0, 104.0, 0.0]  # row 3 is for step 4


def test_the_seam_blends_linearly_from_the_old_chunk_to_the_new():
    executor = ChunkExecutor(blend_steps=3)
    executor.accept(_chunk(0, k=10), anchor_step=0)
    _run(executor, 2)  # steps 0, 1; now at step 2 the old chunk would give 2, 3, 4, 5, ...
    accepted = executor.accept(_chunk(100, k=10), anchor_step=2)  # new: 100, 101, 102, 103, ...
    assert accepted.blended == 3 and executor.last_seam_step == 2
    got = _run(executor, 5)
    weights = [0.25, 0.5, 0.75]  # of the new chunk at the first 3 steps after the seam
    expected = [w * (100 + j) + (1 - w) * (2 + j) for j, w in enumerate(weights)] + [103.0, 104.0]
    assert got == pytest.approx(expected)


def test_blending_stops_where_the_old_chunk_ends():
    executor = ChunkExecutor(blend_steps=3)
    executor.accept(_chunk(0, k=3), anchor_step=0)
    _run(executor, 2)  # only row 2 (step 2) of the old chunk is left
    assert executor.accept(_chunk(100), anchor_step=2).blended == 1
    assert _run(executor, 2) == pytest.approx([0.25 * 100 + 0.75 * 2, 101.0])


def test_a_model_version_change_replaces_without_blending():
    executor = ChunkExecutor(blend_steps=3)
    executor.accept(_chunk(0), anchor_step=0, model_version="7")
    _run(executor, 1)
    accepted = executor.accept(_chunk(100), anchor_step=1, model_version="8")
    assert (accepted.reason, accepted.blended) == ("version_change", 0) and executor.model_version == "8"
    assert _run(executor, 2) == [100.0, 101.0]
    assert executor.accept(_chunk(200), anchor_step=3, model_version="8").reason == "replaced"  # same version: blends


def test_blend_false_replaces_at_once_for_a_stop():
    executor = ChunkExecutor(blend_steps=3)
    executor.accept(_chunk(1), anchor_step=0)
    _run(executor, 1)
    assert executor.accept(np.zeros((5, 3)), anchor_step=1, blend=False).reason == "no_blend"
    assert _run(executor, 2) == [0.0, 0.0]


def test_answers_that_are_all_overtaken_or_out_of_order_are_ignored():
    executor = ChunkExecutor(blend_steps=0)
    executor.accept(_chunk(0, k=10), anchor_step=0)
    _run(executor, 6)
    assert executor.accept(_chunk(100, k=3), anchor_step=2).reason == "overtaken"  # rows for steps 2..4
    executor.accept(_chunk(200), anchor_step=5)
    assert executor.accept(_chunk(300), anchor_step=4).reason == "out_of_order"
    assert _run(executor, 1) == [201.0]


@pytest.mark.parametrize(
    ("actions", "anchor", "message"),
    [(np.zeros((5, 2)), 0, "K x 3"), (np.full((2, 3), np.nan), 0, "finite"), (_chunk(0), 9, "ahead of the step")],
)
def test_bad_chunks_are_refused_with_the_reason(actions, anchor, message):
    with pytest.raises(ValueError, match=message):
        ChunkExecutor().accept(actions, anchor_step=anchor)
