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


# -- identity and scopes ------------------------------------------------------------------------------
def test_token_lines_bind_robots_and_scopes_and_plain_lines_keep_their_meaning(tmp_path):
    import hashlib

    from mobile_vla.serve.auth import LEGACY_SCOPES

    hashed = "robot-a-token-0123456789"
    path = tmp_path / "tokens"
    path.write_text(
        "legacy-token-0123456789\n"
        f"sha256:{hashlib.sha256(hashed.encode()).hexdigest()} robots=ra-1 scopes=act name=robot-a\n"
        "fleet-token-0123456789 robots=warehouse-a-*,r-9 scopes=act,feedback\n"
        "operator-token-0123456789 robots=* scopes=operator name=ops\n"
    )
    verifier = TokenVerifier.from_file(path)
    legacy = verifier.grant_for("Bearer legacy-token-0123456789")
    assert legacy.robots == ("*",) and legacy.scopes == frozenset(LEGACY_SCOPES)
    assert legacy.refusal("act", "any-robot") is None and legacy.refusal("feedback", "x") is None
    assert "operator" in legacy.refusal("operator")

    robot_a = verifier.grant_for(f"Bearer {hashed}")
    assert robot_a.name == "robot-a" and robot_a.refusal("act", "ra-1") is None
    refusal = robot_a.refusal("act", "rb-1")
    assert "robot-a" in refusal and "'rb-1'" in refusal and "ra-1" in refusal
    assert "'feedback' scope" in robot_a.refusal("feedback", "ra-1")
    assert verifier.grant_for(f"Bearer sha256:{hashlib.sha256(hashed.encode()).hexdigest()}") is None  # not a token

    fleet = verifier.grant_for("Bearer fleet-token-0123456789")
    assert fleet.covers("warehouse-a-17") and fleet.covers("r-9")
    assert not fleet.covers("warehouse-b-1") and not fleet.covers("r-90")

    ops = verifier.grant_for("bearer operator-token-0123456789")
    assert ops.refusal("operator") is None and ops.refusal("act", "r-1") is not None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("token-0123456789abcdef scopes=act,drive", "unknown scope 'drive'"),
        ("token-0123456789abcdef robots=../etc", "'../etc' is not a robot id"),
        ("token-0123456789abcdef robot=r-1", "'robot=r-1': expected robots="),
        ("token-0123456789abcdef robots=r-1 robots=r-2", "robots given twice"),
        ("sha256:abc robots=r-1", "64 hex digits"),
        ("token-0123456789abcdef\ntoken-0123456789abcdef robots=r-1", "line 2: the same token"),
    ],
)
def test_bad_token_entries_name_the_line_and_value(tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        TokenVerifier.from_file(path)


def test_verifier_follows_the_file_revocation_and_bad_edits(tmp_path):
    from mobile_vla.serve.auth import add_token, revoke_tokens

    path = tmp_path / "tokens"
    operator = create_tokens_file(path)
    robot = add_token(path, "r-1", ("act",), "r-1")
    assert robot not in path.read_text() and operator in path.read_text()  # added tokens are stored as digests
    verifier = TokenVerifier.from_file(path, reload_interval_s=0)
    assert verifier.grant_for(f"Bearer {robot}").name == "r-1"

    assert revoke_tokens(path, name="r-1") == ["r-1"]
    assert verifier.grant_for(f"Bearer {robot}") is None  # the same verifier object: no restart
    assert verifier.verify_header(f"Bearer {operator}")
    second = add_token(path, "r-2", ("act", "feedback"), "r-2")
    assert verifier.grant_for(f"Bearer {second}").covers("r-2")

    text = path.read_text()
    path.write_text(text + "half-written-lin")  # a broken edit keeps the last good table
    assert verifier.verify_header(f"Bearer {second}")
    path.unlink()  # so does a missing file
    assert verifier.verify_header(f"Bearer {second}")
    path.write_text(text)
    with pytest.raises(ConfigError, match="no token named"):
        revoke_tokens(path, name="r-1")
    with pytest.raises(ConfigError, match="exists already"):
        add_token(path, "r-3", ("act",), "r-2")


def test_watched_file_reads_at_most_once_per_interval(tmp_path):
    from mobile_vla.serve.watched_file import WatchedFile

    now = [0.0]
    reads = []
    path = tmp_path / "f"
    path.write_text("one")
    watched = WatchedFile(path, lambda content: reads.append(content) or content.decode(), 2.0, clock=lambda: now[0])
    path.write_text("two")
    assert watched.current() == "one"  # the interval has not passed: not even a stat
    now[0] = 2.0
    assert watched.current() == "two" and len(reads) == 2
    now[0] = 4.0
    assert watched.current() == "two" and len(reads) == 2  # unchanged content is not parsed again


def test_tokens_cli_adds_lists_and_revokes_without_showing_tokens(tmp_path, capsys):
    from mobile_vla.cli import main

    path = tmp_path / "tokens"
    create_tokens_file(path)
    assert main(["serve", "tokens", "add", "--file", str(path), "--name", "r-7", "--robots", "r-7"]) == 0
    token = capsys.readouterr().out.split("give it to the robot): ")[1].strip()
    assert TokenVerifier.from_file(path).grant_for(f"Bearer {token}").scopes == {"act", "feedback"}
    assert main(["serve", "tokens", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "r-7\trobots=r-7\tscopes=act,feedback" in listing and token not in listing
    assert main(["serve", "tokens", "add", "--file", str(path), "--name", "x", "--robots", "a/b"]) == 2
    assert "'a/b' is not a robot id" in capsys.readouterr().err
    assert main(["serve", "tokens", "revoke", "--file", str(path), "--token", token]) == 0
    assert TokenVerifier.from_file(path).grant_for(f"Bearer {token}") is None
    assert path.stat().st_mode & 0o077 == 0
