"""`mobile-vla rollout start|stop|status`: a canary rollout of one model version (serve/rollout.py).

    mobile-vla rollout start --version 7 --steps 10,50,100 --hold-s 20 [--url http://127.0.0.1:8000]
    mobile-vla rollout status            # the canary and per-version KPIs, as one ingress sees them
    mobile-vla rollout stop --reason "operator: robots 3 and 9 hesitate"     # roll back now

The app must serve a canary (`canary:` in its app args: docs/operations.md, canary rollout). Bounds come from
`--bounds FILE` (YAML, the fields of `RolloutBounds`) and `--set key=value` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mobile_vla.config import platform_home
from mobile_vla.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers) -> None:
    """Adds `mobile-vla rollout`."""
    parser = subparsers.add_parser(
        "rollout",
        help="canary rollout: serve a version to a share of robots, widen in steps, roll back on a KPI breach",
        description="Needs an app serving a canary (ServeAppConfig canary:). Every alias move is recorded in the "
        "audit with actor 'rollout' and why; KPIs and decisions land on the version in MLflow.",
    )
    actions = parser.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="put --version on @canary and widen it step by step (blocks)")
    start.add_argument("--version", required=True, help="the registered model version to roll out")
    start.add_argument("--steps", default="10,50,100", help="rising shares of robots in percent (default 10,50,100)")
    start.add_argument("--hold-s", type=float, default=20.0, help="seconds each step is held in bounds (default 20)")
    start.add_argument("--poll-s", type=float, default=2.0, help="seconds between KPI reads (default 2)")
    start.add_argument("--no-promote", action="store_true", help="stop at the last step; leave @champion alone")
    start.add_argument("--bounds", type=Path, default=None, help="YAML file of RolloutBounds fields")
    start.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one bound"
    )
    start.add_argument("--report", type=Path, default=None, help="write the decisions as JSON here")
    stop = actions.add_parser("stop", help="roll the canary back now (share 0, @canary onto the champion)")
    stop.add_argument("--reason", default="operator stop", help="recorded in the audit")
    status = actions.add_parser("status", help="the canary and per-version KPIs from GET /v1/rollout")
    for sub in (start, stop, status):
        sub.add_argument("--model", default="mobile-vla-policy", help="registered model name")
    for sub in (start, status):
        sub.add_argument("--url", default=DEFAULT_URL, help=f"the serving ingress (default {DEFAULT_URL})")
        sub.add_argument(
            "--token-file",
            type=Path,
            default=None,
            help="file whose first word is an operator token (default: MOBILE_VLA_TOKEN, else the platform "
            "home's serve/tokens, whose first line `mobile-vla serve` writes with the local operator token)",
        )
    parser.set_defaults(func=run_rollout)


def operator_token(path: Path | None) -> str:
    """--token-file's first word, else $MOBILE_VLA_TOKEN, else the first word of the home's tokens file."""
    if path is None and os.environ.get("MOBILE_VLA_TOKEN"):
        return os.environ["MOBILE_VLA_TOKEN"]
    path = path or platform_home() / "serve" / "tokens"
    try:
        words = path.read_text().split()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if not words:
        raise ConfigError(f"--token-file {path}: empty")
    return words[0]


def run_rollout(args: argparse.Namespace) -> int:
    """`mobile-vla rollout start|stop|status`."""
    # Deferred: the controller loads mlflow and httpx; `mobile-vla --help` imports every commands module.
    from mobile_vla.config import load_config, validate_config
    from mobile_vla.serve.rollout import (
        HttpKpis,
        RolloutBounds,
        RolloutController,
        RolloutPlan,
        parse_steps,
        write_report,
    )
    from mobile_vla.tracking.rollout import rollback_canary

    if args.rollout_command == "stop":
        champion = rollback_canary(args.model, args.reason)
        print(f"rolled back: share 0, @canary on the champion's version {champion}")
        return 0
    plan = None
    if args.rollout_command == "start":  # a bad plan is refused before anything is read or moved
        bounds = load_config(args.bounds, RolloutBounds, args.overrides)
        plan = validate_config(
            {
                "model": args.model,
                "version": str(args.version),
                "steps": parse_steps(args.steps),
                "hold_s": args.hold_s,
                "poll_s": args.poll_s,
                "promote": not args.no_promote,
                "bounds": bounds.model_dump(),
            },
            RolloutPlan,
            "rollout start",
        )
    token = operator_token(args.token_file)
    kpis = HttpKpis(args.url, token)
    try:
        if plan is None:
            import httpx

            answer = httpx.get(f"{args.url.rstrip('/')}/v1/rollout", headers={"Authorization": f"Bearer {token}"})
            if answer.status_code != 200:
                raise ConfigError(f"GET {args.url}/v1/rollout answered {answer.status_code}: {answer.text[:300]}")
            print(json.dumps(answer.json(), indent=2))
            return 0
        report = RolloutController(plan, kpis).run()
    finally:
        kpis.close()
    if args.report is not None:
        write_report(report, args.report)
    print(f"rollout of version {report.version}: {report.outcome} ({report.reason})")
    return 0 if report.outcome != "rolled_back" else 1
