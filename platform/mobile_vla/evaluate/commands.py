r"""`mobile-vla evaluate`: offline metrics on dataset splits and closed-loop MiniWorld runs.

    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --split val
    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --closed-loop \
        --episodes 200 --split unseen_layout --split unseen_pair --split unseen_paraphrase
    mobile-vla evaluate --model expert --data data/nav --closed-loop --episodes 200 --split unseen_pair
    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --closed-loop \
        --no-offline --episodes 200 --precision int8 --no-log    # the int8 graph (export --int8)
    mobile-vla evaluate --model models:/mobile-vla-policy@champion --closed-loop --episodes 50 \
        --endpoint http://127.0.0.1:8000 --token-file .mobile_vla/serve/tokens
    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --state-ablation \
        --no-offline      # k=0 error with the state input recorded, zeroed, shuffled: a copycat?
    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --closed-loop \
        --no-offline --split unseen_layout --with-val --memory-reset-every window   # issue 15 diagnostics
    mobile-vla evaluate --model models:/mobile-vla-policy@champion --data data/nav --closed-loop \
        --no-offline --split visual_shift --safety-ladder --no-log   # without and with the safe-stop ladder
    mobile-vla evaluate --model models:/mobile-vla-policy@challenger --data data/nav --closed-loop \
        --no-offline --split unseen_layout --chunk-ensemble 0.5 --no-log   # temporal chunk ensembling

Results go to `--out` (default $MOBILE_VLA_HOME/evaluations/...) and, for a registered model
version, onto the version: metrics as `metric.offline.<split>.mae`, `metric.closed_loop.<split>.
success_rate`, ... tags, files under `evaluation/<split>/` of its run. The first `--split` is the
primary one: its results are also written as `offline.mae`, `closed_loop.success_rate`, ... which
the promotion gate reads. The scripted expert always runs on the same scene seeds, side by side.
`--with-val` adds closed loop on the val split's (in-distribution) seeds after the given splits and
writes closed_loop_splits.json (in-distribution vs held-out success and their gap);
`--memory-reset-every N|window` resets the policy's memory every N steps (window: its training W).
`--safety-ladder` drives the same seeds a second time with the serving safety ladder applied to each
executed step (serve/safety.py; thresholds calibrated with the version): success, collisions,
handovers and the share of steps slowed/stopped, next to the plain run (issue 18).
`--chunk-ensemble M` executes the weighted mean of what the last K chunks planned for each step (weight
exp(-M * age); ACT's temporal ensembling, issue 15) instead of the newest chunk's first action. Serving
answers one chunk per request, so such results describe another execution: they need --no-log.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mobile_vla.errors import ConfigError
from mobile_vla.evaluate import EXPERT

# The evaluation modules (Ray, MLflow, torch) and rich are imported inside run_evaluate: the CLI
# imports this module to build its parser, and `mobile-vla --help` must stay fast.


def register(subparsers) -> None:
    """Adds `mobile-vla evaluate` to the CLI."""
    parser = subparsers.add_parser(
        "evaluate",
        help="offline metrics on a dataset split and closed-loop success in MiniWorld",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", metavar="MODEL_URI", help="models:/NAME@alias, models:/NAME/V, a model folder, or 'expert'"
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="dataset folder: offline metrics on its splits; its split spec for closed loop",
    )
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        metavar="NAME",
        help="split to evaluate (repeatable; the first is primary; default val)",
    )
    parser.add_argument("--closed-loop", action="store_true", help="also run the policy in MiniWorld")
    parser.add_argument("--no-offline", action="store_true", help="skip offline metrics even with --data")
    parser.add_argument(
        "--state-ablation",
        action="store_true",
        help="with --data: the now (k=0) error on each split's windows with the state input recorded, zeroed "
        "and shuffled across windows (does the policy copy its previous command?)",
    )
    parser.add_argument(
        "--with-val",
        action="store_true",
        help="closed loop also on the val split's seeds (in-distribution: training layouts, pairs, templates), "
        "after the given splits, never primary",
    )
    parser.add_argument(
        "--memory-reset-every",
        metavar="N|window",
        default=None,
        help="closed loop: reset the policy's LSTM memory to zero every N steps ('window': the model's "
        "training window W) to measure memory skew",
    )
    parser.add_argument(
        "--safety-ladder",
        action="store_true",
        help="closed loop: also drive the same seeds with the serving safety ladder applied (slow scales, stop "
        "waits, handover ends the episode) and compare",
    )
    parser.add_argument(
        "--chunk-ensemble",
        type=float,
        metavar="M",
        default=None,
        help="closed loop: execute the temporal ensemble of the overlapping chunks, the chunk planned a steps "
        "ago weighted exp(-M * a) (0: equal weights); needs --no-log",
    )
    parser.add_argument("--episodes", type=int, default=200, help="closed-loop episodes (scene seeds) per split")
    parser.add_argument("--seed-offset", type=int, default=0, help="start this far into each split's seed range")
    parser.add_argument(
        "--episodes-per-task", type=int, default=8, help="episodes per Ray task, batched into one predict call per step"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the scene's)")
    parser.add_argument(
        "--split-spec",
        type=Path,
        default=None,
        help="YAML split spec for closed loop (default: the one recorded in --data, else built in)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        dest="backends",
        metavar="NAME",
        help="backend chain, e.g. --backend onnx-cpu --backend torch (default: onnx-cpu if exported, else torch)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="the exported step graph to run (fp16/int8: ONNX Runtime's model.<precision>.onnx, from "
        "mobile-vla export --fp16/--int8; needs --no-log: the version's metrics are its fp32 model's)",
    )
    parser.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs per closed-loop Ray task")
    parser.add_argument("--endpoint", metavar="URL", help="closed loop through the HTTP API at URL instead")
    parser.add_argument("--token-file", type=Path, metavar="F", help="API token file for --endpoint (first line)")
    parser.add_argument("--gifs", type=int, default=4, help="episode GIFs to write per split")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where results are written")
    parser.add_argument("--no-log", action="store_true", help="do not write results onto the model version")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_evaluate)


def _check_args(args) -> None:
    if not args.model and not args.endpoint:
        raise ConfigError("--model MODEL_URI is required (or --endpoint URL for the served model)")
    if args.endpoint and not args.closed_loop:
        raise ConfigError("--endpoint is for closed-loop evaluation: add --closed-loop")
    if args.precision != "fp32" and (args.endpoint or args.model == EXPERT):
        raise ConfigError(f"--precision {args.precision} picks a model's exported graph: give --model MODEL_URI")
    if args.precision != "fp32" and not args.no_log:
        raise ConfigError(
            f"--precision {args.precision}: add --no-log (the version's metrics, which the promotion gate reads, "
            "are its fp32 model's)"
        )
    if args.endpoint and args.model == EXPERT:
        raise ConfigError("--endpoint and --model expert exclude each other")
    _check_diagnostic_args(args)
    if args.state_ablation:
        if args.data is None:
            raise ConfigError("--state-ablation needs --data DIR (the windows it scores)")
        if args.endpoint or args.model == EXPERT:
            raise ConfigError("--state-ablation scores a model's own state input: give --model MODEL_URI")
    offline = args.data is not None and not args.no_offline and args.model != EXPERT
    if not offline and not args.closed_loop and not args.state_ablation:
        if args.model == EXPERT:
            raise ConfigError("--model expert has no offline metrics: add --closed-loop")
        raise ConfigError("nothing to evaluate: give --data DIR (offline metrics) and/or --closed-loop")
    for name in ("episodes", "episodes_per_task"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: expected at least 1")
    if not (args.gpus_per_task >= 0 and math.isfinite(args.gpus_per_task)):
        raise ConfigError(f"--gpus-per-task {args.gpus_per_task}: expected a number >= 0")


def _check_diagnostic_args(args) -> None:
    """--with-val and --memory-reset-every are closed-loop options; the expert has no memory to reset."""
    for flag, value in (("--with-val", args.with_val), ("--memory-reset-every", args.memory_reset_every)):
        if value and not args.closed_loop:
            raise ConfigError(f"{flag} is for closed-loop evaluation: add --closed-loop")
    if args.memory_reset_every is not None and args.model == EXPERT:
        raise ConfigError("--memory-reset-every resets a model's memory: the expert has none")
    if args.chunk_ensemble is not None:
        if not args.closed_loop:
            raise ConfigError("--chunk-ensemble is for closed-loop evaluation: add --closed-loop")
        if args.endpoint or args.model == EXPERT:
            raise ConfigError("--chunk-ensemble blends a model's own chunks in-process: give --model MODEL_URI")
        from mobile_vla.evaluate.rollout import check_chunk_decay  # the config's own check, before any work

        check_chunk_decay(args.chunk_ensemble)
        if not args.no_log:
            raise ConfigError(
                "--chunk-ensemble measures an execution serving does not do (one chunk per request): add --no-log "
                "so the version's closed-loop metrics, which the promotion gate reads, stay the served policy's"
            )
    if args.safety_ladder and not args.closed_loop:
        raise ConfigError("--safety-ladder is for closed-loop evaluation: add --closed-loop")
    if args.safety_ladder and (args.endpoint or args.model == EXPERT):
        raise ConfigError(
            "--safety-ladder judges a model's own confidence and novelty in-process: give --model MODEL_URI "
            "(a server at --endpoint applies its own ladder)"
        )


def read_token(path: Path | None) -> str:
    """The first word of the first non-empty line of --token-file (a tokens file line may go on with
    robots=/scopes=); ConfigError when there is none.
    """
    if path is None:
        raise ConfigError("--endpoint needs --token-file F (a file whose first line is an API token)")
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if not lines:
        raise ConfigError(f"--token-file {path}: empty")
    return lines[0].split()[0]


def run_evaluate(args) -> int:
    """`mobile-vla evaluate`: offline and/or closed-loop per split, saved, logged and printed."""
    from mobile_vla.evaluate.closed_loop import (
        IN_DISTRIBUTION_SPLIT,
        MEMORY_RESET_WINDOW,
        default_out_dir,
        evaluate_closed_loop,
        log_closed_loop,
        memory_reset_steps,
        save_closed_loop,
        save_split_comparison,
        scene_seeds,
        split_spec_for,
    )
    from mobile_vla.evaluate.offline import log_offline, offline_report, save_offline

    _check_args(args)

    splits = list(dict.fromkeys(args.splits or ["val"]))
    closed_loop_splits = list(dict.fromkeys(splits + ([IN_DISTRIBUTION_SPLIT] if args.with_val else [])))
    token = read_token(args.token_file) if args.endpoint else None
    spec = split_spec_for(args.data, args.split_spec) if args.closed_loop else None
    if spec is not None:  # fail on a bad split, seed range or reset interval before any work starts
        for split in closed_loop_splits:
            scene_seeds(spec, split, args.episodes, args.seed_offset)
        if args.memory_reset_every not in (None, MEMORY_RESET_WINDOW):
            memory_reset_steps(args.memory_reset_every, None)
    out_dir = args.out or default_out_dir(str(args.model or args.endpoint).removeprefix("models:/"))
    prefer = tuple(args.backends or ())
    progress = not args.no_progress
    results: dict[str, dict] = {}

    if args.data is not None and not args.no_offline and args.model != EXPERT:
        for index, split in enumerate(splits):
            report = offline_report(
                args.model, args.data, split, prefer=prefer, precision=args.precision, progress=progress
            )
            files = save_offline(report, out_dir)
            if not args.no_log:
                log_offline(report, files, primary=index == 0)
            results.setdefault(split, {})["offline"] = report
    if args.state_ablation:
        _run_state_ablation(args, splits, out_dir, results)
    if args.closed_loop:
        for index, split in enumerate(closed_loop_splits):
            report = evaluate_closed_loop(
                args.model if args.model else None,
                split,
                args.episodes,
                args.seed_offset,
                spec=spec,
                endpoint=args.endpoint,
                token=token,
                prefer=prefer,
                precision=args.precision,
                episodes_per_task=args.episodes_per_task,
                max_steps=args.max_steps,
                record_frames=args.gifs,
                num_gpus=args.gpus_per_task,
                memory_reset_every=args.memory_reset_every,
                safety_ladder=args.safety_ladder or None,
                chunk_ensemble=args.chunk_ensemble,
                progress=progress,
            )
            files = save_closed_loop(report, out_dir, gifs=args.gifs)
            if not args.no_log:
                log_closed_loop(report, files, primary=index == 0)
            results.setdefault(split, {})["closed_loop"] = report
        reports = [results[split]["closed_loop"] for split in closed_loop_splits]
        if len(reports) > 1:
            save_split_comparison(reports, out_dir)
    _print_summary(results, out_dir)
    return 0


def _run_state_ablation(args, splits: list[str], out_dir: Path, results: dict[str, dict]) -> None:
    """`--state-ablation`: per split, the three rows saved as JSON and put on the model version."""
    from mobile_vla.evaluate.closed_loop import log_to_version
    from mobile_vla.evaluate.diagnostics import ablation_metrics, save_state_ablation, state_ablation
    from mobile_vla.tracking import resolve_model

    resolved = resolve_model(args.model)
    for split in splits:
        rows = state_ablation(args.model, args.data, split)
        path = save_state_ablation(rows, out_dir, split, str(args.model), str(args.data))
        if not args.no_log and resolved.name and resolved.version:
            log_to_version(
                resolved.name, resolved.version, resolved.run_id, ablation_metrics(split, rows), [path], split
            )
        results.setdefault(split, {})["state_ablation"] = rows


def _print_summary(results: dict[str, dict], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    reports = [parts["closed_loop"] for parts in results.values() if "closed_loop" in parts]
    if len(reports) > 1:
        console.print(_split_comparison_table(reports))
    for split, parts in results.items():
        table = Table(title=f"split {split}", title_justify="left")
        if "closed_loop" in parts:
            report = parts["closed_loop"]
            table.add_column("closed loop")
            table.add_column("policy", justify="right")
            table.add_column("expert (same seeds)", justify="right")
            p, e = report.policy, report.expert
            table.add_row("episodes", str(p.episodes), str(e.episodes))
            table.add_row("success [Wilson 95%]", _rate(p), _rate(e))
            table.add_row("wrong target", _pct(p.wrong_target_rate), _pct(e.wrong_target_rate))
            table.add_row("SPL vs expert", _num(p.spl), _num(e.spl))
            table.add_row("collisions / episode", _num(p.collisions_per_episode), _num(e.collisions_per_episode))
            table.add_row("episodes with a collision", _pct(p.collision_rate), _pct(e.collision_rate))
            table.add_row("confidence: successes", _num(p.confidence_success), "-")
            table.add_row("confidence: failures", _num(p.confidence_failure), "-")
            table.add_row("confidence: failure AUROC", _num(p.failure_auroc), "-")
            console.print(table)
            console.print(_collision_table(report))
            if report.safety_ladder is not None:
                console.print(_safety_ladder_table(report))
        if "offline" in parts:
            metrics = parts["offline"].metrics
            offline = Table(
                title=f"offline {split} ({int(metrics['episodes'])} episodes, {int(metrics['frames'])} "
                "frames; executed command vs recorded, m/s and rad/s)",
                title_justify="left",
            )
            offline.add_column("axis")
            for name in ("MAE", "RMSE", "R²"):
                offline.add_column(name, justify="right")
            for axis in ("linear_x", "linear_y", "angular_z", ""):
                suffix = f"_{axis}" if axis else ""
                offline.add_row(
                    axis or "overall",
                    _num(metrics[f"mae{suffix}"]),
                    _num(metrics[f"rmse{suffix}"]),
                    _num(metrics[f"r2{suffix}"]),
                )
            console.print(offline)
        if "state_ablation" in parts:
            console.print(_state_ablation_table(split, parts["state_ablation"]))
    console.print(f"results: {out_dir}")


def _split_comparison_table(reports):
    """Closed loop per split, in-distribution (val) next to held-out, with the pooled gap."""
    from rich.table import Table

    from mobile_vla.evaluate.closed_loop import split_comparison

    comparison = split_comparison(reports)
    gap = comparison["generalisation_gap"]
    title = "closed loop: in-distribution vs held-out"
    if gap is not None:
        title += f" (gap {gap:+.1%}: val {comparison['in_distribution_success']:.1%}, "
        title += f"held-out {comparison['held_out_success']:.1%})"
    table = Table(title=title, title_justify="left")
    for column in ("split", "kind", "memory reset", "success [Wilson 95%]", "expert", "timeout", "collided"):
        table.add_column(column, justify="left" if column in ("split", "kind") else "right")
    for report in reports:
        p = report.policy
        reset = report.settings.get("memory_reset_every")
        table.add_row(
            report.split,
            "in-distribution" if report.settings.get("in_distribution") else "held-out",
            f"every {reset}" if reset else "-",
            _rate(p),
            _pct(report.expert.success_rate),
            _pct(p.timeout_rate),
            _pct(p.collision_rate),
        )
    return table


def _state_ablation_table(split: str, rows: list[dict]):
    """The state ablation as one table: a row per state variant, MAE of the now (k=0) command."""
    from rich.table import Table

    table = Table(
        title=f"state ablation {split} ({rows[0]['windows']} windows, {rows[0]['frames']} frames; k=0, m/s and rad/s)",
        title_justify="left",
    )
    for column in ("state input", "MAE", "linear_x", "linear_y", "angular_z", "R²", "MAE vs recorded"):
        table.add_column(column, justify="left" if column == "state input" else "right")
    recorded = rows[0]["mae"]
    for row in rows:
        ratio = row["mae"] / recorded if recorded > 0 else math.nan
        table.add_row(
            row["state"],
            _num(row["mae"]),
            _num(row["mae_linear_x"]),
            _num(row["mae_linear_y"]),
            _num(row["mae_angular_z"]),
            _num(row["r2"]),
            "-" if not math.isfinite(ratio) else f"x{ratio:.2f}",
        )
    return table


def _collision_table(report):
    """Episodes per outcome x collision (policy | expert): what the timeouts and collisions have in common."""
    from rich.table import Table

    table = Table(
        title=f"split {report.split}: episodes by outcome x collision (policy | expert)", title_justify="left"
    )
    table.add_column("outcome")
    for column in ("collided", "no collision"):
        table.add_column(column, justify="right")
    p, e = report.policy.collisions_by_outcome, report.expert.collisions_by_outcome
    for outcome in p:
        table.add_row(
            outcome.replace("_", " "),
            f"{p[outcome]['collided']} | {e[outcome]['collided']}",
            f"{p[outcome]['no_collision']} | {e[outcome]['no_collision']}",
        )
    return table


def _safety_ladder_table(report):
    """The policy without and with the safety ladder on the same seeds."""
    from rich.table import Table

    table = Table(title=f"split {report.split}: safety ladder (same seeds)", title_justify="left")
    table.add_column("closed loop")
    table.add_column("no ladder", justify="right")
    table.add_column("ladder", justify="right")
    p, s = report.policy, report.safety_ladder
    table.add_row("success [Wilson 95%]", _rate(p), _rate(s))
    table.add_row("collisions / episode", _num(p.collisions_per_episode), _num(s.collisions_per_episode))
    table.add_row("episodes with a collision", _pct(p.collision_rate), _pct(s.collision_rate))
    table.add_row("timeout", _pct(p.timeout_rate), _pct(s.timeout_rate))
    table.add_row("handover", "-", _pct(s.handover_rate))
    table.add_row("steps slowed", "-", _pct(s.slowed_share))
    table.add_row("steps stopped", "-", _pct(s.stopped_share))
    return table


def _num(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _rate(summary) -> str:
    return f"{summary.success_rate:.1%} [{summary.success_low:.1%}, {summary.success_high:.1%}]"
