"""`mobile-vla demo`: the whole loop on embedded defaults, then a summary; everything shut down after.

    mobile-vla demo                                   # small preset, <= 20 minutes on 2 CPU cores
    mobile-vla demo --preset tiny                     # the CI-sized loop, a few minutes
    mobile-vla demo --robots 8 --keep-serving         # leave the server up after the summary (Ctrl-C)
    mobile-vla demo --dagger-rounds 0                 # no DAgger round: the robots drive once

Data (MiniWorld + scripted expert) -> Ray Train (2 workers) -> MLflow version @challenger -> ONNX
export -> offline and closed-loop evaluation -> promotion through the demo gate -> Ray Serve on
127.0.0.1 -> simulated robots driving MiniWorld episodes through POST /v1/act, the scripted expert
on the same scenes -> DAgger round(s) through the fleet path: the served policy drives train scenes
over HTTP, the expert's labels go in through POST /v1/feedback, the online update fine-tunes
@champion on them (replay of the demo's data, gate, promotion) and serving follows the new champion
-> the robots drive the same scenes again. The summary (robots vs expert on the same scene seeds,
before and after DAgger, with the version that answered) is printed and written to
<home>/demo_summary.json. Unset options take the preset's value.

The demo gate: a challenger becomes @champion when its closed-loop success on the demo's episodes
reaches --success-floor (0.25); in a fresh home the first version becomes champion even below the
floor, as a "forced" promotion that the summary and the version's promotion.* tags say. The
platform gate (jobs/configs/gate.yaml, `mobile-vla promote`) is stricter: 200 episodes and a win
over the champion beyond sampling noise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import warnings
from pathlib import Path

from mobile_vla.demo.settings import PRESETS, DemoConfig, default_home

# The demo itself (Ray, torch, MLflow, MiniWorld) is imported inside run_demo_command: the CLI
# imports this module to build its parser, and `mobile-vla --help` must stay fast.


def register(subparsers) -> None:
    """Adds `mobile-vla demo` to the CLI."""
    parser = subparsers.add_parser(
        "demo",
        help="the whole loop on embedded defaults: data, train, evaluate, export, promote, serve, robots, DAgger",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=("tiny", "small"),
        default="small",
        help="model and data sizes (default small; tiny is for CI)",
    )
    parser.add_argument("--episodes", type=int, help="expert episodes to generate (train + val)")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument(
        "--home",
        type=Path,
        metavar="DIR",
        help="platform home for data, MLflow, Ray results (default $MOBILE_VLA_HOME or ./.mobile_vla/demo)",
    )
    parser.add_argument("--robots", type=int, help="robots driven concurrently over HTTP")
    parser.add_argument("--closed-loop-episodes", type=int, help="closed-loop evaluation episodes in MiniWorld")
    parser.add_argument("--success-floor", type=float, help="closed-loop success the demo gate asks for (0..1)")
    parser.add_argument("--dagger-rounds", type=int, help="DAgger rounds through the fleet path (0: none)")
    parser.add_argument("--dagger-episodes", type=int, help="scenes the served policy drives per DAgger round")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000; a free one if it is busy)")
    parser.add_argument("--keep-serving", action="store_true", help="keep serving after the summary, until Ctrl-C")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_demo_command)


def demo_config(args) -> DemoConfig:
    """The preset's DemoConfig with the options given on the command line."""
    overrides = {
        "episodes": args.episodes,
        "epochs": args.epochs,
        "robots": args.robots,
        "closed_loop_episodes": args.closed_loop_episodes,
        "success_floor": args.success_floor,
        "dagger_rounds": args.dagger_rounds,
        "dagger_episodes": args.dagger_episodes,
        "port": args.port,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(home=args.home or default_home(), keep_serving=args.keep_serving, progress=not args.no_progress)
    return PRESETS[args.preset](**overrides)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True):
    """The demo prints its own progress: library INFO lines (exporters, MLflow table creation,
    artifact download bars) and deprecation warnings would bury it. `mobile-vla -v demo` shows all.
    Levels and filters are restored afterwards (the demo also runs inside test processes).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its logger
    loggers = [logging.getLogger(name) for name in ("", "mlflow", "onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*were assigned during export.*")
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape constraints.*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def run_demo_command(args) -> int:
    """`mobile-vla demo`: runs the whole loop with library chatter turned down (unless -v)."""
    from mobile_vla.demo.runner import run_demo

    cfg = demo_config(args)
    with quiet_libraries(enabled=not getattr(args, "verbose", False)):
        run_demo(cfg)
    return 0
