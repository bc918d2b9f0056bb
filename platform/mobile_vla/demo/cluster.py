"""The demo's Ray cluster: joined or started before the first step, torn down after the last.

    cluster = start_cluster(cfg)      # the Ray already running here, RAY_ADDRESS, or a local one
    ...
    stop_cluster(cluster)             # Serve off (or only the demo's app), Ray off if the demo started it

A Ray already initialised in this process (tests, `ray job submit`) is reused and left running;
only the demo's own Serve application is removed from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray import serve

from mobile_vla.demo.settings import APP_NAME, DemoConfig
from mobile_vla.ray_session import ensure_ray


@dataclass
class Cluster:
    """What the demo owns of the cluster it runs on, so that it shuts down only that."""

    owned: bool  # started (or connected) by the demo, so the demo shuts it down
    serve_started: bool = False


def start_cluster(cfg: DemoConfig) -> Cluster:
    """Reuses a Ray already initialised here; else RAY_ADDRESS; else a local cluster on 127.0.0.1.

    Logical CPUs are at least 4 on a 2-core box: 2 Train workers plus the Ray Data pipeline, and
    later the Serve replicas plus the robots' task, each reserve a slot while mostly waiting.
    """
    owned = ensure_ray(
        env_vars={
            "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl"),
            "MOBILE_VLA_HOME": str(cfg.resolved_home()),
            "TOKENIZERS_PARALLELISM": "false",
        },
        num_cpus=max(4, os.cpu_count() or 1),
        loopback=True,
    )
    return Cluster(owned=owned)


def stop_cluster(cluster: Cluster) -> None:
    """Serve off (or only the demo's app, on a Serve the demo did not start); Ray off if ours."""
    if not ray.is_initialized():
        return
    try:
        if cluster.serve_started:
            serve.shutdown()
        elif APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
    finally:
        if cluster.owned:
            ray.shutdown()
