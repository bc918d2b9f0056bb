"""The audit of alias moves: every move of an alias of a registered model (`@champion`, `@challenger`,
`@previous-champion`, later `@canary`), recorded in the registry itself.

    set_alias("mobile-vla-policy", "champion", "7", actor="cli promote", reason="passed: ...")
    detect_alias_move("mobile-vla-policy", "champion", detector="serve ingress on host-3")
    alias_history("mobile-vla-policy")  # newest first

`set_alias` is the one function of the platform that moves an alias; it records the move. A move
made outside it (the MLflow UI, a plain `MlflowClient().set_registered_model_alias`) is recorded as
`detected` by whoever next sees the alias at a version its last record does not name: the serving
ingress's alias watcher (every `alias_poll_s`) and the next `set_alias` of that alias.

Where. One registered-model tag per move, key `audit.alias_move.<alias>.<seq>` (seq: 6 digits,
counted per alias from 1), value a JSON object (`AliasMove`). So the audit travels with the registry
(the SQLite file here, PostgreSQL behind `mlflow server` on a cluster), every node reads it with the
registry access it already has, and the MLflow UI shows it on the model's page. A value stays under
5000 characters: MLflow 3.17 validates registered-model tag values up to 100,000 characters, but its
SQL store's column is VARCHAR(5000), which PostgreSQL enforces (the reason is cut to fit).

Once, however many see it. The sequence number of a record is one past the alias's last one, so
every watcher (several ingress replicas, several nodes) that sees the same outside move computes the
same key: the move is recorded once. Detected records use their own key (`<seq>.detected`): a
watcher that sees a `set_alias` move between the alias moving and its record being written writes
a detected record under the same number, and reading keeps the platform's record of that move.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mobile_vla.errors import ModelError
from mobile_vla.tracking.store import mlflow_client

AUDIT_TAG_PREFIX = "audit.alias_move."
DETECTED = "detected"  # the actor of a move made outside the platform (the MLflow UI, a plain MlflowClient call)
API_ACTOR = "api"  # a direct call of set_alias (a script, a notebook, a test) that names no actor
_KEY = re.compile(r"^audit\.alias_move\.(?P<alias>[\w-]+)\.(?P<seq>\d{6})(?P<detected>\.detected)?$")
_MAX_REASON = 3000  # the JSON value must stay under the SQL store's VARCHAR(5000)
_MAX_TAG_KEY = 250  # MLflow's registered-model tag key limit


@dataclass(frozen=True)
class AliasMove:
    """One move of `@alias` of registered model `model`: from which version to which, when, who, why."""

    model: str
    alias: str
    seq: int  # per alias, from 1: the order of the moves of that alias
    from_version: str | None  # None: the alias did not exist (or, detected, no earlier record named it)
    to_version: str
    time: str  # UTC, ISO 8601: when the move was made (detected: when it was seen)
    actor: str  # what moved it: "cli promote", "online-update", "demo", "register", "api", "detected", ...
    by: str  # who: user@host of the process (detected: which watcher saw it, where)
    reason: str  # the gate's decision, the operator's --reason, what a detector knows

    @property
    def detected(self) -> bool:
        return self.actor == DETECTED

    @property
    def key(self) -> str:
        return audit_key(self.alias, self.seq, detected=self.detected)

    def to_dict(self) -> dict:
        return asdict(self)

    def tag_value(self) -> str:
        body = {k: v for k, v in self.to_dict().items() if k not in ("model", "alias", "seq")}  # those are the key
        return json.dumps(body, sort_keys=True)


def audit_key(alias: str, seq: int, detected: bool = False) -> str:
    """The registered-model tag key of the `seq`-th move of `@alias`."""
    key = f"{AUDIT_TAG_PREFIX}{alias}.{seq:06d}" + (".detected" if detected else "")
    if len(key) > _MAX_TAG_KEY:
        raise ModelError(f"alias '{alias[:40]}...': {len(alias)} characters is too long to audit (tag keys <= 250)")
    return key


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _parse(model: str, key: str, value: str) -> AliasMove | None:
    """The record behind one tag, or None when the tag is not an audit record (or not one we can read)."""
    match = _KEY.match(key)
    if not match:
        return None
    try:
        body = json.loads(value)
        return AliasMove(
            model=model,
            alias=match["alias"],
            seq=int(match["seq"]),
            from_version=None if body.get("from_version") is None else str(body["from_version"]),
            to_version=str(body["to_version"]),
            time=str(body["time"]),
            actor=str(body["actor"]),
            by=str(body.get("by", "")),
            reason=str(body.get("reason", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _records(model: str, tags: dict[str, str]) -> list[AliasMove]:
    """Every audit record in a registered model's tags, oldest first per alias. Where a watcher's detected
    record and the platform's record share a number and name the same version, only the platform's is kept.
    """
    found = [move for key, value in tags.items() if (move := _parse(model, key, value)) is not None]
    platform_moves = {(m.alias, m.seq, m.to_version) for m in found if not m.detected}
    kept = [m for m in found if not (m.detected and (m.alias, m.seq, m.to_version) in platform_moves)]
    return sorted(kept, key=lambda m: (m.alias, m.seq, not m.detected))


def _last(records: list[AliasMove], alias: str) -> AliasMove | None:
    of_alias = [m for m in records if m.alias == alias]
    return of_alias[-1] if of_alias else None


def _registered_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")):
            raise ModelError(f"models:/{name}: no such registered model") from None
        raise


def _write(client, move: AliasMove) -> AliasMove:
    client.set_registered_model_tag(move.model, move.key, move.tag_value())
    return move


def _detected_move(name: str, alias: str, current: str, last: AliasMove | None, detector: str) -> AliasMove:
    if last is None:  # a move made outside the platform, or one made before the platform kept an audit
        why = f"first sight of @{alias} at version {current}: no earlier record of this alias"
    else:
        why = (
            f"@{alias} was at version {last.to_version} in the last record; moved outside the platform "
            "(the MLflow UI or a plain MlflowClient call)"
        )
    return AliasMove(
        model=name,
        alias=alias,
        seq=(last.seq + 1) if last else 1,
        from_version=last.to_version if last else None,
        to_version=current,
        time=_now(),
        actor=DETECTED,
        by=detector,
        reason=why,
    )


def set_alias(name: str, alias: str, version: str, *, actor: str = API_ACTOR, reason: str = "") -> AliasMove | None:
    """Points `models:/name@alias` at `version` and records the move (module doc). Returns the record,
    or None when the alias already pointed there (no move, no record).

    A move made outside the platform since the alias's last record is recorded first (`detected`).
    """
    version = str(version)
    client = mlflow_client()
    model = _registered_model(client, name)
    current = model.aliases.get(alias)
    current = None if current is None else str(current)
    last = _last(_records(name, model.tags), alias)
    if current is not None and (last is None or last.to_version != current):
        last = _write(client, _detected_move(name, alias, current, last, f"{actor} on {_who()}"))
    if current == version:
        return None
    client.set_registered_model_alias(name, alias, version)
    move = AliasMove(
        model=name,
        alias=alias,
        seq=(last.seq + 1) if last else 1,
        from_version=current,
        to_version=version,
        time=_now(),
        actor=actor,
        by=_who(),
        reason=reason[:_MAX_REASON],
    )
    return _write(client, move)


def detect_alias_move(name: str, alias: str, *, detector: str) -> AliasMove | None:
    """Records a `detected` move when `@alias` points at a version its last record does not name (a move
    made outside the platform); returns that record, or None when the audit is up to date (or the alias
    does not exist). `detector` says who looked, e.g. "serve ingress on HOST".
    """
    client = mlflow_client()
    model = _registered_model(client, name)
    current = model.aliases.get(alias)
    if current is None:
        return None
    last = _last(_records(name, model.tags), alias)
    if last is not None and last.to_version == str(current):
        return None
    return _write(client, _detected_move(name, alias, str(current), last, f"{detector} ({_who()})"))


def alias_history(name: str, alias: str | None = None) -> list[AliasMove]:
    """Every recorded move of the model's aliases (or of one alias), newest first."""
    records = _records(name, _registered_model(mlflow_client(), name).tags)
    if alias is not None:
        records = [m for m in records if m.alias == alias]
    return sorted(records, key=lambda m: (m.time, m.seq), reverse=True)


def unrecorded_aliases(name: str) -> dict[str, tuple[str | None, str]]:
    """Aliases that point at a version their last record does not name: {alias: (recorded, current)}.
    Read-only: what `detect_alias_move` would record now.
    """
    model = _registered_model(mlflow_client(), name)
    records = _records(name, model.tags)
    out = {}
    for alias, version in model.aliases.items():
        last = _last(records, alias)
        if last is None or last.to_version != str(version):
            out[alias] = (last.to_version if last else None, str(version))
    return out
