"""Ensemble members -> one registered `EnsemblePolicy` version (exported and served like any policy).

    ensemble, preprocessing = combine_policy_dirs([dir_a, dir_b, dir_c])
    quality = ensemble_quality(ensemble, preprocessing, "data/mini", "val")     # MAE vs members, corr
    version = register_ensemble(ensemble, preprocessing, run_id, name="mobile-vla-policy", alias="challenger")

Members come from a sweep (its top M trials: `ensemble.members` in a tune config, or
`mobile-vla ensemble --from-sweep NAME`) or from one training preset trained with M seeds
(`mobile-vla ensemble --config ... --seeds M`, a Tune grid over train.seed without early stopping).
Members must share what serving shares: the preprocessing (action and state scaling, tokenizer) and the
chunk length; a sweep's top trials that differ in chunk from the best one are skipped, with the reason.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from mobile_vla.config import dump_config
from mobile_vla.errors import ConfigError, MobileVLAError, ModelError
from mobile_vla.policy import load_policy, save_policy
from mobile_vla.policy.ensemble import EnsemblePolicy
from mobile_vla.tracking import configure_mlflow, get_or_create_experiment, log_version_metrics, register_policy
from mobile_vla.tracking.provenance import provenance_tags
from mobile_vla.train.evaluation import evaluate_windows, window_batches
from mobile_vla.train.windows import WindowDataset
from mobile_vla.tune.sweep_config import TuneJobConfig
from mobile_vla.tune.sweep_tracking import load_checkpoint_policy_dir
from mobile_vla.tune.trials import CHECKPOINT_TAG, ENSEMBLE_TRIAL, PARENT_TRIAL, SWEEP_TAG, TRIAL_TAG, SweepResult

log = logging.getLogger(__name__)

SCALING_FIELDS = (
    "action_low",
    "action_high",
    "state_mean",
    "state_std",
    "state_dim",
    "chunk",
    "control_hz",
    "image_size",
    "resize_rule",
    "image_mean",
    "image_std",
)


# --- combining ----------------------------------------------------------------------------------


def check_member_preprocessing(preprocessings: list, sources: list[str]) -> None:
    """The members must scale inputs and outputs identically (one preprocessing serves them all)."""
    first = preprocessings[0]
    if first is None:
        raise ModelError(f"{sources[0]}: member has no preprocessing/ (cannot serve an ensemble without it)")
    for prep, source in zip(preprocessings[1:], sources[1:], strict=True):
        if prep is None:
            raise ModelError(f"{source}: member has no preprocessing/")
        for name in SCALING_FIELDS:
            a, b = getattr(first, name), getattr(prep, name)
            same = np.allclose(a, b, rtol=1e-6, atol=1e-7) if isinstance(a, list) else a == b
            if not same:
                raise ModelError(
                    f"{source}: preprocessing {name} = {b!r} differs from {sources[0]} ({a!r}); "
                    "ensemble members must be trained on the same dataset statistics"
                )
        if first.tokenizer is not None and prep.tokenizer is not None:
            probe = ["go to the red box avoiding the barrel on the left"]
            ta, tb = first.tokenize(probe), prep.tokenize(probe)
            if any(not np.array_equal(ta[k], tb[k]) for k in ta):
                raise ModelError(f"{source}: its tokenizer encodes instructions differently from {sources[0]}'s")


def combine_policies(members: list, preprocessings: list, sources: list[str]):
    """(EnsemblePolicy, preprocessing of the first member) from loaded members."""
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
    kinds = [getattr(m, "kind", "policy") for m in members]
    if "ensemble" in kinds:
        raise ModelError(f"{sources[kinds.index('ensemble')]}: is already an ensemble (nest members, not ensembles)")
    check_member_preprocessing(preprocessings, sources)
    try:
        ensemble = EnsemblePolicy.from_members(members, sources)
    except ConfigError as exc:
        raise ModelError(f"members {sources}: {exc}") from None
    return ensemble, preprocessings[0]


def combine_policy_dirs(folders: list[str | Path], sources: list[str] | None = None):
    """Loads saved policies (folders holding policy/ or config.json) and combines them."""
    sources = sources or [str(f) for f in folders]
    loaded = [load_policy(folder) for folder in folders]
    return combine_policies([m for m, _ in loaded], [p for _, p in loaded], sources)


def register_ensemble(
    ensemble, preprocessing, run_id: str, *, name: str, alias: str | None, tags: dict | None = None
) -> str:
    """save_policy(kind "ensemble") into a model folder, registered as one new version of `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(Path(tmp) / "model" / "policy", ensemble, preprocessing)
        tags = {"kind": "ensemble", "members": str(len(ensemble.members)), **(tags or {})}
        return register_policy(
            Path(tmp) / "model",
            run_id,
            name=name,
            alias=alias,
            tags=tags,
            description=f"ensemble of {len(ensemble.members)} policies: " + "; ".join(ensemble.config.sources),
        )


# --- quality on held-out windows ----------------------------------------------------------------


@dataclass
class EnsembleQuality:
    """An ensemble and its members scored on the same held-out windows: MAE and how well confidence
    tracks error (Pearson and Spearman, per frame).
    """

    windows: int
    frames: int  # valid (non-padding) frames scored
    ensemble_mae: float  # de-normalised, over every valid chunk step and axis
    member_mae: list[float]
    ensemble_confidence_error_corr: float  # Pearson, per frame: confidence vs mean absolute error
    member_confidence_error_corr: list[float]
    ensemble_confidence_error_spearman: float
    mean_confidence: float
    extra: dict = field(default_factory=dict)

    @property
    def best_member_mae(self) -> float:
        return min(self.member_mae)

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "ensemble_mae": self.ensemble_mae,
            "best_member_mae": self.best_member_mae,
            "ensemble_confidence_error_corr": self.ensemble_confidence_error_corr,
            "ensemble_confidence_error_spearman": self.ensemble_confidence_error_spearman,
            "mean_confidence": self.mean_confidence,
        }
        for i, (mae, corr) in enumerate(zip(self.member_mae, self.member_confidence_error_corr, strict=True)):
            metrics[f"member_{i}_mae"] = mae
            metrics[f"member_{i}_confidence_error_corr"] = corr
        return metrics


def _correlations(confidence: np.ndarray, error: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) between per-frame confidence and error; NaN when either is constant."""
    if len(confidence) < 3 or np.std(confidence) == 0 or np.std(error) == 0:
        return float("nan"), float("nan")
    pearson = float(np.corrcoef(confidence, error)[0, 1])
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (confidence, error)]
    return pearson, float(np.corrcoef(*ranks)[0, 1])


def ensemble_quality(ensemble, preprocessing, folder: str | Path, split: str, batch_size: int = 8) -> EnsembleQuality:
    """Windows of a held-out split through the ensemble and each member (teacher-forced over the window).

    Per valid frame: error = mean |action - target| over the valid chunk steps and the 3 axes,
    de-normalised (m/s, rad/s); confidence = the model's confidence for that frame. Scored by
    `train.evaluation.evaluate_windows`, so `ensemble_mae` is the same MAE as training's `val_mae`.
    """
    dataset = WindowDataset(folder, split, preprocessing, augment=False)
    if len(dataset) == 0:
        raise MobileVLAError(f"{folder}: split {split!r} has no windows to evaluate on")
    models = [ensemble, *ensemble.members]
    scored = [evaluate_windows(model, window_batches(dataset, batch_size), preprocessing) for model in models]
    maes = [s.metrics()["mae"] for s in scored]
    error, confidence = zip(*(s.frame_errors() for s in scored), strict=True)
    correlations = [_correlations(c, e) for c, e in zip(confidence, error, strict=True)]
    return EnsembleQuality(
        windows=len(dataset),
        frames=int(len(error[0])),
        ensemble_mae=maes[0],
        member_mae=maes[1:],
        ensemble_confidence_error_corr=correlations[0][0],
        member_confidence_error_corr=[c[0] for c in correlations[1:]],
        ensemble_confidence_error_spearman=correlations[0][1],
        mean_confidence=float(confidence[0].mean()),
    )


# --- from a sweep -------------------------------------------------------------------------------


def _select_members(candidates: list[tuple[str, Path]], count: int) -> tuple[list, list, list[str], list[str]]:
    """The first `count` loadable candidates compatible with the first: (models, preps, sources, skipped)."""
    models, preps, sources, skipped = [], [], [], []
    for source, folder in candidates:
        if len(models) == count:
            break
        model, prep = load_policy(folder)
        if models:
            try:
                combine_policies([models[0], model], [preps[0], prep], [sources[0], source])
            except MobileVLAError as exc:
                skipped.append(f"{source}: {exc}")
                continue
        models.append(model)
        preps.append(prep)
        sources.append(source)
    return models, preps, sources, skipped


def register_sweep_ensemble(result: SweepResult, cfg: TuneJobConfig, base) -> str | None:
    """The top `ensemble.members` trials of a finished sweep as one ensemble version (child run 'ensemble')."""
    ranked = result.ranked(cfg.tune.metric, cfg.tune.mode)
    with tempfile.TemporaryDirectory() as tmp:
        candidates = []
        for trial in ranked:
            folder = Path(tmp) / trial.trial_id
            load_checkpoint_policy_dir(trial.checkpoint, folder)
            candidates.append((f"sweep {result.name} trial {trial.trial_id}", folder))
        return build_and_register(
            candidates,
            cfg.ensemble.members,
            parent_run_id=result.parent_run_id,
            sweep_name=result.name,
            experiment=cfg.mlflow.experiment,
            registered_model=cfg.mlflow.registered_model,
            alias=cfg.ensemble.alias,
            data_path=base.data_path(),
            val_split=base.data.val_split,
        )


def build_and_register(
    candidates: list[tuple[str, Path]],
    count: int,
    *,
    parent_run_id: str | None,
    sweep_name: str,
    experiment: str,
    registered_model: str | None,
    alias: str | None,
    data_path: Path | None,
    val_split: str,
) -> str | None:
    """Select, combine, evaluate on the validation split, log an 'ensemble' run and register it."""
    models, preps, sources, skipped = _select_members(candidates, count)
    for reason in skipped:
        log.warning("ensemble member skipped: %s", reason)
    if len(models) < count:
        raise MobileVLAError(
            f"sweep {sweep_name}: only {len(models)} compatible members for an ensemble of {count}"
            + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
        )
    ensemble, preprocessing = combine_policies(models, preps, sources)
    uri = configure_mlflow()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = {**provenance_tags(), SWEEP_TAG: sweep_name, TRIAL_TAG: ENSEMBLE_TRIAL}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(
        get_or_create_experiment(experiment), run_name=f"{sweep_name}-ensemble", tags=tags
    ).info.run_id
    for index, source in enumerate(sources):
        client.log_param(run_id, f"member_{index}", source)
    client.log_text(run_id, json.dumps(ensemble.config.to_dict(), indent=2), "ensemble/config.json")
    metrics = {}
    if data_path is not None:
        quality = ensemble_quality(ensemble, preprocessing, data_path, val_split)
        metrics = {f"val_{k}": v for k, v in quality.as_metrics().items() if np.isfinite(v)}
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
    version = None
    if registered_model:
        version = register_ensemble(
            ensemble, preprocessing, run_id, name=registered_model, alias=alias, tags={"sweep": sweep_name}
        )
        if "val_ensemble_mae" in metrics:
            log_version_metrics(registered_model, version, {"val_mae": metrics["val_ensemble_mae"]})
    client.set_terminated(run_id, "FINISHED")
    return version


def ensemble_from_sweep(
    sweep_name: str,
    count: int,
    *,
    experiment: str,
    registered_model: str | None,
    alias: str | None,
    metric: str = "val_loss",
    mode: str = "min",
    data_path: str | Path | None = None,
    val_split: str = "val",
) -> str | None:
    """The top `count` trials of an earlier sweep (found in MLflow by its name) as one ensemble version."""
    uri = configure_mlflow()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = get_or_create_experiment(experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}'", max_results=10_000)
    parents = [r for r in runs if r.data.tags.get(TRIAL_TAG) == PARENT_TRIAL]
    if not parents:
        raise ConfigError(f"--from-sweep {sweep_name!r}: no such sweep in MLflow experiment {experiment!r}")
    trials = [r for r in runs if r.data.tags.get(CHECKPOINT_TAG) and f"best_{metric}" in r.data.metrics]
    sign = 1.0 if mode == "min" else -1.0
    trials.sort(key=lambda r: sign * r.data.metrics[f"best_{metric}"])
    with tempfile.TemporaryDirectory() as tmp:
        candidates = []
        for run in trials:
            trial_id = run.data.tags[TRIAL_TAG]
            folder = Path(tmp) / trial_id
            try:
                load_checkpoint_policy_dir(run.data.tags[CHECKPOINT_TAG], folder)
            except (MobileVLAError, OSError) as exc:
                log.warning("trial %s: checkpoint unavailable (%s)", trial_id, exc)
                continue
            candidates.append((f"sweep {sweep_name} trial {trial_id}", folder))
        return build_and_register(
            candidates,
            count,
            parent_run_id=parents[0].info.run_id,
            sweep_name=sweep_name,
            experiment=experiment,
            registered_model=registered_model,
            alias=alias,
            data_path=Path(data_path) if data_path else None,
            val_split=val_split,
        )


def seed_sweep_config(cfg: TuneJobConfig, members: int) -> TuneJobConfig:
    """A tune config training the base preset `members` times with seeds 0..M-1 (no early stopping),
    then combining all of them: the 'different seeds' ensemble.
    """
    data = dump_config(cfg)
    data["search_space"] = {"train.seed": {"grid": list(range(members))}}
    data["tune"].update(search="random", scheduler="fifo", num_samples=1, points_to_evaluate=[])
    data["ensemble"]["members"] = members
    return TuneJobConfig.model_validate(data)
