"""Is the ensemble worth it, and is its confidence honest? Measured on generated held-out data.

    .venv/bin/python benchmarks/ensemble_quality.py                         # generates its data first
    .venv/bin/python benchmarks/ensemble_quality.py --data data/mini --preset small --epochs 6

1. Data: MiniWorld episodes from the default split spec; members train on `train`, validate on `val`;
   everything is scored on the held-out splits (`--eval-splits`, by default all four: unseen layouts,
   unseen target/distractor pairs, unseen paraphrases, visual shift - scenes the members never saw).
2. Members: the training preset (`--preset`) trained `--members` times with seeds 0..M-1 by the product
   path (`mobile-vla ensemble --seeds M`: a Ray Tune grid over train.seed, one TorchTrainer per trial, MLflow).
3. Scores, per held-out frame (teacher-forced windows, de-normalised actions):
   - MAE of the ensemble against each member (and the best one);
   - Pearson and Spearman correlation between the confidence and the frame's mean absolute error, for the
     ensemble and for each member alone. Negative = less confident where it is more wrong (what a robot
     needs); the ensemble's confidence combines the members' disagreement with their own variance.
Writes benchmarks/results/ensemble_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench_data import ensure_data
from bench_machine import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ensemble_quality.json"
PRESETS = {"tiny": REPO / "jobs" / "configs" / "tiny.yaml", "small": REPO / "jobs" / "configs" / "small.yaml"}
TUNE_TINY = REPO / "jobs" / "configs" / "tune_tiny.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="dataset folder (default: generate --episodes into the platform home)")
    parser.add_argument("--episodes", type=int, default=40, help="episodes to generate when --data is absent")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--eval-splits",
        default="unseen_layout,unseen_pair,unseen_paraphrase,visual_shift",
        help="held-out splits, comma-separated (missing or empty ones are skipped)",
    )
    parser.add_argument("--home", help="platform home (MLflow store, Ray results); default: a fresh temp folder")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def train_members(args, data: Path):
    """The seed ensemble through the product path; returns (SweepResult, tune config)."""
    from mobile_vla.tune.ensemble_build import seed_sweep_config
    from mobile_vla.tune.sweep import run_sweep
    from mobile_vla.tune.sweep_config import load_tune_config

    overrides = [
        f"data.path={data}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "scaling.num_workers=1",
        "data.augment=true",
    ]
    cfg = load_tune_config(
        TUNE_TINY,
        [
            f"train.config={PRESETS[args.preset]}",
            f"run.name=ensemble-quality-{args.preset}-{int(time.time())}",
            "mlflow.experiment=benchmarks",
            "ensemble.alias=benchmark-ensemble",
            "mlflow.alias=benchmark-best",
        ],
    )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"overrides": overrides})})
    cfg = seed_sweep_config(cfg, args.members)
    return run_sweep(cfg), cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    home = Path(args.home or tempfile.mkdtemp(prefix="mobile-vla-ensemble-bench-"))
    os.environ["MOBILE_VLA_HOME"] = str(home)
    import ray

    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYOPENGL_PLATFORM": "egl"}},
    )
    started = time.perf_counter()
    data = ensure_data(args, home)
    generated = time.perf_counter()
    sweep, cfg = train_members(args, data)
    trained = time.perf_counter()

    from mobile_vla.data.manifest import load_manifest
    from mobile_vla.policy import load_policy
    from mobile_vla.tracking import resolve_model
    from mobile_vla.tune.ensemble_build import ensemble_quality

    ensemble, preprocessing = load_policy(
        resolve_model(f"models:/{cfg.mlflow.registered_model}/{sweep.ensemble_version}").path
    )
    splits = [s for s in args.eval_splits.split(",") if (load_manifest(data)["splits"].get(s))]
    if not splits:
        raise SystemExit(f"{data}: none of the held-out splits {args.eval_splits!r} has episodes")
    per_split = {}
    for split in splits:
        quality = ensemble_quality(ensemble, preprocessing, data, split, batch_size=args.batch_size)
        per_split[split] = {"windows": quality.windows, "frames": quality.frames, **quality.as_metrics()}
        print(
            f"{split}: ensemble MAE {quality.ensemble_mae:.4f} vs best member {quality.best_member_mae:.4f}; "
            f"corr(confidence, |error|) ensemble {quality.ensemble_confidence_error_corr:+.3f} "
            f"(spearman {quality.ensemble_confidence_error_spearman:+.3f}), members "
            + ", ".join(f"{c:+.3f}" for c in quality.member_confidence_error_corr),
            flush=True,
        )
    scored = time.perf_counter()

    frames = sum(v["frames"] for v in per_split.values())

    def pooled(key: str) -> float:  # frame-weighted over the held-out splits
        return sum(v[key] * v["frames"] for v in per_split.values()) / max(frames, 1)

    summary = {
        "ensemble_mae": pooled("ensemble_mae"),
        "best_member_mae": min(pooled(f"member_{i}_mae") for i in range(args.members)),
        "member_mae": [pooled(f"member_{i}_mae") for i in range(args.members)],
        "ensemble_confidence_error_corr": pooled("ensemble_confidence_error_corr"),
        "member_confidence_error_corr": [pooled(f"member_{i}_confidence_error_corr") for i in range(args.members)],
        "frames": frames,
    }
    summary["ensemble_vs_best_member_mae"] = summary["ensemble_mae"] / summary["best_member_mae"] - 1.0
    report = {
        "benchmark": "ensemble_quality",
        "machine": machine(),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out",)},
            "data": str(data),
            "eval_splits": splits,
            "episodes_per_split": {k: len(v) for k, v in load_manifest(data)["splits"].items()},
        },
        "confidence_rule": "ensemble: variance = mean member variance + variance of member means; "
        "confidence = mean over chunk and axes of erf(tau / (sigma * sqrt 2))",
        "summary": summary,
        "per_split": per_split,
        "members": [
            {
                "trial_id": t.trial_id,
                "seed": t.params.get("train.seed"),
                "val_loss": t.best.get("val_loss"),
                "val_mae": t.best.get("val_mae"),
                "epochs": t.epochs,
            }
            for t in sweep.trials
        ],
        "model_versions": {"best_member": sweep.model_version, "ensemble": sweep.ensemble_version},
        "seconds": {"data": generated - started, "train_members": trained - generated, "score": scored - trained},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
