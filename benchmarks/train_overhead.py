"""What Ray Train costs, whether the data pipeline keeps up, and what `small` learns in a CPU budget.

    .venv/bin/python benchmarks/train_overhead.py                      # generates its data first
    .venv/bin/python benchmarks/train_overhead.py --data data/mini --epochs 2 --budget-minutes 10

In one run, on the same model (`small` preset, same seed), data and optimiser settings:
1. plain PyTorch: one process, `torch.utils.data.DataLoader` over the windows Dataset (1 loader worker);
2. Ray Train V2: `TorchTrainer` with one worker fed by the Ray Data pipeline (the product path);
   samples/s of the last epoch of each (the first epoch pays start-up); target: Ray >= 90% of plain.
3. the Ray Data pipeline alone (one pass with augmentation, no model): windows/s, against the model's
   samples/s; and, from (2), the share of each epoch the trainer sat waiting for data.
4. `small` trained through `run_training` (MLflow on) for as many epochs as fit the wall-clock budget
   at the measured speed: validation MAE per axis (m/s, rad/s) of the best checkpoint.
Both trainers get the same number of torch threads (all cores); Ray's worker reserves them all and the
cluster gets one extra logical CPU so the pipeline can be scheduled. Writes benchmarks/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import sys
import tempfile
import time
from pathlib import Path

from bench_data import ensure_data

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_overhead.json"
SMALL = REPO / "jobs" / "configs" / "small.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="dataset folder (default: generate --episodes into the platform home)")
    parser.add_argument("--episodes", type=int, default=40, help="episodes to generate when --data is absent")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trainer in the overhead comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="wall-clock budget of the MAE run")
    parser.add_argument("--skip-budget", action="store_true", help="skip the MAE-in-a-budget run")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def plain_pytorch(cfg, preprocessing, threads: int) -> dict:
    """The reference: a single-process loop, the same model/optimiser/schedule as the Ray loop."""
    import torch
    from torch.utils.data import DataLoader

    from mobile_vla.policy import build_policy
    from mobile_vla.policy.losses import policy_loss
    from mobile_vla.train.evaluation import model_inputs
    from mobile_vla.train.preflight import resolve_policy_config
    from mobile_vla.train.step import param_groups, warmup_cosine
    from mobile_vla.train.trainer import steps_per_epoch
    from mobile_vla.train.windows import WindowDataset

    torch.set_num_threads(threads)
    dataset = WindowDataset(cfg.data_path(), cfg.data.train_split, preprocessing, augment=cfg.data.augment, seed=None)
    limit = len(dataset)
    if cfg.train.max_steps_per_epoch:
        limit = min(limit, cfg.train.max_steps_per_epoch * cfg.train.batch_size)
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=1,
        persistent_workers=True,
        prefetch_factor=4,
        multiprocessing_context="spawn",
    )
    torch.manual_seed(cfg.train.seed)
    model = build_policy(resolve_policy_config(cfg))
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("logit_scale", "logit_bias"):
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    total = steps_per_epoch(cfg, limit) * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
    )
    model.train()
    epochs = []
    for epoch in range(cfg.train.epochs):
        started, samples, waited = time.perf_counter(), 0, 0.0
        fetch = time.perf_counter()
        for batch in loader:
            waited += time.perf_counter() - fetch
            loss = policy_loss(model(model_inputs(batch)), batch)["loss"]
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            samples += int(batch["images"].shape[0])
            fetch = time.perf_counter()
        seconds = time.perf_counter() - started
        epochs.append(
            {
                "epoch": epoch + 1,
                "samples": samples,
                "seconds": seconds,
                "samples_per_s": samples / seconds,
                "data_wait_fraction": waited / seconds,
            }
        )
        print(f"plain pytorch epoch {epoch + 1}: {samples / seconds:.2f} samples/s", flush=True)
    return {"epochs": epochs, "samples_per_s": epochs[-1]["samples_per_s"], "train_windows": limit}


def ray_train(cfg) -> dict:
    from mobile_vla.train.checkpointing import read_history
    from mobile_vla.train.trainer import run_training

    result = run_training(cfg)
    latest = max(Path(result.storage_path, result.run_name).glob("checkpoint_epoch_*"))
    epochs = read_history(latest)["epochs"]
    for e in epochs:
        print(
            f"ray train epoch {e['epoch']}: {e['samples_per_s']:.2f} samples/s "
            f"(waiting for data {100 * e['data_wait_fraction']:.1f}%)",
            flush=True,
        )
    keep = ("epoch", "samples_per_s", "epoch_seconds", "data_wait_fraction", "train_loss", "val_loss", "val_mae")
    return {
        "epochs": [{k: e[k] for k in keep} for e in epochs],
        "samples_per_s": epochs[-1]["samples_per_s"],
        "data_wait_fraction": epochs[-1]["data_wait_fraction"],
    }


def pipeline_alone(cfg, preprocessing) -> dict:
    """One pass of the Ray Data training pipeline (augmentation on) with nothing consuming but a counter."""
    from mobile_vla.train.pipeline import build_window_dataset

    dataset = build_window_dataset(cfg.data_path(), cfg.data.train_split, preprocessing, augment=True, seed=None)
    dataset.context.enable_progress_bars = False
    started, windows = time.perf_counter(), 0
    for batch in dataset.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
        windows += len(batch["window_id"])
    seconds = time.perf_counter() - started
    return {"windows": windows, "seconds": seconds, "windows_per_s": windows / seconds}


def budget_run(args, data: Path, samples_per_s: float, train_windows: int) -> dict:
    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.trainer import run_training

    epochs = max(1, int(args.budget_minutes * 60 * samples_per_s // max(train_windows, 1)))
    cfg = load_train_config(
        SMALL,
        [
            f"data.path={data}",
            f"train.epochs={epochs}",
            f"train.batch_size={args.batch_size}",
            f"run.name=bench-budget-{int(time.time())}",
            "mlflow.experiment=benchmarks",
            "mlflow.registered_model=null",
            f"scaling.resources_per_worker.CPU={os.cpu_count()}",
        ],
    )
    started = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - started
    axes = ("linear_x", "linear_y", "angular_z")
    return {
        "budget_minutes": args.budget_minutes,
        "epochs": epochs,
        "wall_seconds": wall,
        "cpu_seconds_upper_bound": wall * os.cpu_count(),
        "best_epoch": result.metrics.get("epoch"),
        "val_mae": result.metrics.get("val_mae"),
        "val_mae_per_axis": {a: result.metrics.get(f"val_mae_{a}") for a in axes},
        "val_rmse": result.metrics.get("val_rmse"),
        "val_r2": result.metrics.get("val_r2"),
        "run_id": result.run_id,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    home = Path(os.environ.setdefault("MOBILE_VLA_HOME", str(REPO / ".mobile_vla"))).resolve()
    cores = os.cpu_count() or 1
    import ray

    from mobile_vla.train.job_config import load_train_config
    from mobile_vla.train.preflight import check_data, resolve_policy_config
    from mobile_vla.train.trainer import build_preprocessing

    ray.init(num_cpus=cores + 1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    data = ensure_data(args, home)
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as scratch:
        overrides = [
            f"data.path={data}",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            f"scaling.resources_per_worker.CPU={cores}",
            "mlflow.enabled=false",
            f"run.storage_path={scratch}",
            f"run.name=overhead-{int(time.time())}",
        ]
        if args.max_steps:
            overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
        cfg = load_train_config(SMALL, overrides)
        preprocessing = build_preprocessing(cfg, check_data(cfg), resolve_policy_config(cfg))
        plain = plain_pytorch(cfg, preprocessing, cores)
        ray_result = ray_train(cfg)
        pipeline = pipeline_alone(cfg, preprocessing)
    ratio = ray_result["samples_per_s"] / plain["samples_per_s"]
    report = {
        "machine": f"{cores}-core CPU box ({host.machine()}), load average at start {os.getloadavg()[0]:.1f}",
        "preset": "small",
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_windows_per_epoch": plain["train_windows"],
        "torch_threads": cores,
        "plain_pytorch": plain,
        "ray_train_1_worker": ray_result,
        "ray_vs_plain": ratio,
        "target_ray_vs_plain": 0.9,
        "meets_target": ratio >= 0.9,
        "data_pipeline_alone": pipeline,
        "pipeline_vs_model_throughput": pipeline["windows_per_s"] / plain["samples_per_s"],
    }
    if not args.skip_budget:
        report["small_in_budget"] = budget_run(args, data, plain["samples_per_s"], plain["train_windows"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {out}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
