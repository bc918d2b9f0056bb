"""`mobile-vla tune --config jobs/configs/tune_X.yaml` and `mobile-vla ensemble ...` (also `python jobs/tune.py`).

The tune modules import Ray (and MLflow, torch) at the top, so they load inside the run functions:
`mobile-vla --help` never pays for them.
"""

from __future__ import annotations

import sys

from mobile_vla.errors import ConfigError

TRAIN_OVERRIDE_DEPRECATED = (
    "warning: --train-override is deprecated: write the override as a plain KEY=VALUE after the flags, "
    "as for `mobile-vla train` (keys the tune config does not have go to the training preset)"
)
OVERRIDES_HELP = (
    "dotted overrides, as for `mobile-vla train`: keys of the tune config (tune.num_samples=8 run.name=sweep-1) "
    "set the sweep; any other key (data.path=DIR train.epochs=2) overrides the base training preset"
)


def register(subparsers) -> None:
    """Adds `tune` and `ensemble` to the CLI."""
    tune = subparsers.add_parser(
        "tune",
        help="Ray Tune sweep of training runs (ASHA, Optuna), MLflow parent run, best trial -> @challenger",
        description="Sweep hyperparameters with Ray Tune: one Ray Train run per trial, ASHA stops weak trials "
        "early, every trial is an MLflow child run under the sweep's run, and the best trial is registered. "
        "Re-running with the same run.name resumes the sweep.",
    )
    add_arguments(tune)
    tune.set_defaults(func=run_tune)

    ensemble = subparsers.add_parser(
        "ensemble",
        help="combine M policies (a sweep's top trials, or M seeds of one preset) into one registered ensemble",
        description="Build an ensemble policy: mean action, confidence from the members' disagreement combined "
        "with their own predicted variance. Registered as one model version, exported and served like a policy.",
    )
    source = ensemble.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-sweep", metavar="NAME", help="the top --members trials of this earlier sweep")
    source.add_argument("--seeds", type=int, metavar="M", help="train the --config sweep's base preset with M seeds")
    ensemble.add_argument("--config", help="tune config (jobs/configs/tune_X.yaml): MLflow names, base preset, data")
    ensemble.add_argument("--members", type=int, default=3, help="members taken from the sweep (default 3)")
    _add_overrides(ensemble)
    ensemble.set_defaults(func=run_ensemble)


def add_arguments(parser) -> None:
    """The `tune` arguments (also used by `python jobs/tune.py`)."""
    parser.add_argument("--config", required=True, help="tune config, e.g. jobs/configs/tune_small.yaml")
    _add_overrides(parser)
    parser.add_argument("--check", action="store_true", help="validate the config, search space and data, then stop")


def _add_overrides(parser) -> None:
    """Plain KEY=VALUE overrides (tune config or training preset, by key), and the deprecated spelling."""
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="deprecated: write KEY=VALUE after the flags instead",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def _load(args):
    from pathlib import Path

    from mobile_vla.tune.sweep_config import load_tune_config, split_overrides

    if args.train_override:
        print(TRAIN_OVERRIDE_DEPRECATED, file=sys.stderr)
    sweep_overrides, train_overrides = split_overrides(args.overrides)
    cfg = load_tune_config(args.config, sweep_overrides, [*args.train_override, *train_overrides])
    return cfg, (Path(args.config).resolve().parent if args.config else None)


def run_tune(args) -> int:
    """`mobile-vla tune`: the sweep, or with --check only the config, search space, data and cluster fit."""
    from rich.console import Console

    cfg, config_dir = _load(args)
    console = Console()
    if args.check:
        import ray

        from mobile_vla.ray_session import ensure_ray
        from mobile_vla.tracking.job_storage import check_job_storage
        from mobile_vla.train.preflight import check_data, check_model
        from mobile_vla.tune.sweep_config import check_search_space, load_base_train_config
        from mobile_vla.tune.trial_resources import concurrency, total_trials

        check_job_storage([cfg.run.storage_place()])
        base = load_base_train_config(cfg, config_dir)
        check_model(base)
        check_data(base)
        check_search_space(cfg, base)
        ensure_ray()
        running = concurrency(cfg, base, ray.cluster_resources())
        console.print(
            f"[green]ok[/green]: {args.config}: {total_trials(cfg)} trials, {running} at a time, "
            f"{len(cfg.search_space)} searched keys"
        )
        return 0

    from mobile_vla.tune.sweep import run_sweep

    result = run_sweep(cfg, config_dir=config_dir, console=console)
    print_summary(console, result, cfg)
    return 0


def print_summary(console, result, cfg) -> None:
    """The sweep's trials as a table (best trial in bold), then the versions it registered."""
    from rich.table import Table

    from mobile_vla.tune.sweep_tracking import summary_rows

    metric = cfg.tune.metric
    rows = summary_rows(result.trials, metric)
    table = Table(
        title=f"sweep {result.name}: {len(rows)} trials, {result.concurrency} at a time, {result.seconds:.0f} s"
    )
    keys = [k for k in (rows[0] if rows else {}) if k != "mlflow_run_id"]
    for key in keys:
        table.add_column(key, overflow="fold")
    best = result.best.trial_id if result.best else None
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row[k] for k in keys)]
        table.add_row(*cells, style="bold green" if row["trial_id"] == best else None)
    console.print(table)
    console.print(f"mlflow parent run: {result.parent_run_id}")
    if result.model_version:
        console.print(
            f"best trial {best}: models:/{cfg.mlflow.registered_model}/{result.model_version} (@{cfg.mlflow.alias})"
        )
    if result.ensemble_version:
        console.print(
            f"ensemble of {cfg.ensemble.members}: models:/{cfg.mlflow.registered_model}/"
            f"{result.ensemble_version} (@{cfg.ensemble.alias})"
        )


def run_ensemble(args) -> int:
    """`mobile-vla ensemble`: from an earlier sweep's top trials, or from a new sweep over M seeds."""
    from rich.console import Console

    console = Console()
    if args.members < 2:
        raise ConfigError(f"--members = {args.members}: an ensemble needs at least 2")
    if args.seeds is not None:
        if args.seeds < 2:
            raise ConfigError(f"--seeds = {args.seeds}: an ensemble needs at least 2 members")
        if not args.config:
            raise ConfigError("--seeds needs --config (the tune config whose base preset is trained)")
        from mobile_vla.tune.ensemble_build import seed_sweep_config
        from mobile_vla.tune.sweep import run_sweep

        cfg, config_dir = _load(args)
        cfg = seed_sweep_config(cfg, args.seeds)
        result = run_sweep(cfg, config_dir=config_dir, console=console)
        print_summary(console, result, cfg)
        return 0

    from mobile_vla.tune.ensemble_build import ensemble_from_sweep
    from mobile_vla.tune.sweep_config import load_base_train_config

    cfg, config_dir = _load(args)
    data_path, val_split = None, "val"
    if args.config:
        base = load_base_train_config(cfg, config_dir)
        data_path, val_split = base.data_path(), base.data.val_split
    version = ensemble_from_sweep(
        args.from_sweep,
        args.members,
        experiment=cfg.mlflow.experiment,
        registered_model=cfg.mlflow.registered_model,
        alias=cfg.ensemble.alias,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        data_path=data_path,
        val_split=val_split,
    )
    if version:
        console.print(
            f"ensemble of {args.members}: models:/{cfg.mlflow.registered_model}/{version} (@{cfg.ensemble.alias})"
        )
    return 0
