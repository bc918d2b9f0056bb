"""A Serve config file deployed on Ray Serve's public APIs, as `mobile-vla serve` does it, and what Ctrl-C does.

    serve.start(proxy_location, http_options, grpc_options, logging_config, ...)   # the config's cluster options
    serve.run_many([RunTarget(compose_app(args, overrides), name, route_prefix)])  # each application, built here

Each application's builder runs in this process, with the application's `runtime_env` env_vars set
around it (as Serve's build task would have them); its `deployments:` entries are merged over the
code's options, never replacing the replicas' environment (serve/deploy_options.py). Applications go
up imperatively: other applications on the cluster are left as they are (a `serve deploy` would
delete every application its config does not list).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from mobile_vla.errors import ConfigError, ResourceError
from mobile_vla.serve.deploy_options import DeploymentOverrides

BUILDER = "mobile_vla.serve.app:build_app"  # the one import path `mobile-vla serve` builds itself
RUNNING_TIMEOUT_S = 600.0


def shutdown_on_exit(requested: bool | None, attached: bool) -> bool:
    """Whether stopping `mobile-vla serve` deletes what it deployed.

    Args:
        requested: `--shutdown-on-exit` (True), `--no-shutdown-on-exit` (False) or neither (None).
        attached: True when the command joined an existing cluster (RAY_ADDRESS), False when it
            started a local Ray of its own.

    Returns:
        The explicit choice if any; else True for its own local Ray, False on an existing cluster (a
        Ctrl-C on an operator's laptop must not take the fleet's application down).
    """
    return (not attached) if requested is None else requested


@contextlib.contextmanager
def _environment(env_vars: dict[str, str]) -> Iterator[None]:
    """`env_vars` set in this process for the block, then the previous values restored."""
    saved = {key: os.environ.get(key) for key in env_vars}
    os.environ.update({key: str(value) for key, value in env_vars.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_application(app, source: str):
    """The bound application of one `applications:` entry (a ServeApplicationSchema) of config `source`."""
    from mobile_vla.serve.app import compose_app

    if app.import_path.replace(":", ".") != BUILDER.replace(":", "."):
        raise ConfigError(
            f"{source}: applications[{app.name}].import_path = {app.import_path!r}: mobile-vla serve builds "
            f"{BUILDER} only; deploy other applications with `serve deploy`"
        )
    overrides = DeploymentOverrides(
        deployments={d.name: d.model_dump(exclude_unset=True) for d in app.deployments},
        runtime_env=dict(app.runtime_env or {}),
        source=f"{source}: applications[{app.name}]",
    )
    with _environment((app.runtime_env or {}).get("env_vars") or {}):
        return compose_app(dict(app.args or {}), overrides=overrides)


def deploy_config(config, source: str) -> list[str]:
    """Starts Serve with `config`'s cluster options (a ServeDeploySchema) and deploys its applications
    without waiting for them; returns their names (`wait_until_running` waits).
    """
    from ray import serve

    cluster_options = {
        "proxy_location": config.proxy_location,
        "http_options": config.http_options.model_dump(exclude_unset=True),
    }
    for key in ("grpc_options", "logging_config", "tracing_config", "controller_options"):
        value = getattr(config, key, None)
        if key in config.model_fields_set and value is not None:
            cluster_options[key] = value.model_dump(exclude_unset=True)
    serve.start(**cluster_options)
    targets = []
    for app in config.applications:
        logging_config = app.logging_config or config.logging_config  # an app without one takes the cluster's
        targets.append(
            serve.RunTarget(
                target=build_application(app, source),
                name=app.name,
                route_prefix=app.route_prefix,
                logging_config=logging_config.model_dump(exclude_unset=True) if logging_config else None,
                external_scaler_enabled=app.external_scaler_enabled,
            )
        )
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return [app.name for app in config.applications]


def wait_until_running(names: list[str], source: str, timeout_s: float = RUNNING_TIMEOUT_S) -> None:
    """Blocks until every application in `names` is RUNNING.

    Raises:
        ResourceError: one failed to deploy (Serve's message), or not all ran within `timeout_s`.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve.status().applications  # one controller call per poll
        statuses = {name: applications.get(name) for name in names}
        states = {n: (s.status if s else "NOT_STARTED") for n, s in statuses.items()}
        if all(str(v).endswith("RUNNING") for v in states.values()):
            return
        failed = {n: s.message for n, s in statuses.items() if s and str(s.status).endswith("DEPLOY_FAILED")}
        if failed:
            raise ResourceError(f"{source}: deployment failed: {failed}")
        if time.monotonic() > deadline:
            raise ResourceError(f"{source}: not running after {timeout_s:g} s: {states}")
        time.sleep(1.0)


def stop_serving(names: list[str], shutdown: bool, attached: bool) -> None:
    """What stopping `mobile-vla serve` does to Serve: nothing unless `shutdown`; then on an existing
    cluster only its own applications are deleted (the fleet's other applications and Serve itself
    stay), and on its own local Ray Serve is shut down.
    """
    from ray import serve

    if not shutdown:
        print(
            f"left {names} running on the cluster (--shutdown-on-exit deletes them on stop; "
            "by hand: `serve status`, `serve shutdown` with the cluster's dashboard address)",
            flush=True,
        )
    elif attached:
        for name in names:
            serve.delete(name)
        print(f"deleted {names} from the cluster", flush=True)
    else:
        serve.shutdown()
