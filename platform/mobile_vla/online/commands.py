"""`mobile-vla promote`, `mobile-vla online-update` and `mobile-vla collect`: the gate that moves
`@champion`, the job that turns fleet feedback into a challenger, and DAgger rounds in MiniWorld that
feed it. Heavy imports stay inside the functions (fast --help).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mobile_vla.errors import ConfigError, DataError


def register(subparsers) -> None:
    """Adds `promote` and `online-update` to the CLI, and the feedback section of `data inspect`."""
    promote = subparsers.add_parser(
        "promote",
        help="gate a challenger against @champion and move the alias if it passes",
        description="Compare a model version with @champion on its evaluation metrics (version tags "
        "metric.<key>), move @champion if the gate passes, and tag the version with the decision. "
        "Exit status: 0 promoted, 1 rejected by the gate, 2 bad input.",
    )
    promote.add_argument("--model", required=True, help="registered model name, e.g. mobile-vla-policy")
    which = promote.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to promote")
    which.add_argument("--from-alias", default=None, help="promote the version behind this alias (default challenger)")
    promote.add_argument(
        "--gate",
        nargs="*",
        default=[],
        metavar="FILE|key=value",
        help="a gate YAML file (e.g. jobs/configs/gate.yaml) and/or key=value overrides",
    )
    promote.add_argument("--force", action="store_true", help="move @champion even if the gate fails (tagged 'forced')")
    promote.add_argument(
        "--reason", default="", help="why, in the operator's words: kept in the audit of the move (models history)"
    )
    promote.set_defaults(func=run_promote)

    update = subparsers.add_parser(
        "online-update",
        help="fine-tune @champion on new fleet feedback, register a challenger, promote if the gate passes",
        description="Exit status: 0 promoted or no new feedback, 1 challenger rejected by the gate, 2 bad input.",
    )
    update.add_argument("--config", required=True, help="e.g. jobs/configs/online_update.yaml")
    update.add_argument("overrides", nargs="*", metavar="key.sub=value")
    update.set_defaults(func=run_online_update_command)
    _add_collect(subparsers)
    _add_inspect_section()


COLLECT_EPILOG = """\
examples:
  mobile-vla collect --model models:/mobile-vla-policy@champion --data data/nav --episodes 100 --in-process
  mobile-vla collect --data data/nav --episodes 100 --beta 0.25 --seed 1 \\
      --endpoint http://127.0.0.1:8000 --token-file .mobile_vla/serve/tokens
  mobile-vla online-update --config jobs/configs/online_update.yaml replay.data=data/nav

Every visited step is stored as an operator correction (the expert's command) through /v1/feedback
(--endpoint) or straight into the feedback store (--in-process); online-update fine-tunes on them."""


def _add_collect(subparsers) -> None:
    """`mobile-vla collect`: one DAgger round in MiniWorld through serve + feedback (or in-process)."""
    collect = subparsers.add_parser(
        "collect",
        help="DAgger round: the current policy drives MiniWorld scenes, the expert's corrections go to feedback",
        description="Drive MiniWorld scenes of a split with the current policy, executing the scripted expert's "
        "command instead with probability --beta per step; the expert labels every visited step and the labels "
        "are stored as operator corrections, where a fleet's go.",
        epilog=COLLECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collect.add_argument("--model", metavar="MODEL_URI", help="models:/NAME@alias, models:/NAME/V or a model folder")
    collect.add_argument("--data", type=Path, metavar="DIR", help="dataset folder whose split spec gives the scenes")
    collect.add_argument("--episodes", type=int, required=True, metavar="N", help="episodes (scenes) to drive")
    collect.add_argument(
        "--beta", type=float, default=0.5, metavar="B", help="per-step probability the expert's command runs (0.5)"
    )
    collect.add_argument("--split", default="train", help="split whose scenes are driven (default train)")
    collect.add_argument("--seed", type=int, default=0, metavar="S", help="picks the scenes and the beta draws")
    where = collect.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", metavar="URL", help="drive the served model over /v1/act, report to /v1/feedback")
    where.add_argument(
        "--in-process", action="store_true", help="load --model in the Ray tasks and write the feedback store"
    )
    collect.add_argument("--token-file", type=Path, metavar="F", help="API token file for --endpoint (first line)")
    collect.add_argument(
        "--feedback-dir",
        type=Path,
        metavar="DIR",
        help="--in-process: feedback store (default $MOBILE_VLA_HOME/feedback)",
    )
    collect.add_argument("--episodes-per-task", type=int, default=8, help="episodes per Ray task (batched per step)")
    collect.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the scene's)")
    collect.add_argument(
        "--backend", action="append", dest="backends", metavar="NAME", help="--in-process backend chain"
    )
    collect.add_argument("--no-progress", action="store_true")
    collect.set_defaults(func=run_collect)


def run_collect(args) -> int:
    """`mobile-vla collect`: one DAgger round; prints the summary."""
    from mobile_vla.evaluate.commands import read_token
    from mobile_vla.online.collect import collect

    if args.token_file is not None and not args.endpoint:
        raise ConfigError("--token-file is for --endpoint")
    report = collect(
        args.model,
        args.episodes,
        beta=args.beta,
        split=args.split,
        data=args.data,
        endpoint=args.endpoint,
        token=read_token(args.token_file) if args.endpoint else None,
        feedback_dir=args.feedback_dir,
        seed=args.seed,
        prefer=tuple(args.backends or ()),
        episodes_per_task=args.episodes_per_task,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0


def _add_inspect_section() -> None:
    """`mobile-vla data inspect` on an assembled feedback dataset also shows the feedback it holds."""
    try:
        from mobile_vla.data.commands import INSPECT_SECTIONS, register_inspect_section
    except ModuleNotFoundError:
        return
    if print_feedback_section not in INSPECT_SECTIONS:
        register_inspect_section(print_feedback_section)


def print_feedback_section(folder: Path, manifest: dict, console) -> None:
    """`data inspect` on a feedback dataset: its corrections and weights, and the store it came from."""
    from mobile_vla.online.inspect_feedback import describe_feedback, describe_feedback_dataset

    generator = manifest.get("generator", {})
    if generator.get("kind") != "feedback":
        return
    data = describe_feedback_dataset(folder, manifest)
    console.print(
        f"[bold]feedback[/]: {data['episodes']} episodes from {data['robots']} robots, {data['steps']} steps, "
        f"{data['corrected_steps']} corrected, {data['intervention_steps']} interventions, "
        f"{data['zero_weight_steps']} steps with weight 0, {data['successes']} successes"
    )
    root = generator.get("root")
    if root and Path(root, "segments").is_dir():
        try:
            wal = describe_feedback(root)
        except DataError as exc:
            console.print(f"  store {root}: {exc}")
            return
        console.print(
            f"  store {root}: {wal['records']} records in {wal['segments']} segments, {wal['episodes']} episodes, "
            f"{wal['new_episodes_since_last_update']} new since the last update, "
            f"{len(wal['torn_or_corrupt'])} torn tails"
        )


def split_gate_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`--gate FILE a=1 b=2` -> (FILE, ['a=1', 'b=2']); at most one file."""
    files = [item for item in items if "=" not in item]
    if len(files) > 1:
        raise ConfigError(f"--gate: at most one gate file, got {files}")
    if files and not Path(files[0]).is_file():
        raise ConfigError(f"--gate: {files[0]}: gate file not found")
    return (files[0] if files else None), [item for item in items if "=" in item]


def print_decision(decision) -> None:
    """The gate's checks as a table, then the decision and its reason."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{decision.name} v{decision.version} vs champion v{decision.compared_to or '-'}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in decision.checks:
        table.add_row(check.name, "[green]pass[/]" if check.passed else "[red]fail[/]", check.detail)
    console = Console()
    console.print(table)
    console.print(f"{decision.decision}: {decision.reason}")


def run_promote(args) -> int:
    """`mobile-vla promote`: exit 0 when promoted, 1 when the gate rejected the version."""
    from mobile_vla.tracking.lifecycle import load_gate, promote

    gate_file, overrides = split_gate_args(args.gate)
    gate = load_gate(gate_file, overrides)
    decision = promote(
        args.model,
        version=args.version,
        from_alias=args.from_alias,
        gate=gate,
        force=args.force,
        actor="cli promote",
        note=args.reason,
    )
    print_decision(decision)
    return 0 if decision.promoted else 1


def run_online_update_command(args) -> int:
    """`mobile-vla online-update`: exit 0 when promoted or nothing new, 1 when the challenger was rejected."""
    from mobile_vla.online.update import load_update_config, run_online_update

    cfg = load_update_config(args.config, args.overrides)
    report = run_online_update(cfg)
    print(report.summary())
    return 1 if report.status == "rejected" else 0
