"""ChunkExecutor: skip, aligned replace, blend at the seam, version change (pure: no clock, no sleeping),
and ChunkRunner's bookkeeping over a fake client with futures completed by hand."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from mobile_vla_client import ActResult, ChunkExecutor, ChunkRunner, ModelRef, Safety


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


# -- the threaded driver, without threads that matter: the fake client returns futures we complete ---------
class _FakeClient:
    def __init__(self):
        self.calls = []

    def act(self, frame, state, delay_ms=None, step=None):
        self.calls.append({"state": state, "delay_ms": delay_ms, "step": step})
        return self.calls[-1]


def _answer(actions, anchor, version="1", level="normal", round_trip_ms=150.0):
    return ActResult(
        actions=np.asarray(actions, np.float64),
        confidence=0.9,
        memory="m",
        model=ModelRef("m", version),
        backend="onnx-cpu",
        memory_reset=False,
        latency_ms=5.0,
        round_trip_ms=round_trip_ms,
        anchor_step=anchor,
        safety=Safety(level),
    )


class _Pool:
    """Stands in for the runner's thread pool: futures stay pending until the test resolves them."""

    def __init__(self):
        self.futures = []

    def submit(self, fn, *args, **kwargs):
        fn(*args, **kwargs)
        self.futures.append(Future())
        return self.futures[-1]

    def shutdown(self, wait=True):
        pass


def test_the_runner_keeps_one_request_in_flight_and_executes_the_chunk_meanwhile():
    client, sent = _FakeClient(), []
    runner = ChunkRunner(client, lambda: ("frame", 20.0), lambda: [0.0, 0.0, 0.0], lambda *a: sent.append(a), 5.0)
    runner._pool = pool = _Pool()
    runner.tick()  # step 0: request 1 goes out with step 0; no chunk yet: stand still
    pool.futures[0].set_result(_answer(_chunk(10), anchor=0))
    runner.tick()  # step 1: the answer is taken in (row 0 overtaken), request 2 goes out with step 1
    runner.tick()  # step 2: request 2 still in flight, the chunk goes on
    assert [c["step"] for c in client.calls] == [0, 1]
    assert client.calls[0]["delay_ms"] == 20.0 and client.calls[1]["delay_ms"] == 170.0  # frame age + round trip
    pool.futures[1].set_result(_answer(np.zeros((5, 3)), anchor=1, level="stop"))
    runner.tick()  # step 3: a stop answer replaces at once, no blending
    pool.futures[2].set_exception(TimeoutError("no answer"))
    runner.tick()  # step 4: the failed call is counted, the next one goes out
    assert [a[0] for a in sent] == [0.0, 11.0, 12.0, 0.0, 0.0] and runner.errors == 1 and len(client.calls) == 4
    runner.close()


def test_the_runner_stops_on_low_confidence_and_drops_the_answer_of_a_past_episode():
    client, sent = _FakeClient(), []
    runner = ChunkRunner(client, lambda: "frame", lambda: [], lambda *a: sent.append(a[0]), 5.0, min_confidence=0.95)
    runner._pool = pool = _Pool()
    runner.tick()  # step 0: request 1 (confidence 0.9 < 0.95 when it comes)
    pool.futures[0].set_result(_answer(_chunk(10), anchor=0))
    runner.tick()  # step 1: zeros instead of 11; request 2
    runner.reset()  # a new episode while request 2 is in flight
    pool.futures[1].set_result(_answer(_chunk(20), anchor=1))
    runner.min_confidence = 0.0
    runner.tick()  # step 2: request 2's answer is ignored; request 3 goes out
    pool.futures[2].set_result(_answer(_chunk(30), anchor=2))
    runner.tick()  # step 3: request 3's chunk, row 1
    assert sent == [0.0, 0.0, 0.0, 31.0] and [c["step"] for c in client.calls] == [0, 1, 2, 3]
