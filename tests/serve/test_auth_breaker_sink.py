import json
import os

import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.serve.auth import TokenVerifier, create_tokens_file, resolve_tokens_path
from mobile_vla.serve.feedback_sink import JsonlFeedbackSink, read_feedback
from mobile_vla.serve.routing import BreakerState, CircuitBreaker


def test_tokens_are_hashed_and_checked(tmp_path):
    path = tmp_path / "tokens"
    token = create_tokens_file(path)
    with path.open("a") as handle:
        handle.write("# a comment\n\nsecond-token-0123456789\n")
    verifier = TokenVerifier.from_file(path)
    assert token not in repr(verifier) and token not in repr(vars(verifier))
    assert verifier.verify_header(f"Bearer {token}")
    assert verifier.verify_header("bearer second-token-0123456789")
    for bad in [None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer ", "Bearer a-wrong-token-123456"]:
        assert not verifier.verify_header(bad)


def test_token_file_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBILE_VLA_TOKENS_FILE", raising=False)
    with pytest.raises(ConfigError, match="MOBILE_VLA_TOKENS_FILE"):
        resolve_tokens_path(None)
    with pytest.raises(ConfigError, match="not found"):
        TokenVerifier.from_file(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="line 1"):
        TokenVerifier.from_file(short)


def test_breaker_opens_after_failures_probes_once_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=5.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 5.1
    assert breaker.allow()  # the single probe
    assert not breaker.allow()  # others wait for it
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 10.3
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_feedback_sink_appends_durably_and_readers_dedupe(tmp_path):
    sink = JsonlFeedbackSink(tmp_path / "feedback")
    record = {"robot_id": "r-1", "episode_id": "e1", "step": 0, "action_executed": [0.1, 0.0, 0.0]}
    sink.append(record)
    sink.append(record)  # a retried request
    sink.append({**record, "step": 1})
    sink.append({**record, "robot_id": "r-2"})
    lines = (tmp_path / "feedback" / "r-1.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["step"] == 1
    with (tmp_path / "feedback" / "r-1.jsonl").open("a") as handle:
        handle.write('{"robot_id": "r-1", "epis')  # a crash mid-write
    keys = sorted((r["robot_id"], r["step"]) for r in read_feedback(tmp_path / "feedback"))
    assert keys == [("r-1", 0), ("r-1", 1), ("r-2", 0)]
    with pytest.raises(ValueError):
        sink.path_for("../escape")
    assert sorted(os.listdir(tmp_path / "feedback")) == ["r-1.jsonl", "r-2.jsonl"]
