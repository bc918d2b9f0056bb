"""Closed-loop statistics: a success rate's Wilson interval and SPL against the scripted expert.

    low, high = wilson_interval(successes=41, trials=50)   # (0.69, 0.90): 50 seeds swing by +-10 points
    score = spl([True, True, False], reference=[4.0, 4.0, 5.0], taken=[4.0, 8.0, 2.0])   # 0.5
    auroc = failure_auroc(confidence=[0.9, 0.8, 0.3], failed=[False, False, True])    # 1.0

Wilson rather than the normal ("Wald") interval because policies sit near 0% or 100% success, where
the Wald interval collapses to zero width or leaves [0, 1]. SPL (success weighted by path length,
Anderson et al. 2018, "On Evaluation of Embodied Navigation Agents") uses the scripted expert's path
on the same scene as the reference length: it tells a policy that reaches the target by a detour
from one that drives like the expert, which the success rate alone cannot. `failure_auroc` says how
well LOW confidence flags the episodes that fail: 0.5 is chance, 1.0 every failure below every success.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if successes < 0 or successes > trials:
        raise ValueError(f"successes = {successes}: expected 0 <= successes <= trials = {trials}")
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # Exactly, the interval always holds p; clamping keeps it so at 0% and 100% despite rounding.
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def spl(success: Sequence[bool], reference: Sequence[float], taken: Sequence[float]) -> float:
    """mean_i S_i * l_i / max(p_i, l_i): l = reference (expert) path length, p = the policy's path.

    Episodes without a reference (the expert failed that scene) must be left out by the caller:
    there is no shortest path to compare with. NaN for no episodes.
    """
    if not len(success) == len(reference) == len(taken):
        raise ValueError(f"spl: {len(success)} outcomes, {len(reference)} reference and {len(taken)} path lengths")
    if not len(success):
        return math.nan
    total = 0.0
    for ok, best, path in zip(success, reference, taken, strict=True):
        if best < 0 or path < 0:
            raise ValueError(f"spl: negative path length (reference {best}, taken {path})")
        if ok:
            longest = max(path, best)
            total += best / longest if longest > 0 else 1.0  # started at the target: a perfect path
    return total / len(success)


def mean_or_nan(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (e.g. no failures to average over)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def failure_auroc(confidence: Sequence[float], failed: Sequence[bool]) -> float:
    """AUROC of predicting failure from LOW confidence: P(a failure's confidence < a success's), ties 1/2.

    Episodes without a finite confidence are left out; NaN when what is left lacks a failure or a
    success (the AUROC is undefined), e.g. a policy that reports no confidence, or the expert.
    """
    if len(confidence) != len(failed):
        raise ValueError(f"failure_auroc: {len(confidence)} confidences, {len(failed)} outcomes")
    pairs = [(float(c), bool(f)) for c, f in zip(confidence, failed, strict=True) if c is not None and math.isfinite(c)]
    if len({f for _, f in pairs}) < 2:
        return math.nan
    # Here only: sklearn.metrics takes ~2 s to import, and this module is imported by serving and tracking.
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([f for _, f in pairs], [-c for c, _ in pairs]))
