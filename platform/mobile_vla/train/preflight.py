"""Checks run on the driver before any Train worker starts: a bad config fails in seconds, clearly.

Ray would otherwise wait forever for workers the cluster can never place, and a missing manifest or a
misspelt policy field would only surface inside a worker's traceback.

The resource check compares one worker's bundle ({CPU, GPU, ...}) with what each node can hold, counting
the nodes alive now plus, when the cluster has an autoscaler, the largest cluster its config allows
(`~/ray_bootstrap_config.yaml` on a `ray up` head node, or the file named by MOBILE_VLA_AUTOSCALER_CONFIG).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import ConfigError, DataError, ResourceError
from mobile_vla.policy import presets
from mobile_vla.policy.config import AUX_LABELS
from mobile_vla.ray_session import ensure_ray
from mobile_vla.tracking.job_storage import check_job_storage
from mobile_vla.train.job_config import TrainJobConfig

log = logging.getLogger(__name__)

AUTOSCALER_CONFIG_ENV = "MOBILE_VLA_AUTOSCALER_CONFIG"
DEFAULT_AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass
class ClusterCapacity:
    """Resources of every node the cluster has or may ever have (one dict per node)."""

    nodes: list[dict[str, float]]
    source: str = "ray.nodes()"
    unknown_node_types: list[str] = field(default_factory=list)  # autoscaled types with undeclared resources

    def total(self, key: str) -> float:
        return sum(node.get(key, 0.0) for node in self.nodes)


def workers_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many worker bundles the nodes can hold at once (a bundle never spans two nodes)."""
    count = 0
    for node in nodes:
        per_key = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        count += min(per_key) if per_key else 0
    return count


def _autoscaler_nodes(path: Path) -> tuple[list[dict[str, float]], list[str]]:
    spec = yaml.safe_load(path.read_text()) or {}
    budget = spec.get("max_workers")
    nodes, unknown = [], []
    for type_name, node_type in (spec.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        if not resources:
            unknown.append(type_name)
            continue
        count = int(node_type.get("max_workers", 0) or 0)
        if budget is not None:
            count = min(count, int(budget))
        nodes.extend([resources] * count)
    return nodes, unknown


def cluster_capacity() -> ClusterCapacity:
    """Alive nodes now, plus the autoscaler's maximum when its config is readable."""
    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node.get("Alive")]
    capacity = ClusterCapacity(nodes=nodes)
    path = Path(os.environ.get(AUTOSCALER_CONFIG_ENV, DEFAULT_AUTOSCALER_CONFIG)).expanduser()
    if path.is_file():
        try:
            extra, unknown = _autoscaler_nodes(path)
        except Exception as exc:  # a broken autoscaler file must not block training on known nodes
            log.warning("cannot read autoscaler config %s: %s", path, exc)
        else:
            capacity.nodes.extend(extra)
            capacity.unknown_node_types = unknown
            capacity.source = f"ray.nodes() + autoscaler config {path}"
    return capacity


def check_resources(cfg: TrainJobConfig, capacity: ClusterCapacity) -> None:
    """Raises ResourceError when the workers can never all be placed (instead of waiting forever)."""
    scaling = cfg.scaling
    bundle = scaling.worker_bundle()
    fit = workers_that_fit(bundle, capacity.nodes)
    if fit >= scaling.num_workers:
        spare_cpus = capacity.total("CPU") - scaling.num_workers * bundle.get("CPU", 0.0)
        if spare_cpus < 1 and not capacity.unknown_node_types:
            raise ResourceError(
                f"scaling: {scaling.num_workers} workers x {_fmt(bundle)} take all {capacity.total('CPU'):g} CPUs "
                f"of the cluster ({capacity.source}); leave at least 1 CPU for the Ray Data pipeline "
                "(lower scaling.resources_per_worker.CPU or scaling.num_workers)"
            )
        return
    if capacity.unknown_node_types:
        log.warning(
            "cannot verify that %d workers x %s fit: autoscaler node types %s declare no resources",
            scaling.num_workers,
            _fmt(bundle),
            capacity.unknown_node_types,
        )
        return
    have = {k: capacity.total(k) for k in bundle}
    raise ResourceError(
        f"scaling: {scaling.num_workers} workers x {_fmt(bundle)} can never be placed: the cluster "
        f"({capacity.source}, {len(capacity.nodes)} nodes, {_fmt(have)} in total) holds at most {fit} such "
        "workers. Lower scaling.num_workers or scaling.resources_per_worker, or add nodes."
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def check_data(cfg: TrainJobConfig) -> dict:
    """The dataset folder has a manifest and both splits; returns the manifest."""
    folder = cfg.data_path()
    if not folder.is_dir():
        raise DataError(f"data.path = {cfg.data.path!r}: no such folder ({folder})")
    manifest = load_manifest(folder)  # raises DataError naming the folder when manifest.json is missing
    splits = manifest.get("splits") or {}
    for key in ("train_split", "val_split"):
        name = getattr(cfg.data, key)
        if not splits.get(name):
            raise ConfigError(
                f"data.{key} = {name!r}: {folder}/manifest.json has no episodes in that split "
                f"(splits: {sorted(k for k, v in splits.items() if v)})"
            )
    if cfg.loss.aux_labels:
        missing = [key for key in AUX_LABELS if key not in manifest.get("frame_keys", [])]
        if missing:
            raise DataError(
                f"data.path = {cfg.data.path!r}: loss.aux_weight = {cfg.loss.aux_weight} needs the per-frame "
                f"label(s) {', '.join(missing)} in every episode, and {folder}/manifest.json lists frame_keys "
                f"{manifest.get('frame_keys', [])} (generate the episodes with `mobile-vla data generate`, which "
                "records them, or set loss.aux_weight=0)"
            )
    return manifest


def _replace_fields(config, overrides: dict, where: str):
    """dataclasses.replace, recursing into nested dataclass fields given as dicts."""
    known = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"{where}.{key}: unknown {type(config).__name__} field (known: {', '.join(sorted(known))})"
            )
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _replace_fields(current, value, f"{where}.{key}")
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    try:
        return dataclasses.replace(config, **changes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def resolve_policy_config(cfg: TrainJobConfig):
    """The PolicyConfig a run trains: preset + model.overrides, with window/chunk taken from data and the
    auxiliary heads built when loss.aux_weight > 0 (so the saved model holds the heads it trained).
    """
    for key in ("window", "chunk"):
        if key in cfg.model.overrides:
            raise ConfigError(f"model.overrides.{key}: set data.{key} instead (data and model must agree)")
    if cfg.loss.aux_labels and cfg.model.overrides.get("aux_heads", True) is not True:
        raise ConfigError(
            f"model.overrides.aux_heads = {cfg.model.overrides['aux_heads']!r}: loss.aux_weight = "
            f"{cfg.loss.aux_weight} trains the auxiliary heads (leave aux_heads out or set loss.aux_weight=0)"
        )
    config = getattr(presets, cfg.model.preset)()
    overrides = {**cfg.model.overrides, "window": cfg.data.window, "chunk": cfg.data.chunk}
    if cfg.loss.aux_labels:
        overrides["aux_heads"] = True
    return _replace_fields(config, overrides, "model.overrides")


def check_model(cfg: TrainJobConfig):
    """Resolves the policy preset + overrides into a PolicyConfig; unknown or bad fields are ConfigErrors."""
    return resolve_policy_config(cfg)


def preflight(cfg: TrainJobConfig, capacity: ClusterCapacity | None = None):
    """All checks, cheapest first. Returns (manifest, policy_config)."""
    check_job_storage([cfg.run.storage_place()], mlflow=cfg.mlflow.enabled)  # a Ray job's results must outlive it
    policy_config = check_model(cfg)
    manifest = check_data(cfg)
    if capacity is None:
        ensure_ray()  # only now: a bad config or data folder fails without starting a cluster
        capacity = cluster_capacity()
    check_resources(cfg, capacity)
    return manifest, policy_config
