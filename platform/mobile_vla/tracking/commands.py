"""`mobile-vla mlflow-ui`: the MLflow UI on the embedded store, bound to 127.0.0.1; `mobile-vla models
history`: every recorded move of a registered model's aliases (mobile_vla.tracking.audit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from mobile_vla.errors import ConfigError


def register(subparsers) -> None:
    """Adds `mlflow-ui` and `models history` to the `mobile-vla` subcommands."""
    ui = subparsers.add_parser("mlflow-ui", help="open the MLflow UI on the embedded store (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (keep loopback; use SSH forwarding)")
    ui.add_argument("--workers", type=int, default=1, help="server worker processes (one person's UI: 1)")
    ui.add_argument("--print-only", action="store_true", help="print the mlflow server line and exit")
    ui.set_defaults(func=run_ui)

    models = subparsers.add_parser("models", help="the registered model's history: every alias move")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    history = models_sub.add_parser(
        "history",
        help="every move of the model's aliases, newest first: what, when, from which version, who, why",
        description="Reads the audit records the registry keeps on the registered model (tags "
        "audit.alias_move.<alias>.<seq>): moves by promote, online updates, training, and moves made by hand "
        "in the MLflow UI once a serving watcher (or the next promote) has seen them.",
    )
    history.add_argument("--model", default="mobile-vla-policy", help="registered model name")
    history.add_argument("--alias", default=None, help="only this alias (e.g. champion)")
    history.add_argument("--limit", type=int, default=None, help="at most this many records")
    history.add_argument("--json", action="store_true", help="the records as a JSON list (newest first)")
    history.set_defaults(func=run_history)


def run_ui(args) -> int:
    """Runs `mlflow server` on the embedded store until Ctrl-C (or prints its command line)."""
    # Deferred: the tracking package loads mlflow, and this module is imported while `--help` is parsed.
    from mobile_vla.tracking.store import UI_ENV, embedded_paths, ui_command

    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        print(f"MLFLOW_TRACKING_URI points at a server: open {os.environ['MLFLOW_TRACKING_URI']}")
        return 0
    if args.workers < 1:
        raise ConfigError(f"mlflow-ui: --workers must be >= 1, got {args.workers}")
    cmd = ui_command(args.host, args.port, args.workers)
    exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd[0] = exe
    print(" ".join(cmd))
    if args.print_only:
        return 0
    db, artifacts = embedded_paths()
    db.parent.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI: http://{args.host}:{args.port}  (Ctrl-C to stop)")
    env = {**os.environ, **UI_ENV}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def run_history(args) -> int:
    """Prints the audit of the model's alias moves, newest first (a table, or JSON with --json)."""
    # Deferred: the tracking package loads mlflow, and this module is imported while `--help` is parsed.
    from mobile_vla.tracking.audit import alias_history, unrecorded_aliases

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"models history: --limit must be >= 1, got {args.limit}")
    moves = alias_history(args.model, args.alias)[: args.limit]
    pending = {a: v for a, v in unrecorded_aliases(args.model).items() if args.alias in (None, a)}
    if args.json:
        print(json.dumps([m.to_dict() for m in moves], indent=2))
    else:
        _print_history(args.model, moves)
    for alias, (recorded, current) in sorted(pending.items()):
        print(
            f"note: @{alias} points at version {current} but its last record says {recorded or 'nothing'}: moved "
            "outside the platform and not yet seen by a watcher (serving records it within alias_poll_s)",
            file=sys.stderr,
        )
    return 0


def _print_history(model: str, moves) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"alias moves of {model}, newest first")
    for column in ("time (UTC)", "alias", "from", "to", "actor", "by", "reason"):
        table.add_column(column, overflow="fold")
    for move in moves:
        when = move.time.replace("T", " ")[:19]
        moved = (when, f"@{move.alias}", move.from_version or "-", move.to_version)
        table.add_row(*moved, move.actor, move.by, move.reason)
    console = Console(width=max(Console().width, 160))
    console.print(table if moves else f"no recorded alias moves for {model}")
