r"""The memory token: the LSTM state a robot carries between /v1/act calls, so replicas stay stateless.

A token is `m1.<payload>.<signature>` (base64url, no padding). The payload is zlib-compressed
`header_json \n h_bytes c_bytes` with h and c stored as float16 [layers, hidden]; the header names
the model name and version the state belongs to, the robot and the shapes. The signature is
HMAC-SHA256 over the payload with a server secret, so a robot cannot forge or edit the state it
sends back: a bad signature or a malformed token is an error (4xx), while a valid token from
another model version is simply not used (the caller sets `memory_reset`).

The secret comes from `memory_secret_file` (app argument), else env MOBILE_VLA_MEMORY_SECRET_FILE,
else `$MOBILE_VLA_HOME/serve/memory_secret` (created once, mode 0600). Every ingress replica of a
multi-node deployment must read the same secret: mount it at the same path on each node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_vla.config import platform_home
from mobile_vla.errors import ConfigError

PREFIX = "m1"
MAX_TOKEN_CHARS = 1_000_000  # a token is a few KB; refuse anything absurd before decoding it
MAX_DECOMPRESSED_BYTES = 16 * 1024 * 1024
MIN_SECRET_BYTES = 32


class MemoryTokenError(ValueError):
    """A token that is malformed, tampered with or signed with another secret."""


@dataclass(frozen=True)
class RecurrentMemory:
    """The state of one robot: h and c each [layers, hidden] float32, tied to one model version."""

    model_name: str
    model_version: str
    robot_id: str
    h: np.ndarray
    c: np.ndarray


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise MemoryTokenError("memory token is not base64url") from exc


class MemoryCodec:
    """Encodes and verifies memory tokens with one server secret (held only here, never logged)."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"memory secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self._key = hashlib.sha256(b"mobile-vla memory token v1" + secret).digest()

    def __repr__(self) -> str:  # never show the key
        return "MemoryCodec(<secret>)"

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def encode(self, memory: RecurrentMemory) -> str:
        h = np.asarray(memory.h, dtype=np.float16)
        c = np.asarray(memory.c, dtype=np.float16)
        if h.shape != c.shape or h.ndim != 2:
            raise ValueError(f"h and c must both be [layers, hidden], got {h.shape} and {c.shape}")
        header = {
            "name": memory.model_name,
            "version": memory.model_version,
            "robot": memory.robot_id,
            "shape": list(h.shape),
        }
        raw = json.dumps(header, separators=(",", ":")).encode() + b"\n" + h.tobytes() + c.tobytes()
        payload = zlib.compress(raw, level=1)
        return f"{PREFIX}.{_b64encode(payload)}.{_b64encode(self._sign(payload))}"

    def decode(self, token: str) -> RecurrentMemory:
        """Verifies the signature first, then parses; every failure is a MemoryTokenError."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise MemoryTokenError("memory token is too long or not a string")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise MemoryTokenError(f"memory token must look like '{PREFIX}.<payload>.<signature>'")
        payload, signature = _b64decode(parts[1]), _b64decode(parts[2])
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise MemoryTokenError("memory token signature does not match (forged, edited or from another server)")
        try:
            decompressor = zlib.decompressobj()
            raw = decompressor.decompress(payload, MAX_DECOMPRESSED_BYTES)
            header_bytes, _, arrays = raw.partition(b"\n")
            header = json.loads(header_bytes)
            layers, hidden = (int(v) for v in header["shape"])
            n = layers * hidden
            values = np.frombuffer(arrays, dtype=np.float16)
            if values.size != 2 * n:
                raise ValueError(f"expected {2 * n} state values, found {values.size}")
            h = values[:n].reshape(layers, hidden).astype(np.float32)
            c = values[n:].reshape(layers, hidden).astype(np.float32)
            return RecurrentMemory(str(header["name"]), str(header["version"]), str(header["robot"]), h, c)
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            # Signed by us but unreadable: a bug or a format change, still the client's token to drop.
            raise MemoryTokenError(f"memory token payload is unreadable: {exc}") from exc


def default_secret_path() -> Path:
    """`$MOBILE_VLA_HOME/serve/memory_secret`."""
    return platform_home() / "serve" / "memory_secret"


def resolve_secret_path(memory_secret_file: str | None) -> Path:
    """App argument, else env MOBILE_VLA_MEMORY_SECRET_FILE, else the platform home's file."""
    chosen = memory_secret_file or os.environ.get("MOBILE_VLA_MEMORY_SECRET_FILE")
    return Path(chosen).expanduser().resolve() if chosen else default_secret_path()


def load_or_create_secret(path: Path) -> bytes:
    """Reads the secret; creates a random one (0600) when the file does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another replica won the race
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{path}: memory secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return secret
