"""`mobile-vla`: the command line. Thin: each stage registers its own subcommands.

Every stage package has a `commands.py` with `register(subparsers)`; each subcommand sets
`func(args) -> int | None`. Heavy imports happen inside those functions, so `--help` is fast.
A `MobileVLAError` (bad config, data, model or request) prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mobile_vla import __version__
from mobile_vla.errors import MobileVLAError

# Order = order in `mobile-vla --help`.
STAGES = ["data", "policy", "train", "tune", "evaluate", "export", "tracking", "serve", "online", "doctor", "demo"]


def build_parser() -> argparse.ArgumentParser:
    """The `mobile-vla` parser, with every stage's subcommands registered (each stage's commands.py)."""
    parser = argparse.ArgumentParser(
        prog="mobile-vla",
        description="Train, evaluate, export and serve the Mobile VLA policy on Ray, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"mobile-vla {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        name = f"mobile_vla.{stage}.commands"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a stage not built yet
            if exc.name in (name, f"mobile_vla.{stage}"):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one `mobile-vla` command; returns its exit code (2 on a user error, 130 on Ctrl-C)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except MobileVLAError as exc:
        print(f"mobile-vla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
