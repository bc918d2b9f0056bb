"""`mobile-vla serve [--config serve_configs/local.yaml]`: local Ray + Serve on 127.0.0.1, until Ctrl-C
or SIGTERM (either shuts Serve and the local Ray down: no process left behind, the port freed).

The config is a Ray Serve config file (the same one `serve deploy` takes), validated with Ray's
own schema and deployed on Serve's public APIs (serve/launch.py); this command only adds the embedded
defaults: a local Ray with its dashboard on 127.0.0.1 (so Ray's `serve status`, `serve run` and the
dashboard see it), host forced to 127.0.0.1, and an API token file under the platform home when none
is configured. With RAY_ADDRESS set it joins that cluster instead, and a Ctrl-C there leaves the
application running unless `--shutdown-on-exit` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from pydantic import ValidationError

from mobile_vla.config import platform_home, read_yaml
from mobile_vla.errors import ConfigError
from mobile_vla.serve.auth import (
    ALL_ROBOTS,
    LEGACY_SCOPES,
    SCOPES,
    add_token,
    create_tokens_file,
    list_grants,
    revoke_tokens,
)
from mobile_vla.serve.launch import deploy_config, shutdown_on_exit, stop_serving, wait_until_running
from mobile_vla.serve.memory_token import format_time, parse_memory_keys, resolve_secret_path, rotate_memory_keys
from mobile_vla.serve.rollout_command import register as register_rollout

DEFAULT_CONFIG = "serve_configs/local.yaml"
DEFAULT_DASHBOARD_PORT = 8265  # Ray's own default: `serve status` and `serve deploy` look there


def register(subparsers) -> None:
    """Adds `mobile-vla serve`."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the policy over HTTP (local Ray + Serve on 127.0.0.1:8000)",
        description="Starts a local Ray cluster (or joins RAY_ADDRESS) and deploys the Serve config; blocks until "
        "Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"Ray Serve config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    parser.add_argument("--model", default=None, help="override the model URI of every application")
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="HAProxy instead of Ray's Python proxy (about 2x requests/s on a small CPU box); binds "
        "ports on ALL interfaces: see docs/http_api.md#haproxy-mode before using it",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help=f"port of the local Ray's dashboard, on 127.0.0.1 (default {DEFAULT_DASHBOARD_PORT}): "
        "`serve status`, `serve run`, the Serve REST API",
    )
    parser.add_argument(
        "--shutdown-on-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on Ctrl-C/SIGTERM delete the application(s) this command deployed (default: yes on the local Ray "
        "it started, no on an existing cluster joined through RAY_ADDRESS)",
    )
    parser.set_defaults(func=run_serve)
    _register_secrets(parser.add_subparsers(dest="serve_command", metavar="[tokens|memory-key]", required=False))
    register_rollout(subparsers)


def _register_secrets(subparsers) -> None:
    """`mobile-vla serve tokens add|revoke|list` and `mobile-vla serve memory-key rotate|list`."""
    tokens = subparsers.add_parser(
        "tokens",
        help="add, revoke or list API tokens (the file every replica follows; docs/operations.md#security)",
        description="Edits the tokens file in place (atomically); running replicas pick the change up within seconds.",
    )
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a token for robots with scopes; prints the token once")
    add.add_argument("--name", required=True, help="a label to revoke it by (e.g. the robot id)")
    add.add_argument(
        "--robots", required=True, help=f"robot id, id prefix ending in * (warehouse-a-*), comma list, or {ALL_ROBOTS}"
    )
    add.add_argument(
        "--scopes",
        default=",".join(LEGACY_SCOPES),
        help=f"comma list of {', '.join(SCOPES)} (default {','.join(LEGACY_SCOPES)})",
    )
    revoke = actions.add_parser("revoke", help="remove a token (by --name, or by the plain --token)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--name")
    which.add_argument("--token", help="the plain token (for entries without a name)")
    listing = actions.add_parser("list", help="names, robots and scopes (never the tokens)")
    for sub in (add, revoke, listing):
        sub.add_argument(
            "--file",
            type=Path,
            default=None,
            help="tokens file (default: MOBILE_VLA_TOKENS_FILE, else the platform home's)",
        )
    tokens.set_defaults(func=run_tokens)

    keys = subparsers.add_parser(
        "memory-key",
        help="rotate or list the keys that sign memory tokens",
        description="Edits the memory secret file in place (atomically); running replicas follow it within seconds.",
    )
    key_actions = keys.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    rotate = key_actions.add_parser(
        "rotate", help="add a new signing key; the old one keeps verifying for --window-s (creates the file if absent)"
    )
    rotate.add_argument(
        "--window-s", type=float, default=3600.0, help="how long the old key still verifies (default 3600)"
    )
    rotate.add_argument(
        "--activate-in-s",
        type=float,
        default=0.0,
        help="the new key signs from this many seconds on (default 0); on several nodes: longer than the file's copy",
    )
    key_list = key_actions.add_parser("list", help="key ids and their from/until (never the secrets)")
    for sub in (rotate, key_list):
        sub.add_argument(
            "--file",
            type=Path,
            default=None,
            help="memory secret file (default: MOBILE_VLA_MEMORY_SECRET_FILE, else the platform home's)",
        )
    keys.set_defaults(func=run_memory_key)


def _tokens_path(chosen: Path | None) -> Path:
    if chosen is not None:
        return chosen
    configured = os.environ.get("MOBILE_VLA_TOKENS_FILE")
    return Path(configured) if configured else platform_home() / "serve" / "tokens"


def run_tokens(args: argparse.Namespace) -> int:
    """`mobile-vla serve tokens add|revoke|list`."""
    path = _tokens_path(args.file)
    if args.tokens_command == "add":
        scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
        token = add_token(path, args.robots, scopes, args.name)
        print(f"added {args.name!r} (robots={args.robots} scopes={','.join(scopes)}) to {path}; stored as its SHA-256")
        print(f"token (shown once; give it to the robot): {token}")
    elif args.tokens_command == "revoke":
        removed = revoke_tokens(path, name=args.name, token=args.token)
        print(f"revoked {', '.join(removed)} in {path}; replicas answer 401 for it within seconds")
    else:
        for grant in list_grants(path):
            print(f"{grant.name}\trobots={','.join(grant.robots)}\tscopes={','.join(sorted(grant.scopes))}")
    return 0


def run_memory_key(args: argparse.Namespace) -> int:
    """`mobile-vla serve memory-key rotate|list`."""
    path = args.file if args.file is not None else resolve_secret_path(None)
    if args.key_command == "rotate":
        key = rotate_memory_keys(path, window_s=args.window_s, activate_in_s=args.activate_in_s)
        print(f"new memory key {key.key_id} in {path}; earlier keys verify for {args.window_s:g} s more")
    else:
        if not path.is_file():
            raise ConfigError(f"{path}: memory secret file not found")
        for key in parse_memory_keys(path.read_bytes(), str(path)).keys:
            since = format_time(key.valid_from) if key.valid_from is not None else "-"
            until = format_time(key.valid_until) if key.valid_until is not None else "-"
            print(f"{key.key_id}\tfrom={since}\tuntil={until}")
    return 0


# Seen with `ss` on a local run: the ingress replicas' HTTP ports (30000-31000) follow the node address
# (127.0.0.1 here, the node's IP on a cluster); these two are on every interface regardless.
HAPROXY_ALL_INTERFACES = "8404 (HAProxy stats) and 9101 (HAProxy metrics)"


# Serve settings for the local Ray `mobile-vla serve` starts; an operator's own environment value wins.
LOCAL_SERVE_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def proxy_environment(haproxy: bool) -> dict[str, str]:
    """Environment for the local Ray: Serve's throughput mode always (gRPC proxy->replica, user code on
    the replica's loop: about 1.2x the stock settings on the same box, docs/performance.md; set
    RAY_SERVE_THROUGHPUT_OPTIMIZED=0 to opt out), HAProxy mode only when asked for. A stopping ingress
    replica is not held open for an external load balancer to deregister it (Serve's default in throughput
    mode: 30 s, so every Ctrl-C waited out serve.shutdown's timeout): this Ray is local, with no balancer in
    front; in-flight requests are still drained. An operator's own value of either variable wins.
    """
    env = {name: os.environ.get(name, default) for name, default in LOCAL_SERVE_DEFAULTS.items()}
    if haproxy:
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    return env


def load_serve_config(path: str | Path, port: int | None = None, model_uri: str | None = None):
    """Reads and validates a Serve config (ServeDeploySchema); host pinned to 127.0.0.1."""
    # Here, not at the top: `mobile-vla --help` imports this module and must not load Ray.
    from ray.serve.schema import ServeDeploySchema

    data = read_yaml(path)
    http = data.setdefault("http_options", {})
    if http.get("host") not in (None, "127.0.0.1", "localhost"):
        print(f"note: {path}: http_options.host {http['host']!r} replaced by 127.0.0.1 for a local run")
    http["host"] = "127.0.0.1"
    if port is not None:
        http["port"] = port
    if model_uri is not None:
        for app in data.get("applications", []):
            app.setdefault("args", {})["model_uri"] = model_uri
    try:
        return ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {loc}: {first['msg']}") from None


def ensure_tokens_file() -> Path:
    """The configured tokens file, or a new one with one random token under the platform home."""
    configured = os.environ.get("MOBILE_VLA_TOKENS_FILE")
    if configured:
        return Path(configured)
    path = platform_home() / "serve" / "tokens"
    if not path.exists():
        create_tokens_file(path)
        print(f"created an API token in {path}")
    os.environ["MOBILE_VLA_TOKENS_FILE"] = str(path)
    return path


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (a service manager, `kill`) stops the server like Ctrl-C.

    A second SIGTERM is ignored while Serve and Ray shut down.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """Deploys the config and blocks; Ctrl-C or SIGTERM stop it (deleting the application per
    `--shutdown-on-exit`, by default only on the local Ray this command started).
    """
    config = load_serve_config(args.config, args.port, args.model)
    attached = bool(os.environ.get("RAY_ADDRESS"))  # ensure_ray joins it rather than starting a local Ray
    shutdown = shutdown_on_exit(args.shutdown_on_exit, attached)
    if not attached and not shutdown:
        print("note: --no-shutdown-on-exit has no effect on the local Ray this command starts: it stops with it")
    tokens = ensure_tokens_file()
    os.environ["MOBILE_VLA_HOME"] = str(platform_home())  # replicas and the app builder see the same home
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.update(proxy_environment(args.haproxy))
    if args.haproxy:
        print(
            f"warning: HAProxy mode binds {HAPROXY_ALL_INTERFACES} on all interfaces, whatever "
            "http_options.host says: firewall them (docs/http_api.md#haproxy-mode)"
        )

    # Here, not at the top: `mobile-vla --help` imports this module and must not load Ray.
    import ray

    from mobile_vla.ray_session import ensure_ray

    owned = ensure_ray(loopback=True, log_to_driver=True, dashboard_port=args.dashboard_port)  # replica logs show here
    # After ray.init, which installs its own SIGTERM handlers (Ray's C++ one aborts the process, leaving
    # the Serve proxy holding the port); ours replaces them.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    names = [app.name for app in config.applications]
    try:
        if attached:
            print(f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}")
        else:
            dashboard = f"http://127.0.0.1:{args.dashboard_port}"
            print(f"local Ray at {ray.get_runtime_context().gcs_address}; dashboard {dashboard}")
            print(f"  RAY_AUTH_MODE=token serve status --address {dashboard}")
        deploy_config(config, args.config)
        print(f"deploying {names} from {args.config} ...")
        wait_until_running(names, args.config)
        port = config.http_options.port
        for app in config.applications:
            print(f"serving {app.name} at http://127.0.0.1:{port}{(app.route_prefix or '').rstrip('/')}/v1/act")
        print(f"API token: `cat {tokens}` (send it as 'Authorization: Bearer <token>'); docs: docs/http_api.md")
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    finally:
        try:
            stop_serving(names, shutdown=shutdown, attached=attached)
        finally:
            if owned:
                ray.shutdown()
