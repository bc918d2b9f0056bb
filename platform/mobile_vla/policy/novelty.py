"""How unlike the training frames a frame is, and the thresholds of the serving safety ladder, saved
with the model version.

    stats = fit_novelty_stats(train_features)                  # [N, F] pooled vision features
    calibration = SafetyCalibration.calibrate(stats, val_features, val_confidence_now)
    calibration.save(model_dir / "policy")                     # policy/safety_calibration.json
    scores = calibration.stats.score(features)                 # [B, F] -> [B]

Novelty is a Mahalanobis distance under a low-rank Gaussian (probabilistic PCA) of the training
frames' vision features (the pooled CLIP image feature and a coarse pixel layout: model.pixel_layout;
the policy's `step_with_safety` gives them, the same output of the exported graph on every backend):
the top `rank` principal directions keep their own variance, the rest share one residual variance,
and every variance is shrunk towards the average (`shrinkage`, more when there are few frames per dimension).
The squared distance is divided by F, so in-distribution frames score about 1 whatever the feature
width (less with shrinkage); a blank, covered or unfamiliar frame scores far higher.

Calibration (on the validation split, at training time): the slow thresholds are the validation
novelty's `novelty_percentile` (99th) and the executed step's (k=0) confidence `confidence_percentile`
(1st): about 1% of in-distribution steps each would slow. The stop thresholds default to the slow
ones scaled (`STOP_NOVELTY_FACTOR` x, `STOP_CONFIDENCE_FACTOR` x). The serve config may override any
of them (serve/settings.py `SafetyConfig`). A version saved without this file serves with novelty off.

Only numpy here: ONNX-only serving replicas score without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_vla.errors import ModelError

SAFETY_FILE = "safety_calibration.json"  # in the policy/ folder, next to preprocessing/
SAFETY_FORMAT_VERSION = 1
DEFAULT_RANK = 32
NOVELTY_PERCENTILE = 99.0
CONFIDENCE_PERCENTILE = 1.0
STOP_NOVELTY_FACTOR = 2.0
STOP_CONFIDENCE_FACTOR = 0.5
MIN_VARIANCE = 1e-6  # floor of every variance (a constant feature must not divide by zero)


@dataclass(frozen=True)
class NoveltyStats:
    """A low-rank Gaussian of the training frames' vision features (module docstring)."""

    mean: np.ndarray  # [F]
    components: np.ndarray  # [R, F] orthonormal principal directions
    variances: np.ndarray  # [R] variance along each direction
    residual_variance: float  # variance of what the R directions leave, per remaining dimension
    frames: int  # how many frames the statistics came from

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Features [B, F] -> novelty [B]: squared Mahalanobis distance / F (about 1 in distribution)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            width = self.feature_dim
            raise ModelError(f"novelty: features of shape {list(x.shape)}, the statistics have width {width}")
        centred = x - self.mean  # [B, F]
        projected = centred @ self.components.T  # [B, R]
        residual = np.einsum("bf,bf->b", centred, centred) - np.einsum("br,br->b", projected, projected)  # [B]
        distance = (projected**2 / self.variances).sum(axis=1) + np.maximum(residual, 0.0) / self.residual_variance
        return (distance / self.feature_dim).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "variances": self.variances.tolist(),
            "residual_variance": self.residual_variance,
            "frames": self.frames,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> NoveltyStats:
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            components = np.asarray(data["components"], dtype=np.float64).reshape(-1, mean.shape[0])
            variances = np.asarray(data["variances"], dtype=np.float64)
            stats = cls(mean, components, variances, float(data["residual_variance"]), int(data["frames"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: novelty statistics unreadable ({type(exc).__name__}: {exc})") from None
        if mean.ndim != 1 or variances.shape != (components.shape[0],):
            raise ModelError(f"{where}: novelty statistics have inconsistent shapes")
        if not (np.isfinite(mean).all() and (variances > 0).all() and stats.residual_variance > 0):
            raise ModelError(f"{where}: novelty statistics hold non-finite values or non-positive variances")
        return stats


def fit_novelty_stats(features: np.ndarray, rank: int = DEFAULT_RANK, shrinkage: float | None = None) -> NoveltyStats:
    """Features [N, F] of training frames -> their low-rank Gaussian (rank <= min(F, N - 1)).

    Every variance is shrunk towards the mean variance per dimension, (1 - s) * own + s * mean: with fewer
    frames than dimensions the sample covariance is degenerate, and a held-out in-distribution frame
    would score far from frames it resembles along directions the few training frames never varied in.
    `shrinkage` None: s = F / (F + N), more the fewer frames there are per dimension (0.05 for the tiny
    preset's F = 115 over 2048 frames; 0.6 over 64 frames).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ModelError(f"novelty: need at least 2 feature rows [N, F], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ModelError("novelty: training features hold NaN or inf")
    n, width = x.shape
    if shrinkage is None:
        shrinkage = width / (width + n)
    if not 0.0 <= shrinkage <= 1.0:
        raise ModelError(f"novelty: shrinkage = {shrinkage}: expected a value in [0, 1]")
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # singular [min(N, F)], vt [min(N, F), F]
    eigen = singular**2 / (n - 1)  # variance along each principal direction, largest first
    r = max(1, min(rank, width - 1 if width > 1 else 1, n - 1))
    average = eigen.sum() / width  # the mean variance per dimension
    leftover = eigen[r:].sum() / max(width - r, 1)  # residual variance per remaining dimension
    return NoveltyStats(
        mean=mean,
        components=vt[:r],
        variances=np.maximum((1 - shrinkage) * eigen[:r] + shrinkage * average, MIN_VARIANCE),
        residual_variance=float(max((1 - shrinkage) * leftover + shrinkage * average, MIN_VARIANCE)),
        frames=n,
    )


@dataclass(frozen=True)
class SafetyThresholds:
    """Where the ladder slows and stops; None = that rule is off."""

    novelty_slow: float | None = None
    novelty_stop: float | None = None
    confidence_slow: float | None = None
    confidence_stop: float | None = None

    def to_dict(self) -> dict:
        return {
            "novelty_slow": self.novelty_slow,
            "novelty_stop": self.novelty_stop,
            "confidence_slow": self.confidence_slow,
            "confidence_stop": self.confidence_stop,
        }


@dataclass(frozen=True)
class SafetyCalibration:
    """The novelty statistics and the thresholds calibrated on the validation split, for one model version."""

    stats: NoveltyStats
    thresholds: SafetyThresholds
    source: dict  # where it was calibrated: frame counts, splits, percentiles, validation figures

    @classmethod
    def calibrate(
        cls,
        stats: NoveltyStats,
        val_features: np.ndarray,
        val_confidence_now: np.ndarray,
        novelty_percentile: float = NOVELTY_PERCENTILE,
        confidence_percentile: float = CONFIDENCE_PERCENTILE,
        source: dict | None = None,
    ) -> SafetyCalibration:
        """Thresholds from validation frames: features [N, F], the executed step's confidence [N]."""
        novelty = stats.score(val_features)
        confidence = np.asarray(val_confidence_now, dtype=np.float64).reshape(-1)
        if novelty.size == 0 or confidence.size == 0:
            raise ModelError("novelty calibration: no validation frames")
        novelty_slow = float(np.percentile(novelty, novelty_percentile))
        confidence_slow = float(np.percentile(confidence, confidence_percentile))
        thresholds = SafetyThresholds(
            novelty_slow=novelty_slow,
            novelty_stop=novelty_slow * STOP_NOVELTY_FACTOR,
            confidence_slow=confidence_slow,
            confidence_stop=confidence_slow * STOP_CONFIDENCE_FACTOR,
        )
        figures = {
            "train_frames": stats.frames,
            "val_frames": int(novelty.size),
            "novelty_percentile": novelty_percentile,
            "confidence_percentile": confidence_percentile,
            "val_novelty_median": float(np.median(novelty)),
            "val_confidence_now_median": float(np.median(confidence)),
            "rank": int(stats.components.shape[0]),
            "feature_dim": stats.feature_dim,
        }
        return cls(stats=stats, thresholds=thresholds, source={**figures, **(source or {})})

    def save(self, policy_dir: str | Path) -> Path:
        """Writes `policy_dir/safety_calibration.json` (atomically)."""
        path = Path(policy_dir) / SAFETY_FILE
        document = {
            "format_version": SAFETY_FORMAT_VERSION,
            "feature": "pooled CLIP image feature + 4x4 colour layout + channel spread (step output vision_features)",
            "thresholds": self.thresholds.to_dict(),
            "source": self.source,
            "novelty": self.stats.to_dict(),
        }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(document) + "\n")
        os.replace(partial, path)
        return path


def load_safety_calibration(policy_dir: str | Path) -> SafetyCalibration | None:
    """The version's calibration, or None when it was saved without one (novelty off).

    Raises:
        ModelError: the file exists but is unreadable or inconsistent (never silently ignored).
    """
    path = Path(policy_dir) / SAFETY_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format_version") != SAFETY_FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {document.get('format_version')!r}, expected {SAFETY_FORMAT_VERSION}")
    raw = document.get("thresholds") or {}
    try:
        thresholds = SafetyThresholds(**{k: (None if v is None else float(v)) for k, v in raw.items()})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: thresholds unreadable ({exc})") from None
    stats = NoveltyStats.from_dict(document.get("novelty") or {}, str(path))
    return SafetyCalibration(stats=stats, thresholds=thresholds, source=dict(document.get("source") or {}))
