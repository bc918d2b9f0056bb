"""What one trial holds on the cluster, and so how many trials run at once.

    running = concurrency(cfg, base, ray.cluster_resources())     # ResourceError when not even one fits
    tune.with_resources(trainable, driver_resources(cfg))

A trial is a small driver (`tune.driver_cpus`) plus its Ray Train workers, which reserve their own bundles.
"""

from __future__ import annotations

import math

from mobile_vla.errors import ResourceError
from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.tune.sweep_config import TuneJobConfig

DRIVER_MEMORY = 512 * 1024**2  # bytes of Ray's logical memory per trial driver (it imports torch, holds datasets)
DATA_LOADING_CPUS = 1.0  # left free for the Ray Data pipelines of the running trials


def total_trials(cfg: TuneJobConfig) -> int:
    """Trials the sweep will run: tune.num_samples times the size of the grid dimensions."""
    grid = 1
    for dimension in cfg.search_space.values():
        if dimension.rule == "grid":
            grid *= len(dimension.grid)
    return cfg.tune.num_samples * grid


def trial_bundle(cfg: TuneJobConfig, base: TrainJobConfig) -> dict[str, float]:
    """What one running trial holds: its driver plus its Train workers."""
    worker = base.scaling.worker_bundle()
    bundle = {key: value * base.scaling.num_workers for key, value in worker.items()}
    bundle["CPU"] = bundle.get("CPU", 0.0) + cfg.tune.driver_cpus
    return bundle


def concurrency(cfg: TuneJobConfig, base: TrainJobConfig, cluster: dict[str, float]) -> int:
    """Trials at once: what the cluster holds after one CPU is left to the Ray Data pipelines, capped by
    tune.max_concurrent_trials and the trial count.

    Raises:
        ResourceError: not even one trial fits.
    """
    need = trial_bundle(cfg, base)
    room = {key: cluster.get(key, 0.0) - (DATA_LOADING_CPUS if key == "CPU" else 0.0) for key in need}
    fits = min((math.floor(room[key] / value + 1e-9) for key, value in need.items() if value > 0), default=1)
    if fits < 1:
        shown = ", ".join(f"{k}: {v:g}" for k, v in sorted(need.items()))
        have = ", ".join(f"{k}: {cluster.get(k, 0):g}" for k in sorted(need))
        raise ResourceError(
            f"one trial needs {{{shown}}} plus 1 CPU for data loading; the cluster has {{{have}}} "
            "(lower scaling.num_workers / resources_per_worker in the training preset, or tune.driver_cpus)"
        )
    limit = cfg.tune.max_concurrent_trials or fits
    return max(1, min(fits, limit, total_trials(cfg)))


def driver_resources(cfg: TuneJobConfig) -> dict[str, float]:
    """The trial driver's Tune bundle; memory keeps it non-empty when driver_cpus is 0 (Tune refuses an
    all-zero bundle), so a 2-CPU machine can run one trial with one worker and one CPU for data loading.
    """
    return {"CPU": cfg.tune.driver_cpus, "memory": DRIVER_MEMORY}
