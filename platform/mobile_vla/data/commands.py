"""`mobile-vla data ...`: generate (MiniWorld, sim/generate.py), import/export (collector, LeRobot), inspect, merge.

    mobile-vla data generate --out data/nav --episodes 200 --seed 0
    mobile-vla data generate --out data/nav_dart --episodes 200 --action-noise 0.2     # DART noise
    mobile-vla data generate --out data/nav --split-spec my_splits.yaml splits.val.fraction=0.2 ...
    mobile-vla data generate --show-split-spec > my_splits.yaml      # the defaults, to edit
    mobile-vla data import --format minuum-h5 ~/robot_logs data/robot
    mobile-vla data import --format lerobot ~/lerobot/my_set data/from_lerobot      # LeRobotDataset v3
    mobile-vla data export --format lerobot data/nav exports/nav_lerobot
    mobile-vla data inspect data/robot [--check] [--json]
    mobile-vla data merge --out data/agg data/nav --train-only ~/.mobile_vla/online_updates/<time>/feedback

`inspect` prints a list of sections; other stages add theirs (feedback data, say) with
`register_inspect_section(fn)` where fn(folder, manifest, console) prints one section.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from mobile_vla.errors import DataError
from mobile_vla.sim.split_spec import load_split_spec, split_spec_yaml

# The stage modules (numpy, h5py, Ray, MiniWorld) and rich are imported inside the run_* functions: the CLI
# imports this module to build its parser, and `mobile-vla --help` must stay fast.

INSPECT_SECTIONS: list[Callable] = []
# Manifest keys the built-in sections show; any other top-level section (feedback data, ...) is
# printed as JSON by `_print_other_sections`, so new data kinds show up without code here.
KNOWN_KEYS = {
    "format",
    "manifest_version",
    "created",
    "splits",
    "counts",
    "stats",
    "state_dim",
    "control_hz",
    "image_sizes",
    "frame_keys",
    "episodes",
    "generator",
    "expert_success",
}


def register_inspect_section(section: Callable) -> Callable:
    """Adds fn(folder: Path, manifest: dict, console) to `data inspect` (usable as a decorator)."""
    INSPECT_SECTIONS.append(section)
    return section


def register(subparsers) -> None:
    """Adds `data generate`, `data import`, `data export`, `data inspect` and `data merge` to the CLI."""
    data = subparsers.add_parser("data", help="generate, import and inspect episode datasets")
    data_subparsers = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    inspect = data_subparsers.add_parser("inspect", help="counts, splits and statistics of a dataset folder")
    inspect.add_argument("folder", type=Path, metavar="DIR")
    inspect.add_argument("--check", action="store_true", help="also read and validate every episode file")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=run_inspect)

    importer = data_subparsers.add_parser(
        "import", help="import the original collector's episodes or a LeRobotDataset v3 into a dataset folder"
    )
    importer.add_argument(
        "--format",
        default="minuum-h5",
        choices=["minuum-h5", "lerobot"],
        help="source format: the original collector's HDF5 files (default) or a LeRobotDataset v3 folder",
    )
    importer.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="minuum-h5: folder (searched recursively) or one .h5 file; "
        "lerobot: the dataset root (with meta/info.json)",
    )
    importer.add_argument("dst", type=Path, metavar="DST", help="new dataset folder")
    importer.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of episodes in split 'val' (lerobot: only when the set names no splits of its own)",
    )
    importer.add_argument("--camera", default=None, metavar="KEY", help="lerobot: the image feature to import")
    importer.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    importer.add_argument(
        "--control-hz",
        type=float,
        default=None,
        help="control rate (default: median num_frames/total_duration of the files)",
    )
    importer.add_argument(
        "--resize-rule",
        choices=["letterbox", "center_crop"],
        default="letterbox",
        help="how frames that are not 224x224 become 224x224 (both formats)",
    )
    importer.add_argument(
        "--default-instruction",
        default=None,
        help="instruction for files with no index entry and no scenario in the name",
    )
    importer.set_defaults(func=run_import)
    importer.epilog = "Exit status 1 when some files were skipped (each is named), 2 when nothing was imported."

    exporter = data_subparsers.add_parser(
        "export",
        help="write a dataset folder in another format (LeRobotDataset v3)",
        description="Writes every episode of a dataset folder as a LeRobotDataset v3 folder (meta/, data/; frames "
        "as PNG image features); `data import --format lerobot` reads it back unchanged.",
    )
    exporter.add_argument("--format", required=True, choices=["lerobot"], help="target format")
    exporter.add_argument("src", type=Path, metavar="SRC", help="dataset folder (with manifest.json)")
    exporter.add_argument("dst", type=Path, metavar="DST", help="new or empty folder")
    exporter.set_defaults(func=run_export)

    _register_generate(data_subparsers)
    _register_merge(data_subparsers)


def _register_merge(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "merge",
        help="one dataset folder with the episodes of several (aggregated DAgger)",
        description="Links (or copies) every episode of every SRC into a new dataset folder; each keeps its "
        "split, except those of --train-only sources, which all go to train.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="new or empty dataset folder")
    parser.add_argument("sources", type=Path, nargs="+", metavar="SRC", help="dataset folders (with manifest.json)")
    parser.add_argument(
        "--train-only",
        type=Path,
        action="append",  # one folder per flag: `--train-only A B` must not swallow the plain source B
        default=[],
        metavar="SRC",
        help="a source whose episodes all go to train, e.g. a feedback dataset of online-update (added to the "
        "SRC list when not in it; repeatable)",
    )
    parser.add_argument("--copy", action="store_true", help="copy the episode files (default: absolute symlinks)")
    parser.set_defaults(func=run_merge)


def _register_generate(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "generate",
        help="MiniWorld scenes + scripted expert -> episode files and manifest.json",
        description="MiniWorld episodes driven by the scripted expert, as Ray tasks.",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="new or empty dataset folder")
    parser.add_argument("--episodes", type=int, default=200, help="successful episodes over all splits")
    parser.add_argument("--split-spec", type=Path, default=None, help="YAML split spec (default: built in)")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="deprecated: write KEY=VALUE after the flags instead",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the split spec, as for `mobile-vla train`, e.g. splits.val.fraction=0.2",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same episodes")
    parser.add_argument("--control-hz", type=float, default=5.0, help="control rate of the recorded commands")
    parser.add_argument("--seeds-per-task", type=int, default=4, help="episodes per Ray task")
    parser.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        metavar="F",
        help="DART: Gaussian noise on the EXECUTED command, std = F x each axis' speed limit (0 <= F <= 1); "
        "the stored action stays the clean expert command (default 0: none)",
    )
    parser.add_argument("--show-split-spec", action="store_true", help="print the resolved split spec as YAML and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_generate)


def run_generate(args) -> int:
    """`data generate`: validates the options, generates, prints each split's expert success."""
    from mobile_vla.sim.generate import GeneratorConfig, generate_dataset

    if args.set_overrides:
        print("warning: --set is deprecated: write the override as a plain KEY=VALUE after the flags", file=sys.stderr)
    spec = load_split_spec(args.split_spec, [*args.set_overrides, *args.overrides])
    if args.show_split_spec:
        print(split_spec_yaml(spec), end="")
        return 0
    if args.out is None:
        raise DataError("--out DIR is required (a new or empty folder)")
    if not (args.control_hz > 0 and math.isfinite(args.control_hz)):
        raise DataError(f"--control-hz {args.control_hz}: expected a positive number")
    if args.seeds_per_task < 1:
        raise DataError(f"--seeds-per-task {args.seeds_per_task}: expected at least 1")
    if not (0.0 <= args.action_noise <= 1.0):  # also refuses nan
        raise DataError(f"--action-noise {args.action_noise}: expected a number in [0, 1]")
    settings = GeneratorConfig(
        control_hz=args.control_hz, seeds_per_task=args.seeds_per_task, action_noise=args.action_noise
    )
    manifest = generate_dataset(args.out, args.episodes, spec, args.seed, settings, progress=not args.no_progress)
    for name, rate in manifest["expert_success"].items():
        print(
            f"{name:>18}: {rate['kept']:4d} episodes, expert success {rate['kept']}/{rate['attempted']}"
            f" = {rate['success_rate']:.0%}"
        )
    total = manifest["counts"]["total"]
    print(f"wrote {total['episodes']} episodes, {total['frames']} frames, to {args.out}")
    return 0


def summarise(folder: Path, manifest: dict) -> dict:
    """What `data inspect --json` prints: per-split counts and success, stats, generator, other sections."""
    episodes = manifest["episodes"]
    splits = {}
    for split, names in manifest["splits"].items():
        successes = [episodes[n].get("success") for n in names if n in episodes]
        splits[split] = {
            **manifest["counts"][split],
            "success_rate": (sum(bool(s) for s in successes) / len(successes)) if successes else None,
            "instructions": len({episodes[n]["instruction"] for n in names if n in episodes}),
            "expert_success": manifest.get("expert_success", {}).get(split),
        }
    return {
        "folder": str(folder),
        "splits": splits,
        "total": manifest["counts"].get("total"),
        "control_hz": manifest["control_hz"],
        "state_dim": manifest["state_dim"],
        "image_sizes": manifest.get("image_sizes"),
        "frame_keys": manifest.get("frame_keys", []),
        "stats": manifest["stats"],
        "generator": manifest.get("generator", {}),
        "other_sections": {k: v for k, v in manifest.items() if k not in KNOWN_KEYS},
    }


def _print_overview(folder: Path, manifest: dict, console) -> None:
    from rich.table import Table

    summary = summarise(folder, manifest)
    table = Table(
        title=f"{folder}  ({summary['control_hz']} Hz, S = {summary['state_dim']}, frames {summary['image_sizes']})"
    )
    for column in ("split", "episodes", "frames", "instructions", "success", "expert success"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, row in summary["splits"].items():
        rate = "-" if row["success_rate"] is None else f"{row['success_rate']:.0%}"
        expert = _format_expert(row["expert_success"])
        table.add_row(split, str(row["episodes"]), str(row["frames"]), str(row["instructions"]), rate, expert)
    console.print(table)


def _format_expert(expert) -> str:
    if expert is None:
        return "-"
    if isinstance(expert, (int, float)):
        return f"{expert:.0%}"
    if isinstance(expert, dict) and {"kept", "attempted", "success_rate"} <= set(expert):
        return f"{expert['kept']}/{expert['attempted']} = {expert['success_rate']:.0%}"
    return json.dumps(expert, default=str)


def _print_stats(folder: Path, manifest: dict, console) -> None:
    from rich.table import Table

    from mobile_vla.data.manifest import STAT_KEYS

    names = {"actions": ["linear_x", "linear_y", "angular_z"]}
    for key in ("actions", "state"):
        stats = manifest["stats"].get(key)
        if not stats:
            continue
        axes = names.get(key) or [f"{key}[{i}]" for i in range(len(stats["mean"]))]
        table = Table(title=f"{key} statistics (split {', '.join(manifest['stats'].get('computed_on', ['train']))})")
        table.add_column("axis")
        for stat in STAT_KEYS:
            table.add_column(stat, justify="right")
        for i, axis in enumerate(axes):
            table.add_row(axis, *(f"{stats[stat][i]:+.3f}" for stat in STAT_KEYS))
        console.print(table)


def _print_generator(folder: Path, manifest: dict, console) -> None:
    generator = manifest.get("generator") or {}
    if generator:
        console.print("generator: " + json.dumps(generator, sort_keys=True, default=str)[:2000], soft_wrap=True)


def _print_other_sections(folder: Path, manifest: dict, console) -> None:
    for key, value in manifest.items():
        if key not in KNOWN_KEYS:
            console.print(f"{key}: " + json.dumps(value, sort_keys=True, default=str)[:2000], soft_wrap=True)


register_inspect_section(_print_overview)
register_inspect_section(_print_stats)
register_inspect_section(_print_generator)
register_inspect_section(_print_other_sections)


def check_episodes(folder: Path, manifest: dict, progress: bool = True) -> list[tuple[str, str]]:
    """Reads every listed episode in full; returns (file, problem) for each bad one."""
    from rich.progress import track

    from mobile_vla.data.episodes import read_episode

    problems = []
    names = [n for split in manifest["splits"].values() for n in split]
    for name in track(names, description="checking episodes", transient=True, disable=not progress):
        try:
            episode = read_episode(folder / name)
            expected = manifest["episodes"].get(name, {}).get("frames")
            if expected is not None and expected != episode.num_frames:
                problems.append((name, f"{episode.num_frames} frames, manifest says {expected}"))
        except DataError as exc:
            problems.append((name, str(exc)))
    return problems


def run_inspect(args) -> int:
    """`data inspect`: the manifest's sections (or a raw feedback root); exit 1 when --check finds bad files."""
    from rich.console import Console

    from mobile_vla.data.manifest import load_manifest

    if (args.folder / "segments").is_dir():  # a raw feedback root (serving's write-ahead log), not episodes
        from mobile_vla.online.feedback_store import describe_feedback

        summary = describe_feedback(args.folder)
        print(
            json.dumps(summary, indent=2, default=str)
            if args.json
            else "\n".join(f"{key:32s} {value}" for key, value in summary.items())
        )
        return 0
    manifest = load_manifest(args.folder)
    problems = check_episodes(args.folder, manifest, progress=not args.json) if args.check else None
    if args.json:
        summary = summarise(args.folder, manifest)
        if problems is not None:
            summary["problems"] = [{"file": f, "problem": p} for f, p in problems]
        print(json.dumps(summary, indent=2, default=str))
    else:
        console = Console()
        for section in INSPECT_SECTIONS:
            section(args.folder, manifest, console)
        if problems is not None:
            checked = manifest["counts"]["total"]["episodes"]
            print(f"checked {checked} episode files: {len(problems)} bad")
            for name, problem in problems:  # plain lines: one per file, easy to grep
                print(f"  bad {problem if name in problem else f'{name}: {problem}'}")
    return 1 if problems else 0


def run_import(args) -> int:
    """`data import`: converts the collector's files (exit 1 when some were skipped) or a LeRobot set."""
    from mobile_vla.data.importer import import_minuum_h5

    if args.format == "lerobot":
        return _run_import_lerobot(args)
    if args.camera is not None:
        raise DataError("--camera: only for --format lerobot")

    report = import_minuum_h5(
        args.src,
        args.dst,
        val_fraction=args.val_fraction,
        seed=args.seed,
        control_hz=args.control_hz,
        resize_rule=args.resize_rule,
        default_instruction=args.default_instruction,
    )
    for _name, reason in report.skipped:
        print(f"skipped {reason}")
    counts = report.manifest["counts"]
    split_text = ", ".join(f"{s} {c['episodes']}" for s, c in counts.items() if s != "total")
    print(
        f"imported {len(report.imported)} episodes ({report.frames} frames, {report.control_hz} Hz) into "
        f"{args.dst}; skipped {len(report.skipped)}; splits: {split_text}"
    )
    return 1 if report.skipped else 0


def _run_import_lerobot(args) -> int:
    from mobile_vla.data.lerobot import import_lerobot

    if args.control_hz is not None or args.default_instruction is not None:
        raise DataError(
            "--control-hz and --default-instruction: only for --format minuum-h5 (LeRobot sets carry fps and tasks)"
        )
    report = import_lerobot(
        args.src,
        args.dst,
        camera=args.camera,
        resize_rule=args.resize_rule,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    if report.resized_from:
        sizes = ", ".join(report.resized_from)
        print(f"resized frames of {sizes} to 224x224 ({args.resize_rule})")
    counts = report.manifest["counts"]
    split_text = ", ".join(f"{s} {c['episodes']}" for s, c in counts.items() if s != "total")
    print(
        f"imported {len(report.imported)} episodes ({report.frames} frames, camera {report.camera}, state "
        f"{report.state}) into {args.dst}; splits: {split_text}"
    )
    return 0


def run_export(args) -> int:
    """`data export --format lerobot`: writes the LeRobotDataset v3 folder, prints what it holds."""
    from mobile_vla.data.lerobot import export_lerobot

    report = export_lerobot(args.src, args.dst)
    for dropped in report.dropped:
        print(f"warning: not exported (only some episodes have it): {dropped}", file=sys.stderr)
    print(
        f"exported {report.episodes} episodes ({report.frames} frames) to {args.dst} as LeRobotDataset v3.0 "
        f"({len(report.data_files)} data files, frames as PNG image features)"
    )
    return 0


def run_merge(args) -> int:
    """`data merge`: writes the merged folder, prints each split's episodes and frames."""
    from rich.console import Console

    from mobile_vla.data.merge import merge_datasets

    manifest = merge_datasets(args.out, args.sources, train_only=args.train_only, copy=args.copy, progress=True)
    console = Console()
    for split, count in manifest["counts"].items():
        if split != "total":
            console.print(f"{split:>18}: {count['episodes']:4d} episodes, {count['frames']} frames")
    total = manifest["counts"]["total"]
    how = "copied" if args.copy else "linked"
    sources = len(manifest["generator"]["sources"])
    console.print(
        f"wrote {total['episodes']} episodes ({how}), {total['frames']} frames, from {sources} sources to {args.out}",
        soft_wrap=True,
    )
    return 0
