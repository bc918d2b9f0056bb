"""`mobile-vla doctor`: one line per check (OK, WARN or FAIL, what was seen, the fix); exit 1 on any FAIL.

    mobile-vla doctor                   # every check
    mobile-vla doctor --json            # the same as a JSON object, for scripts and support requests
    mobile-vla doctor --check ray --check mlflow

Checks: egl (a MiniWorld frame rendered offscreen), torch (CUDA when a GPU is visible), onnxruntime
(its providers; CUDA first when a GPU is visible), tensorrt (optional: WARN when absent), home (the
platform home is writable), mlflow (the tracking URI answers), ray (RAY_ADDRESS reachable, token auth
and its token), serve-tokens (the API tokens file). docs/quickstart.md#troubleshooting explains each.
"""

from __future__ import annotations

import argparse
import json

from mobile_vla.doctor.checks import CHECKS, FAIL, run_checks, worst_status


def register(subparsers) -> None:
    """Adds `mobile-vla doctor` to the CLI."""
    parser = subparsers.add_parser(
        "doctor",
        help="check EGL, torch/CUDA, ONNX Runtime, TensorRT, MLflow, Ray auth and tokens; print the fixes",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of lines")
    parser.add_argument(
        "--check", action="append", choices=list(CHECKS), metavar="NAME", help=f"run only these ({', '.join(CHECKS)})"
    )
    parser.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    """Runs the checks and prints them; 1 when any check FAILs, else 0."""
    results = run_checks(args.check)
    worst = worst_status(results)
    if args.json:
        print(json.dumps({"status": worst, "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            print(f"{r.status:<4}  {r.name:<{width}}  {r.detail}" + (f"  -> fix: {r.fix}" if r.fix else ""))
        print(f"doctor: {worst}")
    return 1 if worst == FAIL else 0
