"""Issue 16: one robot's input or output never fails its batch-mates in a policy replica. The real
ONNX Runtime backend on the tiny exported model; the replica's batch body without Ray Serve."""

from __future__ import annotations

import asyncio
import time
from unittest.mock import MagicMock

import numpy as np
import pytest

from mobile_vla.runtime.backends import load_backend
from mobile_vla.runtime.base import BackendOutput
from mobile_vla.serve.deployments import OnnxReplica
from mobile_vla.serve.model_versions import LoadedModel
from mobile_vla.serve.schemas import StepFailure, StepRequest, StepResult

INSTRUCTION = "go to the red box"


@pytest.fixture(scope="module")
def model(exported_dir) -> LoadedModel:
    backend = load_backend(exported_dir, prefer=["onnx-cpu"])
    h, _ = backend.initial_memory(1)
    return LoadedModel(backend, "m", "1", None, str(exported_dir), tuple(np.delete(h.shape, 1)))


def _replica() -> OnnxReplica:
    """The replica body without its Serve machinery (no alias watcher thread, metrics recorded in a mock)."""
    replica = OnnxReplica.__new__(OnnxReplica)
    replica._metrics, replica._batches, replica._batched_requests = MagicMock(), 0, 0
    return replica


def _step(robot: str, state=(0.1, 0.0, -0.2), deadline=None) -> StepRequest:
    image = np.full((224, 224, 3), 90, np.uint8)
    return StepRequest(robot, image, np.asarray(state, np.float32), INSTRUCTION, deadline=deadline)


def _run(replica: OnnxReplica, model: LoadedModel, steps: list[StepRequest]) -> list:
    replica._model = model
    chunks = type(replica)._predict_chunks.__wrapped__  # the merged batch as @serve.batch hands it over
    [answers] = asyncio.run(chunks(replica, [steps]))
    return answers


def test_a_state_that_overflows_once_normalised_is_refused_alone_in_one_batch(model):
    replica = _replica()
    huge = float(np.finfo(np.float32).max)  # finite as float32; (x - mean) / std is not
    steps = [_step("ok-1"), _step("huge", state=(huge, 0.0, 0.0)), _step("ok-2")]
    answers = _run(replica, model, steps)
    assert isinstance(answers[1], StepFailure) and answers[1].refused and "state.0" in answers[1].error
    assert all(isinstance(a, StepResult) and np.isfinite(a.actions).all() for a in (answers[0], answers[2]))
    assert replica._batches == 1  # the good robots ran once, as one batch: no robot-by-robot retry


def test_a_step_past_its_deadline_is_dropped_before_the_model_runs(model):
    replica = _replica()
    late = _step("late", deadline=time.time() - 0.001)
    answers = _run(replica, model, [late, _step("in-time", deadline=time.time() + 60)])
    assert isinstance(answers[0], StepFailure) and answers[0].expired and not answers[0].refused
    assert isinstance(answers[1], StepResult) and replica._batched_requests == 1  # only the live one computed


def test_a_non_finite_output_fails_that_robot_alone(model, monkeypatch):
    replica = _replica()
    step = model.backend._step

    def one_row_nan(feeds):  # fault injection: the graph returns NaN for row 1 only
        out = step(feeds)
        out["actions"] = out["actions"].copy()
        out["actions"][1] = np.nan
        return out

    monkeypatch.setattr(model.backend, "_step", one_row_nan)
    answers = _run(replica, model, [_step("a"), _step("b"), _step("c")])
    assert isinstance(answers[1], StepFailure) and not answers[1].refused and not answers[1].expired
    assert [type(a) for a in answers] == [StepResult, StepFailure, StepResult]


def test_backend_output_names_its_non_finite_rows():
    actions = np.zeros((3, 10, 3), np.float32)
    h = np.zeros((1, 3, 4), np.float32)  # [layers, B, hidden]
    c = h.copy()
    c[0, 2, 1] = np.inf
    confidence = np.array([0.5, np.nan, 0.5], np.float32)
    assert BackendOutput(actions, confidence, (h, c)).nonfinite_rows() == [1, 2]
