"""Closed-loop evaluation in MiniWorld: a policy drives the robot on a named split's scene seeds,
next to the scripted expert on exactly the same scenes.

    report = evaluate_closed_loop("models:/mobile-vla-policy@challenger", "unseen_pair", episodes=200)
    report = evaluate_closed_loop("expert", "unseen_layout", episodes=200)       # the teacher itself
    report.policy.success_rate, report.policy.success_low, report.expert.success_rate
    folder = save_closed_loop(report, out_dir)   # JSON, trajectory plot, confidence histogram, GIFs
    log_closed_loop(report, folder)              # version metrics + artifacts under evaluation/<split>/

Seeds: episode `i` of a split is scene seed `splits.<split>.seeds.start + seed_offset + i`, so two
evaluations with the same split, episode count and offset see the same scenes, whatever the model,
the number of Ray tasks or the order they finish in. The split spec comes from the dataset the
model was trained on (`data=`: its manifest records the spec) so that held-out colour x shape
pairs, templates and layouts really are held out; without it the default spec is used.

Diagnostics (issue 15): `memory_reset_every=N` resets the policy's LSTM memory to zero before
every N-th step ("window": N = the model's training window W), so closed loop carries no memory
older than training ever did: the success gained or lost against the plain run measures the memory
skew. The `val` split's seeds are in-distribution (training layouts, colour x shape pairs and
templates; never trained on): closed loop there next to the held-out splits separates "cannot
drive" from "cannot generalise". Every report records `in_distribution` (the split spec's
`is_held_out`), `memory_reset_every` and the model's `state_input` in its settings.

Safety ladder (issue 18, `safety_ladder=SafetyConfig()` or `--safety-ladder`): the model drives every
seed twice, without and with the serving ladder (rollout.SafetyLadderPolicy), so `report.safety_ladder`
and `safety_ladder_comparison(...)` compare the two on the same seeds: success, collisions per episode,
episodes with a collision, handovers (a new outcome, neither success nor collision) and the share of
steps slowed and stopped. `report.policy` stays the plain run (what the promotion gate reads).

Episodes are spread over Ray tasks (`episodes_per_task` per task, stepped in lockstep so a model
predicts for all of them in one batch; see `rollout.py` for the episode rules). Ray: the running
cluster, `RAY_ADDRESS`, or a local `ray.init()`. Use >= 200 episodes to compare policies: 50 seeds
swing by about +-7 points, which is what the Wilson interval in every report says.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from mobile_vla.config import platform_home
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate import EXPERT, plots
from mobile_vla.evaluate.rollout import (
    HANDOVER,
    SUCCESS,
    TIMEOUT,
    WRONG_TARGET,
    PolicySpec,
    RolloutConfig,
    rollout_seeds,
)
from mobile_vla.evaluate.tasks import fan_out, jsonable
from mobile_vla.policy.config import PREVIOUS_COMMAND
from mobile_vla.serve.safety import SLOW, STOP
from mobile_vla.serve.settings import SafetyConfig
from mobile_vla.sim.split_spec import SplitSpec, default_split_spec, load_split_spec
from mobile_vla.sim.success import failure_auroc, mean_or_nan, spl, wilson_interval
from mobile_vla.tracking import CHAMPION, configure_mlflow, log_version_metrics, resolve_model, set_version_tags
from mobile_vla.tracking.model_card import refresh_model_card

log = logging.getLogger(__name__)

EVALUATION_ARTIFACTS = "evaluation"  # artifacts land in evaluation/<split>/ of the version's run
PRIMARY_KEYS = ("success_rate", "episodes", "collision_rate", "spl", "wrong_target")  # unqualified gate keys
OUTCOMES = (SUCCESS, WRONG_TARGET, TIMEOUT)
MEMORY_RESET_WINDOW = "window"  # --memory-reset-every window: the model's training window W
IN_DISTRIBUTION_SPLIT = "val"  # closed loop's in-distribution seeds (the val split's scene pool)
# closed_loop.<split>.ladder_<name>: the run with the safety ladder applied
LADDER_KEYS = (
    "success_rate",
    "collisions_per_episode",
    "collision_rate",
    "timeout",
    "handover_rate",
    "slowed_share",
    "stopped_share",
)


@dataclass
class PolicySummary:
    """One policy's results on a set of seeds. Rates are fractions of episodes."""

    episodes: int
    successes: int
    success_rate: float
    success_low: float  # Wilson 95%
    success_high: float
    wrong_target_rate: float
    timeout_rate: float
    spl: float  # against the expert, over the seeds the expert solved (spl_episodes of them)
    spl_episodes: int
    collisions_per_episode: float
    collision_rate: float  # episodes with at least one refused (colliding) move
    mean_steps: float
    confidence_success: float  # mean per-episode confidence; NaN when none (or no confidence, e.g. the expert)
    confidence_failure: float
    # AUROC of predicting an episode's failure from its LOW mean confidence (0.5 chance, 1 perfect);
    # NaN without confidence or without both successes and failures
    failure_auroc: float
    # outcome x collision: episodes per outcome that had a refused (colliding) move or not, e.g.
    # {"timeout": {"collided": 40, "no_collision": 8}, ...}: a timeout after a collision is a robot
    # that pushed into an obstacle until the step limit
    collisions_by_outcome: dict[str, dict[str, int]] = field(default_factory=dict)
    # with the safety ladder applied (rows carry `safety_levels`; NaN shares without it): episodes handed
    # over to an operator, and the share of all steps the ladder slowed / stopped (stop + handover)
    handover_rate: float = 0.0
    slowed_share: float = math.nan
    stopped_share: float = math.nan

    @classmethod
    def from_rows(cls, rows: list[dict], reference: list[dict]) -> PolicySummary:
        """The summary of `rows` (one per episode); SPL against the `reference` (expert) rows."""
        n = len(rows)
        successes = sum(r["outcome"] == SUCCESS for r in rows)
        low, high = wilson_interval(successes, n)
        solved = [(r, e) for r, e in zip(rows, reference, strict=True) if e["outcome"] == SUCCESS]
        levels = [r["safety_levels"] for r in rows if r.get("safety_levels") is not None]
        ladder_steps = sum(sum(counts.values()) for counts in levels)
        outcomes = OUTCOMES + ((HANDOVER,) if levels else ())
        return cls(
            episodes=n,
            successes=successes,
            success_rate=successes / n if n else math.nan,
            success_low=low,
            success_high=high,
            wrong_target_rate=sum(r["outcome"] == WRONG_TARGET for r in rows) / n if n else math.nan,
            timeout_rate=sum(r["outcome"] == TIMEOUT for r in rows) / n if n else math.nan,
            spl=spl(
                [r["outcome"] == SUCCESS for r, _ in solved],
                [e["path_length"] for _, e in solved],
                [r["path_length"] for r, _ in solved],
            ),
            spl_episodes=len(solved),
            collisions_per_episode=float(np.mean([r["collisions"] for r in rows])) if n else math.nan,
            collision_rate=sum(r["collisions"] > 0 for r in rows) / n if n else math.nan,
            mean_steps=float(np.mean([r["steps"] for r in rows])) if n else math.nan,
            confidence_success=mean_or_nan([r["mean_confidence"] for r in rows if r["outcome"] == SUCCESS]),
            confidence_failure=mean_or_nan([r["mean_confidence"] for r in rows if r["outcome"] != SUCCESS]),
            failure_auroc=failure_auroc([r["mean_confidence"] for r in rows], [r["outcome"] != SUCCESS for r in rows]),
            collisions_by_outcome={
                outcome: {
                    "collided": sum(r["outcome"] == outcome and r["collisions"] > 0 for r in rows),
                    "no_collision": sum(r["outcome"] == outcome and r["collisions"] == 0 for r in rows),
                }
                for outcome in outcomes
            },
            handover_rate=sum(r["outcome"] == HANDOVER for r in rows) / n if n else math.nan,
            slowed_share=sum(c[SLOW] for c in levels) / ladder_steps if ladder_steps else math.nan,
            stopped_share=sum(c[STOP] + c[HANDOVER] for c in levels) / ladder_steps if ladder_steps else math.nan,
        )


@dataclass
class ClosedLoopReport:
    """One closed-loop evaluation: the policy's and the expert's summaries, every episode, settings."""

    split: str
    model: str  # the URI or folder evaluated, or "expert"
    model_name: str | None
    model_version: str | None
    run_id: str | None  # the version's source run (where artifacts are logged)
    seeds: list[int]
    policy: PolicySummary
    expert: PolicySummary  # the scripted expert on the same seeds
    episodes: list[dict]  # per episode: seed, outcome, steps, path_length, trajectory, expert {...}, scene
    settings: dict[str, Any]
    seconds: float
    worker_cpu_seconds: float = 0.0  # CPU the Ray tasks spent (simulation, rendering, the model): load-independent
    served_by: list[str] = field(default_factory=list)  # HTTP: the model versions and backends that answered
    frames: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # seed -> uint8 [N, H, W, 3]
    safety_ladder: PolicySummary | None = None  # the policy again, the serving ladder applied (same seeds)

    def metrics(self, primary: bool = True) -> dict[str, float]:
        """`closed_loop.<split>.<name>` for the policy and `...expert_<name>` for the expert; with
        `primary`, also the unqualified `closed_loop.<name>` keys the promotion gate reads.
        """
        prefix = f"closed_loop.{self.split}."
        out = {}
        for name, value in _summary_metrics(self.policy).items():
            out[prefix + name] = value
        for name in ("success_rate", "success_low", "success_high", "collision_rate", "mean_steps"):
            out[f"{prefix}expert_{name}"] = float(getattr(self.expert, name))
        if self.safety_ladder is not None:
            ladder = _summary_metrics(self.safety_ladder)
            for name in LADDER_KEYS:
                out[f"{prefix}ladder_{name}"] = float(ladder.get(name, getattr(self.safety_ladder, name, math.nan)))
        if primary:
            out.update({f"closed_loop.{name}": out[prefix + name] for name in PRIMARY_KEYS if prefix + name in out})
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def to_dict(self) -> dict:
        episodes = [{k: jsonable(v) for k, v in row.items() if k != "frames"} for row in self.episodes]
        return {
            "split": self.split,
            "model": self.model,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "seeds": [self.seeds[0], self.seeds[-1] + 1] if self.seeds else [],
            "policy": jsonable(asdict(self.policy)),
            "expert": jsonable(asdict(self.expert)),
            "settings": jsonable(self.settings),
            "seconds": round(self.seconds, 2),
            "worker_cpu_seconds": round(self.worker_cpu_seconds, 2),
            "served_by": self.served_by,
            "safety_ladder": jsonable(asdict(self.safety_ladder)) if self.safety_ladder is not None else None,
            "safety_ladder_comparison": safety_ladder_comparison(self.episodes) if self.safety_ladder else None,
            "metrics": self.metrics(),
            "episodes": episodes,
        }


def _summary_metrics(summary: PolicySummary) -> dict[str, float]:
    return {
        "success_rate": summary.success_rate,
        "success_low": summary.success_low,
        "success_high": summary.success_high,
        "episodes": float(summary.episodes),
        "wrong_target": summary.wrong_target_rate,
        "timeout": summary.timeout_rate,
        "spl": summary.spl,
        "collision_rate": summary.collision_rate,
        "collisions_per_episode": summary.collisions_per_episode,
        "mean_steps": summary.mean_steps,
        "confidence_success": summary.confidence_success,
        "confidence_failure": summary.confidence_failure,
        "failure_auroc": summary.failure_auroc,
        # the dominant failure: pushed into an obstacle until the step limit
        "collided_timeout": (
            summary.collisions_by_outcome[TIMEOUT]["collided"] / summary.episodes if summary.episodes else math.nan
        ),
    }


def safety_ladder_comparison(rows: list[dict]) -> dict:
    """The policy without and with the safety ladder on the same seeds (rows carrying `safety_ladder`),
    paired per seed: success and collisions of each, their differences (ladder minus none), the seeds
    whose success was gained or lost and whose collisions fell or rose with the ladder. JSON-ready.
    """
    pairs = [(r, r["safety_ladder"]) for r in rows if r.get("safety_ladder") is not None]
    n = len(pairs)
    if not n:
        return {"episodes": 0}
    plain = PolicySummary.from_rows([p for p, _ in pairs], [p["expert"] for p, _ in pairs])
    safe = PolicySummary.from_rows([s for _, s in pairs], [p["expert"] for p, _ in pairs])

    def side(summary: PolicySummary) -> dict:
        keys = ("success_rate", "collisions_per_episode", "collision_rate", "timeout_rate", "handover_rate")
        return {k: getattr(summary, k) for k in (*keys, "slowed_share", "stopped_share")}

    return jsonable(
        {
            "episodes": n,
            "no_ladder": side(plain),
            "ladder": side(safe),
            "success_difference": safe.success_rate - plain.success_rate,
            "collisions_per_episode_difference": safe.collisions_per_episode - plain.collisions_per_episode,
            "success_gained": sum(s["outcome"] == SUCCESS and p["outcome"] != SUCCESS for p, s in pairs),
            "success_lost": sum(p["outcome"] == SUCCESS and s["outcome"] != SUCCESS for p, s in pairs),
            "collisions_fewer": sum(s["collisions"] < p["collisions"] for p, s in pairs),
            "collisions_more": sum(s["collisions"] > p["collisions"] for p, s in pairs),
        }
    )


# -- what to evaluate -------------------------------------------------------------------------------
def split_spec_for(data: str | Path | None = None, spec_file: str | Path | None = None):
    """The split spec a dataset was generated with (held-out pairs, templates, layouts), a spec
    file, or the defaults.
    """
    if spec_file is not None:
        return load_split_spec(spec_file)
    if data is not None:
        recorded = (load_manifest(data).get("generator") or {}).get("split_spec")
        if recorded:
            try:
                return SplitSpec.model_validate(recorded)
            except Exception as exc:
                raise ConfigError(f"{data}/manifest.json: generator.split_spec is invalid: {exc}") from None
        log.warning("%s: manifest records no split spec (imported data?); using the default one", data)
    return default_split_spec()


def requested_seed_range(spec: SplitSpec, split: str, episodes: int, seed_flag: str, seed: int):
    """The seed range of `split` for a request of `episodes` episodes (closed loop, DAgger collection).

    Raises:
        ConfigError: an unknown split, fewer than 1 episode, or a negative `seed_flag` value.
    """
    if split not in spec.splits:
        raise ConfigError(f"--split {split!r}: not in the split spec (has {sorted(spec.splits)})")
    if episodes < 1:
        raise ConfigError(f"--episodes {episodes}: expected at least 1")
    if seed < 0:
        raise ConfigError(f"{seed_flag} {seed}: expected >= 0")
    return spec.splits[split].seeds


def scene_seeds(spec: SplitSpec, split: str, episodes: int, seed_offset: int = 0) -> list[int]:
    """The scene seeds of `episodes` episodes of `split` from `seed_offset`; ConfigError if out of range."""
    seeds = requested_seed_range(spec, split, episodes, "--seed-offset", seed_offset)
    start = seeds.start + seed_offset
    if start + episodes > seeds.stop:
        raise ConfigError(
            f"--episodes {episodes} from --seed-offset {seed_offset}: split {split!r} has only "
            f"{seeds.size} seeds [{seeds.start}, {seeds.stop})"
        )
    return list(range(start, start + episodes))


def _saved_preprocessing(model_dir: Path | None) -> dict:
    """The model's saved preprocessing.json as a dict ({} when there is none or it is unreadable)."""
    if model_dir is None:
        return {}
    path = model_dir / "policy" / "preprocessing" / "preprocessing.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _control_hz(model_dir: Path | None) -> float | None:
    """The control rate the model was trained at (its saved preprocessing), if it says."""
    try:
        return float(_saved_preprocessing(model_dir)["control_hz"])
    except (KeyError, ValueError, TypeError):
        return None


def memory_reset_steps(every: int | str | None, model_dir: Path | None) -> int | None:
    """`--memory-reset-every` as a number of steps: an int >= 1, "window" (the model's training window
    W, from its saved preprocessing) or None (never reset).

    Raises:
        ConfigError: a bad value, or "window" without a model folder that records W.
    """
    if every is None:
        return None
    if every == MEMORY_RESET_WINDOW:
        window = _saved_preprocessing(model_dir).get("window")
        if not isinstance(window, int) or window < 1:
            where = model_dir or "the served model (no --model)"
            raise ConfigError(
                f"--memory-reset-every window: {where} records no training window: give a number of steps"
            )
        return window
    try:
        steps = int(every)
    except (TypeError, ValueError):
        steps = 0
    if isinstance(every, bool) or steps < 1 or str(steps) != str(every).strip():
        raise ConfigError(f"--memory-reset-every {every!r}: expected a whole number of steps >= 1 or 'window'")
    return steps


# -- the evaluation ---------------------------------------------------------------------------------
def evaluate_closed_loop(  # noqa: PLR0913 (the keyword-only options of `mobile-vla evaluate`)
    model: str | Path | None,
    split: str,
    episodes: int,
    seed_offset: int = 0,
    *,
    spec=None,
    data: str | Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    prefer: tuple[str, ...] = (),
    precision: str = "fp32",
    episodes_per_task: int = 8,
    max_steps: int | None = None,
    control_hz: float | None = None,
    record_frames: int = 4,
    num_gpus: float = 0,
    memory_reset_every: int | str | None = None,
    safety_ladder: SafetyConfig | bool | None = None,
    chunk_ensemble: float | None = None,
    progress: bool = True,
) -> ClosedLoopReport:
    """Runs `model` ("expert", a models:/ URI or a model folder; or the server at `endpoint`) on
    `episodes` scene seeds of `split`, and the scripted expert on the same seeds. With
    `memory_reset_every` (steps, or "window": the model's W) the policy's memory is reset to zero
    before every N-th step of an episode (see the module doc). With `safety_ladder` (True: the serve
    defaults, thresholds from the version's calibration; or a SafetyConfig) the model also drives the
    same seeds with the serving ladder applied (`report.safety_ladder`). With `chunk_ensemble` (a decay
    m >= 0) the model executes the temporal ensemble of its overlapping chunks (evaluate/rollout.py).
    """
    if episodes_per_task < 1:
        raise ConfigError(f"episodes_per_task = {episodes_per_task}: expected at least 1")
    spec = spec if spec is not None else split_spec_for(data)
    seeds = scene_seeds(spec, split, episodes, seed_offset)

    resolved = None
    if endpoint:
        if not token:
            raise ConfigError(f"--endpoint {endpoint}: an API token is needed (--token-file)")
        policy = PolicySpec("http", endpoint=endpoint, token=token)
        if model and str(model) != EXPERT:
            resolved = resolve_model(model)  # only to know which version the results belong to
    elif model is None or str(model) == EXPERT:
        policy = PolicySpec.expert()
    else:
        resolved = resolve_model(model)
        policy = PolicySpec(
            "model", model_path=str(resolved.path), model_uri=str(model), prefer=tuple(prefer), precision=precision
        )
    model_dir = resolved.path if resolved else None
    ladder = SafetyConfig() if safety_ladder is True else (safety_ladder or None)
    if ladder is not None and policy.kind != "model":
        raise ConfigError(
            "--safety-ladder applies the serving ladder to a model run in-process: give --model MODEL_URI "
            "(not the expert; a server at --endpoint applies its own ladder to its answers)"
        )
    if chunk_ensemble is not None and policy.kind != "model":
        raise ConfigError(
            "--chunk-ensemble blends the chunks of a model run in-process: give --model MODEL_URI "
            "(not the expert; a server at --endpoint answers one chunk per request)"
        )
    hz = control_hz or _control_hz(model_dir) or 5.0
    reset_every = memory_reset_steps(memory_reset_every, model_dir) if policy.kind != "expert" else None
    settings = RolloutConfig(
        control_hz=hz,
        max_steps=max_steps,
        record_frames=tuple(seeds[: max(record_frames, 0)]),
        memory_reset_every=reset_every,
        safety_ladder=ladder,
        chunk_ensemble=chunk_ensemble,
    )

    started = time.time()
    chunks = [[(split, s) for s in seeds[i : i + episodes_per_task]] for i in range(0, len(seeds), episodes_per_task)]
    rows = fan_out(
        rollout_seeds, chunks, (spec.model_dump_json(), policy, settings), f"closed loop {split}", progress, num_gpus
    )
    rows.sort(key=lambda r: r["seed"])
    frames = {r["seed"]: r.pop("frames") for r in rows if r.get("frames") is not None}
    for r in rows:
        r.pop("frames", None)
    served_by = sorted({s for r in rows for s in r.pop("served_by", [])})
    laddered = [r["safety_ladder"] for r in rows if r.get("safety_ladder") is not None]
    limits = next((r.pop("limits", None) for r in laddered), None)
    for r in laddered:
        r.pop("limits", None)
        r.pop("served_by", None)
    report = ClosedLoopReport(
        split=split,
        model=str(model) if model is not None else (endpoint or EXPERT),
        model_name=resolved.name if resolved else None,
        model_version=resolved.version if resolved else None,
        run_id=resolved.run_id if resolved else None,
        seeds=seeds,
        policy=PolicySummary.from_rows(rows, [r["expert"] for r in rows]),
        expert=PolicySummary.from_rows([r["expert"] for r in rows], [r["expert"] for r in rows]),
        episodes=rows,
        settings={
            "seed_offset": seed_offset,
            "episodes_per_task": episodes_per_task,
            "control_hz": hz,
            "max_steps": max_steps,
            "policy": policy.kind,
            "prefer": list(prefer),
            "precision": policy.precision,
            "endpoint": endpoint,
            "split_spec": spec.splits[split].model_dump(mode="json"),
            # val: training layouts, pairs and templates (never trained on); else a held-out split
            "in_distribution": not spec.is_held_out(split),
            "memory_reset_every": reset_every,
            "memory_reset_requested": memory_reset_every,  # e.g. "window", resolved to the number above
            "state_input": _saved_preprocessing(model_dir).get("state_input", PREVIOUS_COMMAND) if model_dir else None,
            "safety_ladder": ladder.model_dump(mode="json") if ladder is not None else None,
            "safety_limits": limits,  # the thresholds in force (config over the version's calibration)
            "chunk_ensemble": chunk_ensemble,  # decay of temporal chunk ensembling; None: actions[:, 0]
        },
        seconds=time.time() - started,
        worker_cpu_seconds=float(sum(r.get("cpu_seconds", 0.0) for r in rows)),
        served_by=served_by,
        frames=frames,
        safety_ladder=PolicySummary.from_rows(laddered, [r["expert"] for r in rows]) if laddered else None,
    )
    log.info(
        "closed loop %s on %s: success %.3f [%.3f, %.3f] (expert %.3f) over %d episodes in %.0f s",
        report.model,
        split,
        report.policy.success_rate,
        report.policy.success_low,
        report.policy.success_high,
        report.expert.success_rate,
        len(seeds),
        report.seconds,
    )
    return report


def split_comparison(reports: list[ClosedLoopReport]) -> dict:
    """In-distribution (val) next to held-out closed loop: per split its success, and pooled over each
    kind with the gap between them (positive: the policy drives where it was trained and fails to
    generalise; both low: it cannot drive in closed loop at all). JSON-ready (NaN as null).
    """
    splits, pooled = {}, {True: [0, 0], False: [0, 0]}  # in_distribution -> [successes, episodes]
    for report in reports:
        inside = bool(report.settings.get("in_distribution"))
        p = report.policy
        splits[report.split] = {
            "in_distribution": inside,
            "episodes": p.episodes,
            "success_rate": p.success_rate,
            "success_low": p.success_low,
            "success_high": p.success_high,
            "expert_success_rate": report.expert.success_rate,
            "timeout_rate": p.timeout_rate,
            "collision_rate": p.collision_rate,
            "memory_reset_every": report.settings.get("memory_reset_every"),
        }
        pooled[inside][0] += p.successes
        pooled[inside][1] += p.episodes
    rate = {k: (s / n if n else math.nan) for k, (s, n) in pooled.items()}
    return jsonable(
        {
            "splits": splits,
            "in_distribution_success": rate[True],
            "held_out_success": rate[False],
            "generalisation_gap": rate[True] - rate[False],
        }
    )


# -- results on disk and in MLflow ------------------------------------------------------------------
def default_out_dir(label: str) -> Path:
    """`<home>/evaluations/<label, file-safe>/<UTC time>`: where results go when no --out is given."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[-80:]
    return platform_home() / "evaluations" / safe / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def save_closed_loop(report: ClosedLoopReport, out_dir: str | Path, gifs: int = 4) -> list[Path]:
    """Writes `<out_dir>/<split>/`: closed_loop.json, trajectories.png, confidence.png, episode GIFs."""
    folder = Path(out_dir) / report.split
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "closed_loop.json"]
    files[0].write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    files.append(plots.save_figure(plots.trajectories(report), folder / "trajectories.png"))
    if math.isfinite(report.policy.confidence_success) or math.isfinite(report.policy.confidence_failure):
        files.append(plots.save_figure(plots.confidence_histogram(report.episodes), folder / "confidence.png"))
    outcome = {r["seed"]: r["outcome"] for r in report.episodes}
    for seed in list(report.frames)[:gifs]:
        path = folder / f"episode_{seed}_{outcome[seed]}.gif"
        files.append(plots.write_gif(report.frames[seed], path, report.settings["control_hz"]))
    return files


def save_split_comparison(reports: list[ClosedLoopReport], out_dir: str | Path) -> Path:
    """Writes `<out_dir>/closed_loop_splits.json` (`split_comparison`) and returns its path."""
    path = Path(out_dir) / "closed_loop_splits.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split_comparison(reports), indent=1) + "\n")
    return path


def log_to_version(
    name: str,
    version: str,
    run_id: str | None,
    metrics: dict[str, float],
    files: list[Path],
    split: str,
    tags: dict[str, str] | None = None,
) -> None:
    """Metrics as version tags (+ source-run metrics), files under `evaluation/<split>/` of its run; then
    the version's model card is rewritten with them (tracking/model_card.py).
    """
    configure_mlflow()
    log_version_metrics(name, version, metrics, refresh_card=False)
    if tags:
        set_version_tags(name, version, tags)
    client = MlflowClient()
    run_id = run_id or client.get_model_version(name, str(version)).run_id
    for path in files if run_id else []:
        client.log_artifact(run_id, str(path), f"{EVALUATION_ARTIFACTS}/{split}")
    refresh_model_card(name, str(version), champion_alias=CHAMPION)


def log_closed_loop(report: ClosedLoopReport, files: list[Path], primary: bool = True) -> bool:
    """Logs to the evaluated model version (with `primary`, also the gate's unqualified keys);
    False (and a warning) when there is no version to log to.
    """
    folder = files[0].parent if files else None
    if not (report.model_name and report.model_version):
        log.warning("%s is not a registered model version: results stay in %s", report.model, folder)
        return False
    answered = {s.split(" ")[0] for s in report.served_by}
    expected = f"{report.model_name}/{report.model_version}"
    if answered and answered != {expected}:
        log.warning("the server answered as %s, not %s: results stay in %s", sorted(answered), expected, folder)
        return False
    tags = {
        "evaluation.closed_loop.split": report.split,
        "evaluation.closed_loop.seeds": f"[{report.seeds[0]}, {report.seeds[-1] + 1})",
    }
    log_to_version(
        report.model_name, report.model_version, report.run_id, report.metrics(primary), files, report.split, tags
    )
    return True


def evaluate_model_version(name: str, version: str, split: str, episodes: int, **kwargs) -> dict[str, float]:
    """For other stages (online update, promotion): evaluate `models:/name/version` closed-loop, store
    the results on the version, return its metrics (with the gate's unqualified keys).
    """
    kwargs.setdefault("progress", False)
    report = evaluate_closed_loop(f"models:/{name}/{version}", split, episodes, **kwargs)
    log_closed_loop(report, save_closed_loop(report, default_out_dir(f"{name}-v{version}")))
    return report.metrics()
