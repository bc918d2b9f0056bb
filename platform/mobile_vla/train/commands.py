"""`mobile-vla train --config jobs/configs/X.yaml [key.sub=value ...]` (also `python jobs/train.py ...`).

A CLI face: the trainer (Ray, torch, MLflow) and rich are imported inside `run_train`, so
`mobile-vla --help` never loads them.
"""

from __future__ import annotations


def register(subparsers) -> None:
    """Adds `train` to the CLI."""
    parser = subparsers.add_parser(
        "train",
        help="train the policy on Ray Train (DDP/FSDP), log to MLflow, register @challenger",
        description="Train the policy with Ray Train V2. Re-running with the same run.name resumes that run "
        "from its last checkpoint. Overrides are dotted keys, e.g. optim.lr=3e-4 scaling.num_workers=2.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_train)


def add_arguments(parser) -> None:
    """The train arguments (shared with `jobs/train.py`): --config, dotted overrides, --check."""
    parser.add_argument("--config", required=True, help="YAML preset, e.g. jobs/configs/small.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=5")
    parser.add_argument("--check", action="store_true", help="validate config, data and cluster resources, then stop")


def run_train(args) -> int:
    """Checks (--check) or runs the training job and prints the best checkpoint's metrics."""
    from rich.console import Console
    from rich.table import Table

    from mobile_vla.train.job_config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    console = Console()
    if args.check:
        from mobile_vla.train.preflight import preflight

        preflight(cfg)
        console.print(f"[green]ok[/green]: {args.config} is valid; data, model and resources check out")
        return 0

    from mobile_vla.train.trainer import run_training

    result = run_training(cfg, show_progress=True)  # epoch, step, loss, ETA on stderr while it trains
    table = Table(title=f"run {result.run_name}", show_header=False)
    for key in ("epoch", "val_loss", "val_mae", "val_rmse", "val_r2"):
        if key in result.metrics:
            table.add_row(f"best {key}", f"{result.metrics[key]:.4g}")
    table.add_row("best checkpoint", str(result.best_checkpoint_dir))
    table.add_row("mlflow run", str(result.run_id))
    if result.model_version:
        table.add_row("model", f"models:/{cfg.mlflow.registered_model}/{result.model_version} (@{cfg.mlflow.alias})")
    console.print(table)
    return 0
