"""Loading one model version in a policy replica, checking it, and finding the version an alias names.

A replica loads a version beside the one it serves (hot swap, `deployments`), so everything here is
a pure step on a `PolicyUserConfig`: resolve and open the backend, verify it is the version asked
for and answers a probe step, look up where the alias points now (or, with the registry down,
where it pointed when this node last asked: the replica then starts from the verified local cache).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mobile_vla.runtime import load_backend
from mobile_vla.serve.settings import PolicyUserConfig
from mobile_vla.tracking import get_version_by_alias, remembered_alias_version, resolve_model

_PINNED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


@dataclass
class LoadedModel:
    """A loaded backend and the version it serves."""

    backend: Any  # mobile_vla.runtime Backend
    name: str
    version: str
    alias: str | None
    uri: str
    state_shape: tuple[int, ...]  # one robot's h or c: the backend's memory without the batch axis
    from_cache: bool = False  # resolved from the local cache while the registry was unreachable


def load_model(config: PolicyUserConfig, prefer: tuple[str, ...]) -> LoadedModel:
    """Resolves `config.model_uri` and opens the first backend of `prefer` that works on this machine."""
    resolved = resolve_model(config.model_uri)
    backend = load_backend(
        resolved.path,
        prefer=prefer,
        fp16=config.fp16,
        int8=config.int8,
        threads=config.cpu_threads,
        spinning=False,
        max_batch_size=config.max_batch_size,  # a TensorRT plan that takes fewer is refused
    )
    h, _ = backend.initial_memory(1)  # [..., 1, ...]: the recurrent state's shape comes from the signature
    name = backend.model_name or resolved.name or "unknown"
    version = str(backend.model_version or resolved.version or "unknown")
    return LoadedModel(
        backend,
        name,
        version,
        config.alias or resolved.alias,
        config.model_uri,
        tuple(int(n) for i, n in enumerate(h.shape) if i != 1),
        from_cache=resolved.from_cache,
    )


def verify_model(loaded: LoadedModel, expected_version: str | None) -> None:
    """load_backend already checked the signature and ran a self-test step; the version must also be
    the one the alias named (a cached folder of another version must never be served under it).
    """
    if expected_version is not None and loaded.version != expected_version:
        raise RuntimeError(f"{loaded.uri}: loaded files are version {loaded.version}, expected {expected_version}")
    probe_model(loaded)


def probe_model(loaded: LoadedModel) -> None:
    """One step of one robot on a black frame, zero state and a fixed instruction (tokenised once, then
    cached by the backend): raises RuntimeError unless the model answers with finite actions.
    """
    probe = loaded.backend.predict(
        np.zeros((1, loaded.backend.image_size, loaded.backend.image_size, 3), np.uint8),  # [1, H, W, C]
        np.zeros((1, loaded.backend.state_dim), np.float32),  # [1, S]
        ["probe"],
    )
    if not np.isfinite(np.asarray(probe.actions)).all():
        raise RuntimeError(f"{loaded.uri}: probe step gave non-finite actions")


def alias_target(config: PolicyUserConfig) -> PolicyUserConfig | None:
    """`config` pointed at the version the alias names now (None: not following an alias).

    Raises:
        RegistryUnreachable: the registry did not answer.
    """
    match = _PINNED_URI.match(config.model_uri)
    if not (config.alias and config.alias_poll_s > 0 and match):
        return None
    version = get_version_by_alias(match["name"], config.alias)
    if version is None:
        return None
    return config.model_copy(update={"model_uri": f"models:/{match['name']}/{version}"})


def remembered_target(config: PolicyUserConfig) -> PolicyUserConfig | None:
    """`config` pointed at the version the alias named when this node last asked the registry (None:
    not following an alias, or never asked): where a replica starts while the registry is down.
    """
    match = _PINNED_URI.match(config.model_uri)
    if not (config.alias and match):
        return None
    version = remembered_alias_version(match["name"], config.alias)
    if version is None:
        return None
    return config.model_copy(update={"model_uri": f"models:/{match['name']}/{version}"})
