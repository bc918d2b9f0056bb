import time

import numpy as np
import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.serve.memory_token import (
    MemoryCodec,
    MemoryTokenError,
    RecurrentMemory,
    load_or_create_secret,
    parse_memory_keys,
    prepare_memory_secret,
)
from mobile_vla.serve.watched_file import WatchedFile

SECRET = b"s" * 32


def _memory(version="3", robot="r-1", seed=0):
    rng = np.random.default_rng(seed)
    return RecurrentMemory(
        "mobile-vla-policy",
        version,
        robot,
        rng.normal(size=(2, 64)).astype(np.float32),
        rng.normal(size=(2, 64)).astype(np.float32),
    )


def test_round_trip_keeps_state_within_float16_and_version():
    codec = MemoryCodec(SECRET)
    memory = _memory()
    back = codec.decode(codec.encode(memory))
    assert (back.model_name, back.model_version, back.robot_id) == ("mobile-vla-policy", "3", "r-1")
    assert back.h.shape == (2, 64) and back.h.dtype == np.float32
    np.testing.assert_allclose(back.h, memory.h, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(back.c, memory.c, rtol=1e-3, atol=1e-3)


def test_tampered_forged_and_foreign_tokens_are_refused():
    codec = MemoryCodec(SECRET)
    token = codec.encode(_memory())
    prefix, key_id, payload, signature = token.split(".")
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    bad_tokens = [f"{prefix}.{key_id}.{flipped}.{signature}", "m1.abc.def", "m2.x.abc.def", "not-a-token"]
    for bad in [*bad_tokens, token + "x", "", "m1..", "m2...", "é.é.é", "m2.é.é.é"]:
        with pytest.raises(MemoryTokenError):
            codec.decode(bad)
    with pytest.raises(MemoryTokenError, match="another server"):
        MemoryCodec(b"t" * 32).decode(token)  # signed with another server's secret


def test_secret_is_created_once_private_and_stable(tmp_path):
    path = tmp_path / "serve" / "memory_secret"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first and len(first.keys) == 1
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError):
        MemoryCodec(b"short")


# -- key ids, rotation and the previous-key window ----------------------------------------------------
def _legacy_token(secret: bytes, token: str) -> str:
    """The same state as an m1 token (the format before key ids), signed the way that format was."""
    import hashlib
    import hmac

    from mobile_vla.serve.memory_token import MemoryKey, _b64decode, _b64encode

    payload = _b64decode(token.split(".")[2])
    signature = hmac.new(MemoryKey.from_secret(secret).key, payload, hashlib.sha256).digest()
    return f"m1.{_b64encode(payload)}.{_b64encode(signature)}"


def test_tokens_name_their_key_and_the_old_format_still_verifies(tmp_path):
    path = tmp_path / "memory_secret"
    path.write_text(SECRET.decode() + "\n")  # the one-secret file of the first format
    codec = MemoryCodec.from_file(path)
    token = codec.encode(_memory())
    prefix, key_id, _, _ = token.split(".")
    assert prefix == "m2" and key_id == load_or_create_secret(path).keys[0].key_id
    assert codec.decode(_legacy_token(SECRET, token)).robot_id == "r-1"
    with pytest.raises(MemoryTokenError, match="signature"):
        codec.decode(_legacy_token(b"t" * 32, token))
    with pytest.raises(MemoryTokenError, match="does not hold"):
        codec.decode(".".join(["m2", "0badc0de", *token.split(".")[2:]]))


def test_rotation_signs_with_the_new_key_and_verifies_the_old_one_during_the_window(tmp_path):
    from mobile_vla.serve.memory_token import rotate_memory_keys

    path = tmp_path / "memory_secret"
    load_or_create_secret(path)
    now = [1_000_000.0]
    codec = MemoryCodec(WatchedFile(path, lambda c: parse_memory_keys(c, str(path)), 0), clock=lambda: now[0])
    old_token = codec.encode(_memory())
    new_key = rotate_memory_keys(path, window_s=600, now=now[0])
    new_token = codec.encode(_memory())  # the same codec follows the file
    assert new_token.split(".")[1] == new_key.key_id != old_token.split(".")[1]
    assert codec.decode(old_token).robot_id == codec.decode(new_token).robot_id == "r-1"
    now[0] += 601  # the window has passed
    with pytest.raises(MemoryTokenError, match="does not hold"):
        codec.decode(old_token)
    assert codec.decode(new_token).robot_id == "r-1"
    rotate_memory_keys(path, window_s=60, now=now[0])
    assert len(parse_memory_keys(path.read_bytes(), "f").keys) == 2  # the expired key was dropped


def test_a_delayed_key_verifies_at_once_and_signs_from_its_start(tmp_path):
    from mobile_vla.serve.memory_token import rotate_memory_keys

    path = tmp_path / "memory_secret"
    old_key = load_or_create_secret(path).keys[0]
    start = time.time()
    new_key = rotate_memory_keys(path, window_s=600, activate_in_s=300, now=start)
    ring = parse_memory_keys(path.read_bytes(), str(path))
    early = MemoryCodec(ring, clock=lambda: start + 10)
    late = MemoryCodec(ring, clock=lambda: start + 301)
    assert early.encode(_memory()).split(".")[1] == old_key.key_id  # the file may not be on every node yet
    token = late.encode(_memory())
    assert token.split(".")[1] == new_key.key_id
    assert early.decode(token).robot_id == "r-1"  # a node whose clock is behind accepts it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short\n", "at least 32 bytes"),
        ("# only a comment\n", "holds no memory secret"),
        (f"{SECRET.decode()} until=2001-01-01T00:00:00Z\n", "the key in service must have none"),
        (f"{SECRET.decode()} from=yesterday\n", "not an ISO 8601 time"),
        (f"{SECRET.decode()} since=2001-01-01T00:00:00Z\n", "expected from="),
    ],
)
def test_bad_key_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "memory_secret"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        MemoryCodec.from_file(path)


def test_a_configured_secret_file_that_is_missing_fails_startup(tmp_path, monkeypatch):
    from mobile_vla.serve.app import ServeAppConfig, compose_app
    from mobile_vla.serve.auth import create_tokens_file

    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOBILE_VLA_MEMORY_SECRET_FILE", raising=False)
    create_tokens_file(tmp_path / "tokens")
    missing = tmp_path / "mounted" / "memory_secret"
    args = ServeAppConfig(tokens_file=str(tmp_path / "tokens"), memory_secret_file=str(missing))
    with pytest.raises(ConfigError, match=f"{missing}.*app argument memory_secret_file.*not found"):
        compose_app(args)
    monkeypatch.setenv("MOBILE_VLA_MEMORY_SECRET_FILE", str(missing))
    with pytest.raises(ConfigError, match="env MOBILE_VLA_MEMORY_SECRET_FILE"):
        compose_app(ServeAppConfig(tokens_file=str(tmp_path / "tokens")))
    assert not missing.exists()  # never created
    with pytest.raises(ConfigError, match="not found"):
        MemoryCodec.from_file(missing)  # nor by a replica
    monkeypatch.delenv("MOBILE_VLA_MEMORY_SECRET_FILE")
    assert prepare_memory_secret(None) == tmp_path / "home" / "serve" / "memory_secret"  # the local default: made
    assert (tmp_path / "home" / "serve" / "memory_secret").is_file()
