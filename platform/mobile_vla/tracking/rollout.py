"""A canary rollout's state in the registry: `@canary` and its share of robots, and the moves a rollout
controller makes (start, widen, roll back, promote), each alias move through `audit.set_alias`.

    start_canary("mobile-vla-policy", "7", share=10, reason="rollout start: steps 10,50,100")
    set_canary_share("mobile-vla-policy", 50)
    rollback_canary("mobile-vla-policy", reason="divergence 0.41 > max_divergence 0.15")
    promote_canary("mobile-vla-policy", "7", reason="held 100% for 20 s within every bound")

The share (percent of robots, sticky by robot id: serve/canary.py) is a registered-model tag,
`rollout.canary_share`, so every ingress replica reads it with the registry access it already has,
as it reads the alias. A share change is not an alias move (the audit records alias moves); the
controller records every share step and its KPIs on the canary's model version instead.

Rolling back moves `@canary` onto the champion's version (and the share to 0): the canary then serves
nobody (an ingress routes to the canary only while it names another version), the audit records the
move with the reason, and the canary deployment keeps a loaded model (the champion's).
"""

from __future__ import annotations

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.tracking.audit import set_alias
from mobile_vla.tracking.registry import CHAMPION, PREVIOUS_CHAMPION
from mobile_vla.tracking.store import mlflow_client

CANARY = "canary"
SHARE_TAG = "rollout.canary_share"
ROLLOUT_ACTOR = "rollout"  # the actor of the controller's alias moves in the audit


def _check_share(share: float) -> float:
    share = float(share)
    if not 0.0 <= share <= 100.0:
        raise ConfigError(f"canary share = {share!r}: expected a percent in [0, 100]")
    return share


def canary_state(name: str, alias: str = CANARY) -> tuple[str | None, float]:
    """(the version `@alias` names or None, its share in percent) from one registry read."""
    model = mlflow_client().get_registered_model(name)
    version = model.aliases.get(alias)
    try:
        share = float(model.tags.get(SHARE_TAG, 0.0))
    except ValueError:
        share = 0.0  # a hand-edited tag that is no number: no canary traffic
    return (None if version is None else str(version)), min(max(share, 0.0), 100.0)


def set_canary_share(name: str, share: float) -> None:
    """Sets the share of robots the canary serves (percent); replicas follow within `alias_poll_s`."""
    mlflow_client().set_registered_model_tag(name, SHARE_TAG, f"{_check_share(share):g}")


def start_canary(name: str, version: str, share: float, reason: str, actor: str = ROLLOUT_ACTOR) -> None:
    """`@canary` on `version` at `share` percent. The share is set to 0 first, so no robot is routed to
    a version the alias no longer names while it moves.
    """
    champion = mlflow_client().get_registered_model(name).aliases.get(CHAMPION)
    if champion is not None and str(champion) == str(version):
        raise ModelError(f"models:/{name}/{version} is already @{CHAMPION}: nothing to roll out")
    set_canary_share(name, 0)
    set_alias(name, CANARY, str(version), actor=actor, reason=reason)
    set_canary_share(name, share)


def rollback_canary(name: str, reason: str, actor: str = ROLLOUT_ACTOR) -> str | None:
    """Every robot back on the champion: share 0 and `@canary` moved onto the champion's version (the
    audit records why). Returns the champion's version (None: the model has no champion).
    """
    set_canary_share(name, 0)
    champion = mlflow_client().get_registered_model(name).aliases.get(CHAMPION)
    if champion is not None:
        set_alias(name, CANARY, str(champion), actor=actor, reason=f"rollback: {reason}")
    return None if champion is None else str(champion)


def promote_canary(name: str, version: str, reason: str, actor: str = ROLLOUT_ACTOR) -> str | None:
    """`@champion` moved to the canary's version (`@previous-champion` keeps the old one for a rollback),
    then the share back to 0: the canary and the champion are the same version. Returns the old champion.
    """
    old = mlflow_client().get_registered_model(name).aliases.get(CHAMPION)
    set_alias(name, CHAMPION, str(version), actor=actor, reason=f"canary promoted: {reason}")
    if old is not None and str(old) != str(version):
        set_alias(
            name, PREVIOUS_CHAMPION, str(old), actor=actor, reason=f"kept for rollback: canary {version} promoted"
        )
    set_canary_share(name, 0)
    return None if old is None else str(old)
