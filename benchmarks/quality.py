"""The whole budgeted recipe in one command: data, behaviour cloning, DAgger rounds, closed-loop evaluation.

    make quality                       # defaults: small.yaml, 1,700 scenes, one epoch (best measured), 2 rounds
    .venv/bin/python benchmarks/quality.py --rounds 3 --betas 0.5 0.3 0.1 --collect-episodes 100
    .venv/bin/python benchmarks/quality.py --rounds 0 --train-set loss.first_step_weight=1   # an ablation row
    .venv/bin/python benchmarks/quality.py --preset tiny --episodes 12 --epochs 1 --rounds 1 \
        --collect-episodes 4 --finetune-steps 5 --eval-episodes 4                          # plumbing, minutes

Each stage is the command a user would type, run as a subprocess, in this order:
  data      `mobile-vla data generate` (DART noise, every episode in train/val: closed loop draws the held-out
            scenes from the split spec), skipped when the folder already holds a manifest;
  bc        `mobile-vla train --config CONFIG` registered as @bc, then @bc forced to @champion (promote_bc)
            so that round 1's gate compares with behaviour cloning;
  collect_R `mobile-vla collect --in-process`: the previous model drives train-split scenes, the expert's
            command runs with probability beta (--betas, one per round, the last repeats), every visited
            step is stored as an operator correction in the round's own feedback folder;
  update_R  `mobile-vla online-update`: fine-tunes the previous model on that feedback with replay of the
            dataset, registers @dagger-R and gates it against @champion. Round R+1 starts from @dagger-R
            whatever the gate decided (the report records each decision);
  eval_*    benchmarks/closed_loop.py on the held-out splits (same seeds for every model, with the expert).

CPU per stage, two ways: the whole box's busy time from /proc/stat (an upper bound: everything the machine
did) and the stage's own process tree from getrusage(RUSAGE_CHILDREN); this process makes itself the child
subreaper (Linux) so that Ray's workers, orphaned when their raylet exits, are reaped here and counted.
The budget (--budget-cpu-min) covers the training: bc plus every update stage (an update stage also
assembles the feedback and scores the models: an upper bound on its fine-tune), counted as the larger of
the two measures. Data generation, collection and evaluation are reported, not budgeted.
Everything lives in its own platform home (--home, default ./.mobile_vla/quality): a user's registry is
never touched. Writes benchmarks/results/quality.json (--out), the closed-loop JSON of every model beside
it (quality_closed_loop/), and prints markdown tables at the end. Run it on a quiet box.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow

from ablation_report import ablation_table
from bench_machine import machine
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.sim.split_spec import TRAIN_SPLIT, default_split_spec
from mobile_vla.tracking import configure_mlflow, get_version_by_alias, get_version_metrics, get_version_tags
from mobile_vla.tracking.registry import DEFAULT_MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
VAL_SPLIT = "val"
EVAL_SPLITS = ["unseen_layout", "unseen_pair", "unseen_paraphrase"]
BC_ALIAS = "bc"
BUDGETED_KINDS = ("train", "update")  # the training the budget covers: behaviour cloning + every fine-tune
UPDATE_EXIT_OK = (0, 1)  # online-update: 0 promoted (or nothing new), 1 rejected by the gate
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat "cpu" columns: user nice system (idle iowait) irq softirq steal
STRAGGLER_GRACE_S = 30.0  # how long a stage's leftover processes (Ray shutting down) get to exit


# ------------------------------------------------------------------------------------------ accounting
def busy_cpu_seconds(proc_stat: str, ticks_per_second: int) -> float:
    """Busy CPU seconds of the whole machine (all cores) from the text of /proc/stat."""
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            jiffies = [int(v) for v in line.split()[1:]]
            return sum(jiffies[i] for i in BUSY_FIELDS) / ticks_per_second
    raise ValueError("/proc/stat: no aggregate 'cpu ' line")


def parent_pid(proc_pid_stat: str) -> int:
    """The parent pid from the text of /proc/PID/stat (the command name in parentheses may hold spaces)."""
    return int(proc_pid_stat[proc_pid_stat.rindex(")") + 1 :].split()[1])


@dataclass(frozen=True)
class CpuSample:
    """Wall clock, the machine's busy CPU seconds and the CPU seconds of this process's reaped descendants."""

    wall: float
    box_cpu: float
    tree_cpu: float


def sample_cpu() -> CpuSample:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    box = busy_cpu_seconds(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))
    return CpuSample(time.monotonic(), box, usage.ru_utime + usage.ru_stime)


@dataclass
class Stage:
    """One measured stage: what ran, how long, how much CPU (whole box and the stage's own processes)."""

    name: str
    kind: str  # data | train | register | collect | update | eval
    command: list[str]
    returncode: int
    wall_s: float
    box_cpu_s: float
    tree_cpu_s: float
    stragglers: int = 0  # descendants still running after the grace period (their CPU lands in a later stage)

    @classmethod
    def measured(cls, name: str, kind: str, command: list[str], returncode: int, before: CpuSample, after: CpuSample):
        return cls(
            name,
            kind,
            command,
            returncode,
            wall_s=round(after.wall - before.wall, 1),
            box_cpu_s=round(after.box_cpu - before.box_cpu, 1),
            tree_cpu_s=round(after.tree_cpu - before.tree_cpu, 1),
        )


def training_budget(stages: list[Stage], budget_cpu_min: float) -> dict:
    """The budgeted part (bc + every update) in CPU-minutes against the budget; the larger measure counts."""
    budgeted = [s for s in stages if s.kind in BUDGETED_KINDS]
    box = sum(s.box_cpu_s for s in budgeted) / 60
    tree = sum(s.tree_cpu_s for s in budgeted) / 60
    counted = max(box, tree)
    return {
        "stages": [s.name for s in budgeted],
        "box_cpu_min": round(box, 2),
        "tree_cpu_min": round(tree, 2),
        "counted_cpu_min": round(counted, 2),
        "budget_cpu_min": budget_cpu_min,
        "over_budget": counted > budget_cpu_min,
    }


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process, so their CPU reaches RUSAGE_CHILDREN."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if parent_pid(stat.read_text()) == os.getpid():
                pids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # the process exited while we read
    return pids


def reap_descendants(grace_s: float) -> int:
    """Reaps exited descendants until none is left or `grace_s` passed; returns how many still run."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return 0
        if time.monotonic() >= deadline:
            return len(child_pids())
        time.sleep(0.2)


def run_stage(name: str, kind: str, command: list[str], env: dict[str, str]) -> Stage:
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    before = sample_cpu()
    returncode = subprocess.run(command, env=env, cwd=ROOT, check=False).returncode
    exited = time.monotonic()
    stragglers = reap_descendants(STRAGGLER_GRACE_S)
    after = sample_cpu()  # CPU once the stage's processes are reaped; wall time until the command exited
    stage = Stage.measured(name, kind, command, returncode, before, CpuSample(exited, after.box_cpu, after.tree_cpu))
    stage.stragglers = stragglers
    print(
        f"== {name}: exit {returncode}, {stage.wall_s:.0f} s wall, CPU {stage.box_cpu_s:.0f} s (box)"
        f" / {stage.tree_cpu_s:.0f} s (own processes)" + (f", {stragglers} still running" if stragglers else ""),
        flush=True,
    )
    return stage


# -------------------------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, default=ROOT / "jobs/configs/small.yaml", help="train config (small: best measured)")
    add("--update-config", type=Path, default=ROOT / "jobs/configs/online_update.yaml", help="online-update config")
    add("--preset", default=None, help="model.preset override (default: the config's)")
    add("--episodes", type=int, default=1700, help="expert episodes, train + val (1700: x3 scenes)")
    add("--val-fraction", type=float, default=0.1, help="share of the episodes in val (0.1); the rest is train")
    add("--action-noise", type=float, default=0.0, help="DART noise on the executed command (0: best measured)")
    add("--data-seed", type=int, default=0)
    add("--epochs", type=int, default=1, help="train.epochs (1: each scene once, best measured)")
    add("--workers", type=int, default=None, help="scaling.num_workers (default: the config's)")
    add("--train-set", action="append", default=[], metavar="KEY=VALUE", help="extra train override (repeatable)")
    add("--rounds", type=int, default=2, help="DAgger rounds (2; 0: behaviour cloning only)")
    add("--betas", type=float, nargs="+", default=[0.5, 0.3], help="expert share per round; the last repeats")
    add("--collect-episodes", type=int, default=100, help="scenes driven per round (100)")
    add("--finetune-steps", type=int, default=None, help="finetune.steps (default: the update config's)")
    add("--update-set", action="append", default=[], metavar="KEY=VALUE", help="extra online-update override")
    add("--eval-episodes", type=int, default=200, help="closed-loop scene seeds per split (200)")
    add("--splits", nargs="+", default=EVAL_SPLITS, help="closed-loop splits (the three held-out ones)")
    add("--budget-cpu-min", type=float, default=60.0, help="training budget in CPU-minutes (60)")
    add("--home", type=Path, default=ROOT / ".mobile_vla" / "quality", help="platform home of the run")
    add("--out", type=Path, default=RESULTS, help="report JSON")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def _at_least(value: int | float | None, minimum: float, flag: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag}: {value} must be >= {minimum:g}")


def _override_list(values: list[str], flag: str) -> None:
    for value in values:
        if "=" not in value or value.startswith("="):
            raise ConfigError(f"{flag}: {value!r} is not KEY=VALUE")


def check_args(args: argparse.Namespace) -> None:
    """Rejects settings that cannot run, naming the flag and the bad value (ConfigError)."""
    for flag, value, minimum in (
        ("--episodes", args.episodes, 1),
        ("--epochs", args.epochs, 1),
        ("--workers", args.workers, 1),
        ("--rounds", args.rounds, 0),
        ("--collect-episodes", args.collect_episodes, 1),
        ("--finetune-steps", args.finetune_steps, 1),
        ("--eval-episodes", args.eval_episodes, 1),
    ):
        _at_least(value, minimum, flag)
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction: {args.val_fraction} must be in (0, 1)")
    if not 0 <= args.action_noise <= 1:
        raise ConfigError(f"--action-noise: {args.action_noise} must be in [0, 1]")
    if args.budget_cpu_min <= 0:
        raise ConfigError(f"--budget-cpu-min: {args.budget_cpu_min} must be > 0")
    bad_betas = [b for b in args.betas if not 0 <= b <= 1]
    if not args.betas or bad_betas:
        raise ConfigError(f"--betas: {bad_betas or args.betas} must be one or more values in [0, 1]")
    known = set(default_split_spec().splits)
    unknown = [s for s in args.splits if s not in known]
    if unknown:
        raise ConfigError(f"--splits: {unknown} not in the split spec (has {sorted(known)})")
    for flag, path in (("--config", args.config), ("--update-config", args.update_config)):
        if not path.is_file():
            raise ConfigError(f"{flag}: {path} is not a file")
    _override_list(args.train_set, "--train-set")
    _override_list(args.update_set, "--update-set")


def beta_for_round(betas: list[float], round_number: int) -> float:
    """The expert's share in round `round_number` (1-based): its own value, else the last one."""
    return betas[min(round_number, len(betas)) - 1]


# -------------------------------------------------------------------------------------------- commands
CLI = [sys.executable, "-m", "mobile_vla.cli"]


def generate_command(args: argparse.Namespace, data: Path) -> list[str]:
    """Every episode in train/val: held-out splits get fraction 0 (closed loop draws their scenes)."""
    fractions = {name: 0.0 for name in default_split_spec().splits}
    fractions.update({TRAIN_SPLIT: 1.0 - args.val_fraction, VAL_SPLIT: args.val_fraction})
    sets = [f"splits.{name}.fraction={f:.6g}" for name, f in fractions.items()]  # KEY=VALUE after the flags
    return [
        *CLI,
        "data",
        "generate",
        "--out",
        str(data),
        "--episodes",
        str(args.episodes),
        "--action-noise",
        str(args.action_noise),
        "--seed",
        str(args.data_seed),
        *sets,
    ]


def train_command(args: argparse.Namespace, data: Path, run_name: str) -> list[str]:
    overrides = [
        f"data.path={data}",
        f"run.name={run_name}",
        f"mlflow.registered_model={DEFAULT_MODEL_NAME}",
        f"mlflow.alias={BC_ALIAS}",
    ]
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.workers:
        overrides.append(f"scaling.num_workers={args.workers}")
    return [*CLI, "train", "--config", str(args.config), *overrides, *args.train_set]


def collect_command(args: argparse.Namespace, data: Path, parent_alias: str, round_number: int, feedback: Path):
    return [
        *CLI,
        "collect",
        "--model",
        f"models:/{DEFAULT_MODEL_NAME}@{parent_alias}",
        "--data",
        str(data),
        "--episodes",
        str(args.collect_episodes),
        "--beta",
        str(beta_for_round(args.betas, round_number)),
        "--seed",
        str(round_number),
        "--in-process",
        "--feedback-dir",
        str(feedback),
    ]


def update_command(args: argparse.Namespace, data: Path, parent_alias: str, round_number: int, feedback: Path):
    overrides = [
        f"model={DEFAULT_MODEL_NAME}",
        f"champion_alias={parent_alias}",
        f"challenger_alias={round_alias(round_number)}",
        f"feedback.root={feedback}",
        "feedback.min_new_episodes=1",  # the round's folder holds exactly what its collect stage wrote
        f"replay.data={data}",
        f"workdir={feedback.parent / f'update-{round_number}'}",
    ]
    if args.finetune_steps:
        overrides.append(f"finetune.steps={args.finetune_steps}")
    return [*CLI, "online-update", "--config", str(args.update_config), *overrides, *args.update_set]


def eval_command(args: argparse.Namespace, data: Path, version: str, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "closed_loop.py"),
        "--model",
        f"models:/{DEFAULT_MODEL_NAME}/{version}",
        "--data",
        str(data),
        "--splits",
        *args.splits,
        "--episodes",
        str(args.eval_episodes),
        "--out",
        str(out),
    ]


def round_alias(round_number: int) -> str:
    return f"dagger-{round_number}"


# ------------------------------------------------------------------------------------------------- run
class StageFailed(Exception):
    """A stage's command exited with a status that means it failed."""


@dataclass
class QualityRun:
    """What the run did so far: stages, models (label -> version and gate), closed-loop files."""

    args: argparse.Namespace
    env: dict[str, str]
    name: str = field(default_factory=lambda: f"quality-{time.strftime('%Y%m%d-%H%M%S')}")
    stages: list[Stage] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    closed_loop: dict[str, str] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.args.home / "data"

    def stage(self, name: str, kind: str, command: list[str], ok: tuple[int, ...] = (0,)) -> Stage:
        stage = run_stage(name, kind, command, self.env)
        self.stages.append(stage)
        if stage.returncode not in ok:
            raise StageFailed(f"stage {name}: exit {stage.returncode} ({shlex.join(command)})")
        return stage

    def behaviour_cloning(self) -> None:
        if (self.data / "manifest.json").is_file():
            print(f"\n== data: {self.data} holds a manifest: reused (no data stage)", flush=True)
        else:
            self.stage("data", "data", generate_command(self.args, self.data))
        self.stage("bc", "train", train_command(self.args, self.data, self.name))
        version = get_version_by_alias(DEFAULT_MODEL_NAME, BC_ALIAS)
        if version is None:
            raise StageFailed(f"stage bc: no model registered as @{BC_ALIAS}")
        self.validation = bc_validation(version)
        promote = [*CLI, "promote", "--model", DEFAULT_MODEL_NAME, "--version", version, "--force"]
        self.stage("promote_bc", "register", promote)
        self.models.append({"label": BC_ALIAS, "alias": BC_ALIAS, "version": version, "parent": None})

    def dagger_round(self, round_number: int) -> None:
        parent = self.models[-1]
        feedback = self.args.home / "feedback" / self.name / f"round-{round_number}"
        self.stage(
            f"collect_{round_number}",
            "collect",
            collect_command(self.args, self.data, parent["alias"], round_number, feedback),
        )
        stage = self.stage(
            f"update_{round_number}",
            "update",
            update_command(self.args, self.data, parent["alias"], round_number, feedback),
            ok=UPDATE_EXIT_OK,
        )
        alias = round_alias(round_number)
        version = get_version_by_alias(DEFAULT_MODEL_NAME, alias)
        tags = get_version_tags(DEFAULT_MODEL_NAME, version) if version else {}
        if tags.get("online.parent_version") != parent["version"]:
            raise StageFailed(f"stage {stage.name}: registered no model from v{parent['version']} as @{alias}")
        metrics = get_version_metrics(DEFAULT_MODEL_NAME, version)
        self.models.append(
            {
                "label": alias,
                "alias": alias,
                "version": version,
                "parent": parent["version"],
                "beta": beta_for_round(self.args.betas, round_number),
                "collect_episodes": self.args.collect_episodes,
                "feedback": str(feedback),
                "gate": {"decision": tags.get("promotion.decision"), "reason": tags.get("promotion.reason")},
                "online_metrics": {k: round(v, 5) for k, v in metrics.items() if k.startswith("online.")},
            }
        )

    def evaluate(self, out_dir: Path) -> None:
        for model in self.models:
            out = out_dir / f"{model['label']}.json"
            self.stage(f"eval_{model['label']}", "eval", eval_command(self.args, self.data, model["version"], out))
            self.closed_loop[model["label"]] = str(out)


def bc_validation(version: str) -> dict[str, float]:
    """The behaviour-cloning run's validation metrics (val_*, best_*) from MLflow."""
    client = mlflow.MlflowClient()
    run = client.get_run(client.get_model_version(DEFAULT_MODEL_NAME, version).run_id)
    return {k: round(v, 5) for k, v in run.data.metrics.items() if k.startswith(("val_", "best_"))}


def dataset_summary(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    generator = manifest.get("generator") or {}
    return {
        "path": str(data),
        "episodes": {split: len(files) for split, files in manifest["splits"].items()},
        "counts": manifest.get("counts"),
        "action_noise": (generator.get("settings") or {}).get("action_noise"),
        "seed": generator.get("seed"),
    }


def stage_table(stages: list[Stage]) -> list[str]:
    lines = [
        "| stage | exit | wall s | CPU s (box) | CPU s (own processes) | budgeted |",
        "|---|---|---|---|---|---|",
    ]
    for s in stages:
        budgeted = "yes" if s.kind in BUDGETED_KINDS else ""
        lines.append(
            f"| {s.name} | {s.returncode} | {s.wall_s:.0f} | {s.box_cpu_s:.0f} | {s.tree_cpu_s:.0f} | {budgeted} |"
        )
    return lines


def build_report(run: QualityRun, started: str, load_before: tuple, failure: str | None) -> dict:
    budget = training_budget(run.stages, run.args.budget_cpu_min)
    rows = [(label, json.loads(Path(path).read_text())) for label, path in run.closed_loop.items()]
    table, markdown = ablation_table(rows, baseline=BC_ALIAS) if rows else ([], [])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()}
    return {
        "benchmark": "quality",
        "run_name": run.name,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "failed": failure,
        "machine": machine(load_before),
        "settings": settings,
        "dataset": dataset_summary(run.data) if (run.data / "manifest.json").is_file() else None,
        "stages": [asdict(s) for s in run.stages],
        "training_cpu": budget,
        "bc_validation": run.validation,
        "models": run.models,
        "rounds_note": "each round fine-tunes the previous round's model whatever its gate decided",
        "closed_loop": {"files": run.closed_loop, "rows": table, "markdown": markdown},
    }


def print_summary(report: dict) -> None:
    budget = report["training_cpu"]
    print("\n## Stages\n")
    print("\n".join(stage_table([Stage(**s) for s in report["stages"]])))
    print(
        f"\nTraining (bc + updates): {budget['counted_cpu_min']:.1f} CPU-min (box {budget['box_cpu_min']:.1f},"
        f" own processes {budget['tree_cpu_min']:.1f}) of a {budget['budget_cpu_min']:g} CPU-min budget"
    )
    if budget["over_budget"]:
        print(f"WARNING: training used {budget['counted_cpu_min']:.1f} CPU-min, over the budget")
    for model in report["models"][1:]:
        print(f"{model['label']} (from v{model['parent']}, beta {model['beta']}): gate {model['gate']['decision']}")
    if report["closed_loop"]["markdown"]:
        print("\n## Closed loop (same seeds; vs baseline: paired against bc)\n")
        print("\n".join(report["closed_loop"]["markdown"]))
    if report["failed"]:
        print(f"\nFAILED: {report['failed']}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in ("home", "out", "config", "update_config"):  # the stages run in the repository root
        setattr(args, name, getattr(args, name).resolve())
    args.home.mkdir(parents=True, exist_ok=True)
    os.environ.update(MOBILE_VLA_HOME=str(args.home), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # the run's own MLflow store and a local Ray, always
        os.environ.pop(key, None)
    configure_mlflow()
    if not become_subreaper():
        print("note: not a child subreaper: Ray workers' CPU may be missing from 'own processes'", flush=True)

    run = QualityRun(args, dict(os.environ))
    started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
    failure = None
    try:
        run.behaviour_cloning()
        for round_number in range(1, args.rounds + 1):
            run.dagger_round(round_number)
        run.evaluate(args.out.parent / f"{args.out.stem}_closed_loop")
    except (StageFailed, MobileVLAError) as exc:
        failure = str(exc)
    report = build_report(run, started, load_before, failure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"\nwrote {args.out}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
