"""Bearer-token auth for the HTTP API: who a token is (the robots it may speak for) and what it may do.

The tokens file (app argument `tokens_file`, default env MOBILE_VLA_TOKENS_FILE) holds one token per
line, blank lines and `#` comments ignored:

    <token> [robots=<id>|<prefix>*|*[,...]] [scopes=act,feedback,operator] [name=<label>]

`<token>` is the plain token (at least 16 characters) or `sha256:<64 hex>`, its SHA-256 digest (what
`mobile-vla serve tokens add` writes, so the file never holds the token itself). A line with the
token alone is today's format and keeps meaning what it meant: every robot, scopes `act` and
`feedback`. Scopes: `act` (POST /v1/act), `feedback` (POST /v1/feedback), `operator` (details in
/v1/model and /readyz). The ingress keeps only digests, looked up by digest (the time of a lookup
says nothing about a token, only about the digest of the guess), and follows the file: a line
removed there stops working in every replica within `reload_interval_s` of the next request
(`watched_file`). Neither plain tokens nor the Authorization header are ever logged.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mobile_vla.errors import ConfigError
from mobile_vla.serve.watched_file import DEFAULT_RELOAD_INTERVAL_S, WatchedFile, write_file_atomically

MIN_TOKEN_CHARS = 16
SCOPES = ("act", "feedback", "operator")
LEGACY_SCOPES = ("act", "feedback")  # what a line with the token alone may do (the format before scopes)
ALL_ROBOTS = "*"
HASH_PREFIX = "sha256:"
_ROBOT_PATTERN = re.compile(r"^(\*|[A-Za-z0-9._-]{1,64}\*?)$")  # an id, an id prefix ending in *, or *
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._:/@-]{1,64}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


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


@dataclass(frozen=True)
class TokenGrant:
    """What one token may do: its scopes, for which robots (exact ids, `prefix*`, or `*`)."""

    name: str
    robots: tuple[str, ...]
    scopes: frozenset[str]

    def covers(self, robot_id: str) -> bool:
        """True when the token may speak for `robot_id`."""
        for pattern in self.robots:
            if pattern.endswith("*"):
                if robot_id.startswith(pattern[:-1]):
                    return True
            elif robot_id == pattern:
                return True
        return False

    def refusal(self, scope: str, robot_id: str | None = None) -> str | None:
        """Why this token may not use `scope` (for `robot_id`), or None when it may."""
        if scope not in self.scopes:
            return f"token {self.name!r} has no {scope!r} scope (its scopes: {', '.join(sorted(self.scopes))})"
        if robot_id is not None and not self.covers(robot_id):
            return (
                f"token {self.name!r} may not speak for robot_id {robot_id!r} "
                f"(it covers robots {','.join(self.robots)})"
            )
        return None


def _parse_line(line: str, where: str) -> tuple[bytes, TokenGrant]:
    secret, *options = line.split()
    if secret.startswith(HASH_PREFIX):
        hex_digest = secret[len(HASH_PREFIX) :].lower()
        if not _HEX_DIGEST.match(hex_digest):
            raise ConfigError(f"{where}: {HASH_PREFIX} must be followed by 64 hex digits")
        digest = bytes.fromhex(hex_digest)
    elif len(secret) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
    else:
        digest = _digest(secret)
    fields: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("robots", "scopes", "name"):
            raise ConfigError(f"{where}: {option!r}: expected robots=..., scopes=... or name=...")
        if key in fields:
            raise ConfigError(f"{where}: {key} given twice")
        fields[key] = value
    robots = tuple(fields.get("robots", ALL_ROBOTS).split(","))
    for pattern in robots:
        if not _ROBOT_PATTERN.match(pattern):
            raise ConfigError(
                f"{where}: robots={fields['robots']}: {pattern!r} is not a robot id, an id prefix ending in * or *"
            )
    scopes = tuple(fields.get("scopes", ",".join(LEGACY_SCOPES)).split(","))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ConfigError(
            f"{where}: scopes={fields['scopes']}: unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})"
        )
    name = fields.get("name") or f"{HASH_PREFIX}{digest.hex()[:8]}"
    if not _NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: name={name!r}: letters, digits and ._:/@- only, at most 64")
    return digest, TokenGrant(name=name, robots=robots, scopes=frozenset(scopes))


def parse_tokens(text: str, source: str) -> dict[bytes, TokenGrant]:
    """The tokens file's text -> {SHA-256 digest: grant}; ConfigError naming the line of any bad entry."""
    grants: dict[bytes, TokenGrant] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}: line {number}"
        digest, grant = _parse_line(line, where)
        if digest in grants:
            raise ConfigError(f"{where}: the same token as {grants[digest].name!r} on an earlier line")
        grants[digest] = grant
    if not grants:
        raise ConfigError(f"{source}: tokens file holds no tokens")
    return grants


class TokenVerifier:
    """Maps `Authorization: Bearer <token>` to the token's grant; built from a file, it follows the file."""

    def __init__(self, grants: Mapping[bytes, TokenGrant] | WatchedFile[dict[bytes, TokenGrant]]):
        if isinstance(grants, WatchedFile):
            self._source, self._grants = grants, None
        else:
            if not grants:
                raise ConfigError("tokens file holds no tokens")
            self._source, self._grants = None, dict(grants)

    def __repr__(self) -> str:
        return f"TokenVerifier({len(self._current())} tokens)"

    @classmethod
    def from_file(cls, path: Path, reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S) -> TokenVerifier:
        """The verifier of `path`, re-read when the file changes (checked at most every `reload_interval_s`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: tokens file not found")
        return cls(
            WatchedFile(path, lambda content: parse_tokens(content.decode("utf-8"), str(path)), reload_interval_s)
        )

    def _current(self) -> dict[bytes, TokenGrant]:
        return self._source.current() if self._source is not None else self._grants

    def grant_for(self, authorization: str | None) -> TokenGrant | None:
        """The grant of the bearer token in an Authorization header; None when missing or unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._current().get(_digest(token.strip()))

    def verify_header(self, authorization: str | None) -> bool:
        """True when the header carries a known bearer token."""
        return self.grant_for(authorization) is not None


# -- editing the file (`mobile-vla serve tokens ...`) ---------------------------------------------------
def token_line(
    secret: str, robots: str = ALL_ROBOTS, scopes: tuple[str, ...] = LEGACY_SCOPES, name: str | None = None
) -> str:
    """One line of the tokens file (`secret` is a plain token or `sha256:<hex>`)."""
    line = f"{secret} robots={robots} scopes={','.join(scopes)}"
    return f"{line} name={name}" if name else line


def create_tokens_file(path: Path) -> str:
    """A new file with one random operator token (every robot, every scope, 0600); returns the token.

    The token is stored plainly as the first word of the line, so the local user (`mobile-vla serve`,
    tests, the demo) can read it back; tokens for robots come from `add_token`, stored as digests.
    """
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token_line(token, ALL_ROBOTS, SCOPES, "local-operator") + "\n")
    return token


def add_token(path: Path, robots: str, scopes: tuple[str, ...], name: str) -> str:
    """Adds a new random token for `robots` with `scopes` as its digest (file created 0600 if absent).

    Returns:
        The plain token: shown once, never stored.

    Raises:
        ConfigError: a bad robots/scopes/name value, a name already in the file, or a bad existing file.
    """
    text = path.read_text() if path.exists() else ""
    existing = parse_tokens(text, str(path)) if text.strip() else {}
    if any(grant.name == name for grant in existing.values()):
        raise ConfigError(f"{path}: a token named {name!r} exists already (revoke it first)")
    token = secrets.token_urlsafe(32)
    line = token_line(f"{HASH_PREFIX}{_digest(token).hex()}", robots, scopes, name)
    parse_tokens(line, "new entry")  # refuses a bad value before the file is touched
    write_file_atomically(path, text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
    return token


def revoke_tokens(path: Path, name: str | None = None, token: str | None = None) -> list[str]:
    """Removes the lines of the token named `name` or of the plain `token`; returns the names removed.

    Raises:
        ConfigError: neither or both given, no such token, or removing it would leave no token.
    """
    if (name is None) == (token is None):
        raise ConfigError("revoke: give exactly one of --name or --token")
    if not path.is_file():
        raise ConfigError(f"{path}: tokens file not found")
    kept, removed = [], []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            digest, grant = _parse_line(line, f"{path}: line {number}")
            if grant.name == name or (token is not None and digest == _digest(token)):
                removed.append(grant.name)
                continue
        kept.append(raw)
    if not removed:
        raise ConfigError(f"{path}: no token {'named ' + repr(name) if name else 'matching --token'}")
    text = "\n".join(kept) + "\n"
    parse_tokens(text, str(path))  # a file with no token left is refused here, not by the replicas
    write_file_atomically(path, text)
    return removed


def list_grants(path: Path) -> list[TokenGrant]:
    """The grants of the tokens file, in file order."""
    if not path.is_file():
        raise ConfigError(f"{path}: tokens file not found")
    return list(parse_tokens(path.read_text(), str(path)).values())
