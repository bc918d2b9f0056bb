"""benchmarks/delay_closed_loop.py's simulated delay, without a simulator or a model: a fake learner
whose n-th chunk of an episode is 10n, 10n + 1, ... shows which request and row each tick executes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/delay_closed_loop.py as a module (it imports its sibling bench_machine, as the script does)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("delay_closed_loop", ROOT / "benchmarks" / "delay_closed_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Learner:
    state_input = "previous_command"

    def start(self, episodes):
        self.requests = [0] * len(episodes)
        self.sent_states = []

    def reset_memory(self, slots):
        pass

    def chunks(self, slots, images, state, instructions):
        out = []
        for slot in slots:
            self.requests[slot] += 1
            out.append([[10.0 * self.requests[slot] + i, 0.0, 0.0] for i in range(5)])
        return np.asarray(out), np.ones(len(slots))


def _drive(bench, mode: str, ticks: int, delay: int = 1, blend_steps: int = 0):
    policy = bench.DelayedChunkPolicy(_Learner(), mode, delay, blend_steps)
    policy.start([("e-0", "go")])
    images, state = np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 3), np.float32)
    executed = [float(policy.act([0], images, state, ["go"], None)[0][0, 0]) for _ in range(ticks)]
    return executed, policy


def test_delay_ticks_rounds_the_round_trip_up_to_whole_control_periods(bench):
    assert [bench.delay_ticks(ms, 5.0) for ms in (0, 150, 200, 201)] == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="control_hz"):
        bench.delay_ticks(150, 0)


def test_zero_delay_executes_a_fresh_chunks_first_row_every_tick(bench):
    executed, policy = _drive(bench, "zero_delay", 3)
    assert executed == [10.0, 20.0, 30.0] and policy.learner.requests == [3]
    assert [float(d[0]) for d in policy.seam_deltas] == [10.0, 10.0]  # the first chunk is no seam


def test_the_executor_runs_the_chunk_while_the_next_request_is_in_flight(bench):
    executed, policy = _drive(bench, "executor", 4)
    # tick 0: request 1 out, nothing to run; tick t >= 1: chunk t (anchored at t - 1) arrives, its row 1 runs
    assert executed == [0.0, 11.0, 21.0, 31.0] and policy.learner.requests == [4]  # one request per tick
    assert [float(d[0]) for d in policy.seam_deltas] == [10.0, 10.0]


def test_the_executor_blends_at_the_seam(bench):
    executed, policy = _drive(bench, "executor", 3, blend_steps=1)
    assert executed == [0.0, 11.0, pytest.approx(0.5 * 21 + 0.5 * 12)]  # old chunk's row for tick 2 is 12


def test_blocking_stands_still_while_it_waits_and_sends_after_executing(bench):
    executed, policy = _drive(bench, "blocking", 6)
    assert executed == [0.0, 10.0, 0.0, 20.0, 0.0, 30.0] and policy.learner.requests == [3]
    assert [float(d[0]) for d in policy.seam_deltas] == [20.0, 30.0]  # each answer starts from standstill
