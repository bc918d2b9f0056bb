"""The one way the platform starts or joins Ray: the running session, `RAY_ADDRESS`, or a local cluster.

    owned = ensure_ray()                                        # evaluation, generation, training
    owned = ensure_ray(env_vars={...}, num_cpus=4, loopback=True)   # the demo
    owned = ensure_ray(loopback=True, dashboard_port=8265)         # `mobile-vla serve`: dashboard on 127.0.0.1

Ray gives a starting raylet a fixed 30 s to register; a busy 2-core machine can miss that, so a
LOCAL start is tried again (`attempts`); joining a cluster address is not retried (its error is the
user's to see). Every process the platform starts sets `MLFLOW_DISABLE_TELEMETRY` in its workers.
"""

from __future__ import annotations

import logging
import os

import ray

from mobile_vla.errors import ResourceError

log = logging.getLogger(__name__)

START_ATTEMPTS = 3
BASE_ENV_VARS = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def ensure_ray(
    *,
    env_vars: dict[str, str] | None = None,
    num_cpus: int | None = None,
    loopback: bool = False,
    log_to_driver: bool = False,
    dashboard_port: int | None = None,
    attempts: int = START_ATTEMPTS,
) -> bool:
    """Joins the Ray already initialised in this process, else `RAY_ADDRESS`, else starts a local one.

    Args:
        env_vars: environment variables for every worker (merged over `BASE_ENV_VARS`).
        num_cpus: logical CPUs of a LOCAL cluster (None: Ray's default, the core count).
        loopback: bind a local cluster's node to 127.0.0.1 (servers, tests).
        log_to_driver: stream the workers' logs to this process.
        dashboard_port: a LOCAL cluster runs Ray's dashboard (and Serve's REST API, which `serve status`
            reads) on 127.0.0.1 at this port; None: no dashboard.
        attempts: tries for a local start that timed out.

    Returns:
        True when this call started or joined Ray (the caller owns the session and shuts it down),
        False when Ray was already initialised here.

    Raises:
        ResourceError: a local cluster did not start in `attempts` tries.
    """
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {**BASE_ENV_VARS, **(env_vars or {})}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=log_to_driver)
        return True
    options = {
        "include_dashboard": dashboard_port is not None,
        "log_to_driver": log_to_driver,
        "runtime_env": runtime_env,
    }
    if dashboard_port is not None:
        options.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    if loopback:
        options["_node_ip_address"] = "127.0.0.1"
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**options)
            return True
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                raise ResourceError(
                    f"the local Ray cluster did not start in {attempt} tries ({str(exc).splitlines()[0]}); load "
                    f"average {load:.1f} on {os.cpu_count()} cores: try again when the machine is less busy"
                ) from exc
            log.warning("local Ray start timed out (attempt %d of %d); trying again", attempt, attempts)
    raise AssertionError("unreachable")  # the loop returns or raises
