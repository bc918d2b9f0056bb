"""Bearer-token auth for the HTTP API: tokens held only as SHA-256 hashes, compared in constant time.

Tokens come one per line from the file named by the app argument `tokens_file`, defaulting to env
MOBILE_VLA_TOKENS_FILE (blank lines and `#` comments ignored). The plain tokens are dropped as
soon as they are hashed; neither they nor the Authorization header are ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from mobile_vla.errors import ConfigError

MIN_TOKEN_CHARS = 16


def resolve_tokens_path(tokens_file: str | None) -> Path:
    """The tokens file: the app argument, else env MOBILE_VLA_TOKENS_FILE; ConfigError when neither is set."""
    chosen = tokens_file or os.environ.get("MOBILE_VLA_TOKENS_FILE")
    if not chosen:
        raise ConfigError(
            "no API tokens: set the app argument tokens_file or env MOBILE_VLA_TOKENS_FILE "
            "to a file with one token per line"
        )
    return Path(chosen).expanduser().resolve()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenVerifier:
    """Checks `Authorization: Bearer <token>` against hashed tokens without early exit."""

    def __init__(self, token_hashes: list[bytes]):
        if not token_hashes:
            raise ConfigError("tokens file holds no tokens")
        self._hashes = tuple(token_hashes)

    def __repr__(self) -> str:
        return f"TokenVerifier({len(self._hashes)} tokens)"

    @classmethod
    def from_file(cls, path: Path) -> TokenVerifier:
        if not path.is_file():
            raise ConfigError(f"{path}: tokens file not found")
        hashes = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"{path}: line {number}: token shorter than {MIN_TOKEN_CHARS} characters")
            hashes.append(_digest(token))
        if not hashes:
            raise ConfigError(f"{path}: tokens file holds no tokens")
        return cls(hashes)

    def verify_header(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        candidate = _digest(token.strip())
        matched = False
        for known in self._hashes:  # no early exit: time does not depend on which token matched
            matched |= hmac.compare_digest(candidate, known)
        return matched


def create_tokens_file(path: Path) -> str:
    """Writes a new file with one random token (0600) and returns the token (for `mobile-vla serve`)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token
