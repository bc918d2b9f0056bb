r"""The memory token: the LSTM state a robot carries between /v1/act calls, so replicas stay stateless.

A token is `m2.<key id>.<payload>.<signature>` (base64url, no padding). The payload is
zlib-compressed `header_json \n h_bytes c_bytes` with h and c stored as float16 [layers, hidden];
the header names the model name and version the state belongs to, the robot and the shapes, and
`stops`: how many answers in a row the safety ladder stopped the robot (serve/safety.py; absent in
older tokens, read as 0). The
signature is HMAC-SHA256 over the key id and the payload with a server key, so a robot cannot forge
or edit the state it sends back: a bad signature, an unknown key id or a malformed token is an error
(4xx), while a valid token from another model version is simply not used (the caller sets
`memory_reset`). Tokens of the format before key ids (`m1.<payload>.<signature>`) still verify
against every key in service.

The keys file (`memory_secret_file` app argument, else env MOBILE_VLA_MEMORY_SECRET_FILE, else
`$MOBILE_VLA_HOME/serve/memory_secret`) holds one key per line, blank lines and `#` ignored:

    <secret, at least 32 characters> [from=<ISO 8601 time>] [until=<ISO 8601 time>]

A line with the secret alone is today's one-secret file. New tokens are signed with the key in
service (`from` passed, `until` not yet) that came into service last; every key whose `until` has
not passed verifies (a key whose `from` lies ahead verifies already, so nodes that got the file early
accept each other's tokens). The key id is derived from the key (8 hex digits), so every node agrees
on it without naming keys. `mobile-vla serve memory-key rotate` writes a new key and gives the old
one an `until` (the previous-key window). A configured file must exist: a missing one fails startup
(never created per node, which would silently reset robots' memory between nodes); only the default
file under the platform home is created once for a local run. Every ingress replica follows the
file (`watched_file`): a rotation needs no redeploy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mobile_vla.config import platform_home
from mobile_vla.errors import ConfigError
from mobile_vla.serve.watched_file import DEFAULT_RELOAD_INTERVAL_S, WatchedFile, write_file_atomically

PREFIX = "m2"  # m2.<key id>.<payload>.<signature>
LEGACY_PREFIX = "m1"  # m1.<payload>.<signature>: before key ids; verified against every key in service
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
    stops: int = 0  # consecutive safety stops up to this answer (the handover rule counts them)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise MemoryTokenError("memory token is not base64url") from exc


@dataclass(frozen=True)
class MemoryKey:
    """One HMAC key of the keys file: its id and when it is in service (epoch seconds; None: unbounded)."""

    key_id: str
    key: bytes
    valid_from: float | None = None
    valid_until: float | None = None

    def __repr__(self) -> str:  # never show the key
        return f"MemoryKey({self.key_id}, from={self.valid_from}, until={self.valid_until})"

    @classmethod
    def from_secret(cls, secret: bytes, valid_from: float | None = None, valid_until: float | None = None) -> MemoryKey:
        """The key derived from a secret of at least MIN_SECRET_BYTES (the derivation of the first format)."""
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"memory secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        key = hashlib.sha256(b"mobile-vla memory token v1" + secret).digest()
        key_id = hashlib.sha256(b"mobile-vla memory key id" + key).hexdigest()[:8]
        return cls(key_id, key, valid_from, valid_until)

    def verifies_at(self, now: float) -> bool:
        """Accepted for verification at `now`: its `until` has not passed."""
        return self.valid_until is None or now < self.valid_until

    def signs_at(self, now: float) -> bool:
        """May sign at `now`: in service (`from` passed and `until` not)."""
        return (self.valid_from is None or self.valid_from <= now) and self.verifies_at(now)


@dataclass(frozen=True)
class MemoryKeyRing:
    """The keys of the keys file, in file order."""

    keys: tuple[MemoryKey, ...]

    def signing_key(self, now: float) -> MemoryKey:
        """The key in service that came into service last (the first such line on a tie)."""
        in_service = [k for k in self.keys if k.signs_at(now)]
        if not in_service:
            raise MemoryTokenError("no memory key is in service now (every key expired or starts later)")
        latest = max(-1e300 if k.valid_from is None else k.valid_from for k in in_service)
        return next(k for k in in_service if (-1e300 if k.valid_from is None else k.valid_from) == latest)

    def verifying_keys(self, now: float) -> list[MemoryKey]:
        """The keys whose `until` has not passed."""
        return [k for k in self.keys if k.verifies_at(now)]


def _parse_time(text: str, where: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an ISO 8601 time (e.g. 2026-12-06T14:00:00Z)") from None
    if moment.tzinfo is None:
        raise ConfigError(f"{where}: {text!r} has no time zone (add Z for UTC)")
    return moment.timestamp()


def format_time(epoch_s: float) -> str:
    """Epoch seconds as the keys file writes them: ISO 8601 UTC to the second (`...Z`)."""
    return datetime.fromtimestamp(round(epoch_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_key_line(line: str, where: str) -> MemoryKey:
    secret, *options = line.split()
    bounds: dict[str, float] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in ("from", "until") or name in bounds:
            raise ConfigError(f"{where}: {option!r}: expected from=<time> and/or until=<time>, once each")
        bounds[name] = _parse_time(value, where)
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: memory secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return MemoryKey.from_secret(secret.encode(), bounds.get("from"), bounds.get("until"))


def parse_memory_keys(content: bytes, source: str) -> MemoryKeyRing:
    """The keys file -> MemoryKeyRing; ConfigError naming the line of a bad entry.

    The file must hold at least one key without `until` (the one that signs until it is replaced).
    """
    keys = [
        _parse_key_line(line, f"{source}: line {number}")
        for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not keys:
        raise ConfigError(f"{source}: holds no memory secret")
    if all(k.valid_until is not None for k in keys):
        raise ConfigError(f"{source}: every key has an until=; the key in service must have none")
    if not any(k.signs_at(time.time()) for k in keys):
        raise ConfigError(f"{source}: no key is in service now (each has a from= ahead or an until= passed)")
    if len({k.key_id for k in keys}) != len(keys):
        raise ConfigError(f"{source}: the same secret appears twice")
    return MemoryKeyRing(tuple(keys))


class MemoryCodec:
    """Encodes and verifies memory tokens with the server's keys (held only here, never logged).

    Args:
        keys: one secret (bytes), a key ring, or a WatchedFile of the keys file (`from_file`) that the
            codec follows.
        clock: wall-clock epoch seconds; the keys' `from`/`until` are wall-clock times.
    """

    def __init__(
        self,
        keys: bytes | MemoryKeyRing | WatchedFile[MemoryKeyRing],
        clock: Callable[[], float] = time.time,
    ):
        if isinstance(keys, bytes):
            keys = MemoryKeyRing((MemoryKey.from_secret(keys),))
        self._keys, self._clock = keys, clock

    def __repr__(self) -> str:  # never show the key
        return "MemoryCodec(<secret>)"

    @classmethod
    def from_file(cls, path: Path, reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S) -> MemoryCodec:
        """The codec of the keys file at `path`, following its changes; ConfigError when it is missing."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: memory secret file not found; create it once (mobile-vla serve memory-key rotate "
                f"--file {path}) and give every node the same file"
            )
        return cls(WatchedFile(path, lambda content: parse_memory_keys(content, str(path)), reload_interval_s))

    def _ring(self) -> MemoryKeyRing:
        return self._keys.current() if isinstance(self._keys, WatchedFile) else self._keys

    @staticmethod
    def _sign(key: MemoryKey, signed: bytes) -> bytes:
        return hmac.new(key.key, signed, hashlib.sha256).digest()

    def encode(self, memory: RecurrentMemory) -> str:
        """The token of `memory`, signed with the key in service now."""
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
        if memory.stops:
            header["stops"] = int(memory.stops)
        raw = json.dumps(header, separators=(",", ":")).encode() + b"\n" + h.tobytes() + c.tobytes()
        payload = _b64encode(zlib.compress(raw, level=1))
        key = self._ring().signing_key(self._clock())
        signed = f"{PREFIX}.{key.key_id}.{payload}"
        return f"{signed}.{_b64encode(self._sign(key, signed.encode()))}"

    def decode(self, token: str) -> RecurrentMemory:
        """Verifies the signature first, then parses; every failure is a MemoryTokenError."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise MemoryTokenError("memory token is too long or not a string")
        parts = token.split(".")
        keys = self._ring().verifying_keys(self._clock())
        if len(parts) == 4 and parts[0] == PREFIX:
            signed, payload, signature = ".".join(parts[:3]).encode("ascii", "replace"), parts[2], parts[3]
            keys = [k for k in keys if hmac.compare_digest(k.key_id.encode(), parts[1].encode("ascii", "replace"))]
            if not keys:
                raise MemoryTokenError(
                    "memory token is signed with a key this server does not hold (expired, or from another server)"
                )
        elif len(parts) == 3 and parts[0] == LEGACY_PREFIX:
            payload, signature = parts[1], parts[2]
            signed = None
        else:
            raise MemoryTokenError(f"memory token must look like '{PREFIX}.<key id>.<payload>.<signature>'")
        payload_bytes, signature_bytes = _b64decode(payload), _b64decode(signature)
        message = signed if signed is not None else payload_bytes
        if not any(hmac.compare_digest(signature_bytes, self._sign(k, message)) for k in keys):
            raise MemoryTokenError("memory token signature does not match (forged, edited or from another server)")
        try:
            decompressor = zlib.decompressobj()
            raw = decompressor.decompress(payload_bytes, MAX_DECOMPRESSED_BYTES)
            header_bytes, _, arrays = raw.partition(b"\n")
            header = json.loads(header_bytes)
            layers, hidden = (int(v) for v in header["shape"])
            n = layers * hidden
            values = np.frombuffer(arrays, dtype=np.float16)
            if values.size != 2 * n:
                raise ValueError(f"expected {2 * n} state values, found {values.size}")
            h = values[:n].reshape(layers, hidden).astype(np.float32)
            c = values[n:].reshape(layers, hidden).astype(np.float32)
            stops = int(header.get("stops", 0))
            if stops < 0:
                raise ValueError(f"stops = {stops}")
            return RecurrentMemory(str(header["name"]), str(header["version"]), str(header["robot"]), h, c, stops)
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            # Signed by us but unreadable: a bug or a format change, still the client's token to drop.
            raise MemoryTokenError(f"memory token payload is unreadable: {exc}") from exc


def default_secret_path() -> Path:
    """`$MOBILE_VLA_HOME/serve/memory_secret`."""
    return platform_home() / "serve" / "memory_secret"


def configured_secret_path(memory_secret_file: str | None) -> Path | None:
    """The keys file named by the app argument, else by env MOBILE_VLA_MEMORY_SECRET_FILE; None when neither."""
    chosen = memory_secret_file or os.environ.get("MOBILE_VLA_MEMORY_SECRET_FILE")
    return Path(chosen).expanduser().resolve() if chosen else None


def resolve_secret_path(memory_secret_file: str | None) -> Path:
    """App argument, else env MOBILE_VLA_MEMORY_SECRET_FILE, else the platform home's file."""
    return configured_secret_path(memory_secret_file) or default_secret_path()


def prepare_memory_secret(memory_secret_file: str | None) -> Path:
    """The keys file for a deployment, checked: a configured file must exist and parse (never created);
    the default file under the platform home is created on first use (a local run).

    Raises:
        ConfigError: the configured file is missing or holds no valid key.
    """
    configured = configured_secret_path(memory_secret_file)
    if configured is None:
        path = default_secret_path()
        load_or_create_secret(path)
        return path
    if not configured.is_file():
        source = "app argument memory_secret_file" if memory_secret_file else "env MOBILE_VLA_MEMORY_SECRET_FILE"
        raise ConfigError(
            f"{configured} ({source}): memory secret file not found. Create it once (mobile-vla serve "
            f"memory-key rotate --file {configured}) and give every node the same file; it is never "
            "created per node, which would reset robots' memory between nodes"
        )
    parse_memory_keys(configured.read_bytes(), str(configured))
    return configured


def load_or_create_secret(path: Path) -> MemoryKeyRing:
    """Reads the keys file; creates one with a random key (0600) when it does not exist yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(new_secret() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    return parse_memory_keys(path.read_bytes(), str(path))


def new_secret() -> str:
    """A random secret for the keys file (64 hex characters)."""
    return secrets.token_hex(32)


def rotate_memory_keys(path: Path, window_s: float, activate_in_s: float = 0.0, now: float | None = None) -> MemoryKey:
    """Adds a new key in service from `now + activate_in_s`; the keys in service now stop verifying
    `window_s` after that; keys already past their `until` are dropped. Creates the file when absent.

    Returns:
        The new key (its id; the secret is only in the file).
    """
    if window_s < 0 or activate_in_s < 0:
        raise ConfigError(f"rotate: window {window_s} s and activation delay {activate_in_s} s must be >= 0")
    now = time.time() if now is None else now
    start = now + activate_in_s
    secret = new_secret()
    lines = [f"{secret} from={format_time(start)}" if activate_in_s > 0 else secret]
    if path.exists():
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            old_secret, *options = line.split()
            key = _parse_key_line(line, f"{path}: line {number}")
            if not key.verifies_at(now):
                continue  # its window has passed
            until = start + window_s if key.valid_until is None else min(key.valid_until, start + window_s)
            kept = [o for o in options if not o.startswith("until=")]
            lines.append(" ".join([old_secret, *kept, f"until={format_time(until)}"]))
    text = "\n".join(lines) + "\n"
    parse_memory_keys(text.encode(), str(path))
    write_file_atomically(path, text)
    return MemoryKey.from_secret(secret.encode())
