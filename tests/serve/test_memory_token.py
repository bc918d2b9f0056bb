import numpy as np
import pytest

from mobile_vla.serve.memory_token import MemoryCodec, MemoryTokenError, RecurrentMemory, load_or_create_secret

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
    prefix, payload, signature = token.split(".")
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    for bad in [f"{prefix}.{flipped}.{signature}", "m1.abc.def", "not-a-token", token + "x", "", "m1..", "é.é.é"]:
        with pytest.raises(MemoryTokenError):
            codec.decode(bad)
    with pytest.raises(MemoryTokenError, match="signature"):
        MemoryCodec(b"t" * 32).decode(token)  # signed with another server's secret


def test_secret_is_created_once_private_and_stable(tmp_path):
    path = tmp_path / "serve" / "memory_secret"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first and len(first) >= 32
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError):
        MemoryCodec(b"short")
