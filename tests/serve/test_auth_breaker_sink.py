import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.serve.auth import TokenVerifier, create_tokens_file, resolve_tokens_path
from mobile_vla.serve.router import BreakerState, CircuitBreaker


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


def test_data_inspect_reads_a_raw_feedback_root(tmp_path, capsys):
    """What serving writes (the FeedbackStore behind /v1/feedback) is readable with `mobile-vla data inspect`."""
    import base64
    import io
    import json

    from PIL import Image

    from mobile_vla.cli import main
    from mobile_vla.online.feedback_store import FeedbackStore

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    record = {
        "robot_id": "r-1",
        "episode_id": "e1",
        "step": 0,
        "instruction": "go",
        "state": [0.0, 0.0, 0.0],
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "action_executed": [0.1, 0.0, 0.0],
    }
    with FeedbackStore(tmp_path / "feedback") as store:
        store.append(record)
        store.append(record)  # a retried request
        store.append({**record, "step": 1, "action_corrected": [0.0, 0.0, 0.0], "episode_done": True, "success": True})
    assert main(["data", "inspect", str(tmp_path / "feedback"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["records"], summary["unique_steps"], summary["episodes"]) == (3, 2, 1)
    assert summary["corrected_steps"] == 1 and summary["success_rate"] == 1.0
    assert main(["data", "inspect", str(tmp_path / "feedback")]) == 0
    assert "finished_episodes" in capsys.readouterr().out
