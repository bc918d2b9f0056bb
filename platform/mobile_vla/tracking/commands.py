"""`mobile-vla mlflow-ui`: the MLflow UI on the embedded store, bound to 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def register(subparsers) -> None:
    """Adds `mlflow-ui` to the `mobile-vla` subcommands."""
    ui = subparsers.add_parser("mlflow-ui", help="open the MLflow UI on the embedded store (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (keep loopback; use SSH forwarding)")
    ui.add_argument("--print-only", action="store_true", help="print the mlflow server line and exit")
    ui.set_defaults(func=run_ui)


def run_ui(args) -> int:
    """Runs `mlflow server` on the embedded store until Ctrl-C (or prints its command line)."""
    # Deferred: the tracking package loads mlflow, and this module is imported while `--help` is parsed.
    from mobile_vla.tracking.store import UI_ENV, embedded_paths, ui_command

    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        print(f"MLFLOW_TRACKING_URI points at a server: open {os.environ['MLFLOW_TRACKING_URI']}")
        return 0
    cmd = ui_command(args.host, args.port)
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
