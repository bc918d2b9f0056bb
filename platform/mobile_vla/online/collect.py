"""DAgger through the fleet path: the CURRENT policy drives MiniWorld scenes, the scripted expert
labels every state it visits, and the labels go where a fleet's operator corrections go.

    report = collect("models:/mobile-vla-policy@champion", 50, beta=0.5, data="data/nav")   # in-process
    report = collect(None, 50, beta=0.5, data="data/nav", endpoint="http://127.0.0.1:8000", token=token)
    print(report.summary())
    # then: mobile-vla online-update --config jobs/configs/online_update.yaml replay.data=data/nav

Per step the learner answers (over HTTP `POST /v1/act` against `mobile-vla serve`, one robot client
per episode; or in-process through `runtime.load_backend`), the scripted expert computes its command
in the same state, and with probability `beta` (one seeded draw per step and episode) the expert's
command is executed, else the learner's (`evaluate.rollout.BetaMixPolicy`). Every step becomes one
/v1/feedback record, exactly as docs/http_api.md describes an operator correction: the frame the
learner saw, its state and instruction, `action_executed`, `action_corrected` = the expert's
command, `intervention` = the expert's command was the one executed, and `episode_done` / `success`
on the episode's last step. Over HTTP the records go through `POST /v1/feedback` (the server stores
them); in-process each Ray task checks them with the route's own request model (`FeedbackRequest`),
adds what the route adds (`received_at`, the driving `model`) and appends them to the
`FeedbackStore` at `feedback_dir` (one segment per task process, like one per ingress process; on
a multi-node cluster the folder must be shared). `mobile-vla online-update` then fine-tunes on them.

Scenes: `episodes` distinct scene seeds of `split` (default train) drawn by `seed` from the upper
half of the split's seed range; closed-loop evaluation counts up from the range's start, so the two
never meet unless an evaluation runs more than half a range (50,000 seeds by default). Episodes run
in Ray tasks exactly like evaluation's (`evaluate.tasks.fan_out`, `rollout.run_lockstep`).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from mobile_vla_client import jpeg_base64
from pydantic import ValidationError

from mobile_vla.config import format_validation_error
from mobile_vla.errors import ConfigError, DataError
from mobile_vla.evaluate import EXPERT
from mobile_vla.evaluate.closed_loop import requested_seed_range, split_spec_for
from mobile_vla.evaluate.rollout import (
    SUCCESS,
    TIMEOUT,
    WRONG_TARGET,
    BetaMixPolicy,
    EpisodeRecord,
    HttpPolicy,
    PolicySpec,
    RolloutConfig,
    VisitedStep,
    job_scenes,
    make_policy,
    run_lockstep,
    worker_slots,
)
from mobile_vla.evaluate.tasks import fan_out
from mobile_vla.online.feedback_store import FeedbackStore, feedback_root
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.serve.schemas import FeedbackRequest
from mobile_vla.sim.scenes import CONTROL_HZ
from mobile_vla.sim.split_spec import TRAIN_SPLIT, SplitSpec
from mobile_vla.sim.success import wilson_interval
from mobile_vla.tracking import resolve_model

log = logging.getLogger(__name__)

DEFAULT_BETA = 0.5  # the first DAgger round after behaviour cloning (Ross et al.: beta_i = p^(i-1), p = 0.5)
JPEG_QUALITY = 90  # the frames as a robot client would send them (its default is 85)
EPISODE_PREFIX = "dagger"  # episode (and robot) ids: dagger-<run tag>-<split>-<scene seed>


@dataclass(frozen=True)
class DaggerSettings:
    """What a collect task needs besides the scenes and the learner; travels to every Ray task."""

    beta: float
    seed: int
    run_tag: str  # makes this run's episode ids unique in the feedback store
    feedback_dir: str | None  # in-process: the FeedbackStore root; None: the records go over HTTP
    model: dict[str, str] | None = None  # in-process: the driving version {name, version}, as serving adds it
    jpeg_quality: int = JPEG_QUALITY


# -- scenes -----------------------------------------------------------------------------------------
def dagger_scene_seeds(spec: SplitSpec, split: str, episodes: int, seed: int) -> list[int]:
    """`episodes` distinct scene seeds of `split`, drawn by `seed` from the upper half of its seed range
    (evaluation counts up from the start of the range, so the two stay apart).

    Raises:
        ConfigError: an unknown split, fewer than 1 episode, or more episodes than the half range holds.
    """
    seeds = requested_seed_range(spec, split, episodes, "--seed", seed)
    first = seeds.start + seeds.size // 2
    available = seeds.stop - first
    if episodes > available:
        raise ConfigError(
            f"--episodes {episodes}: split {split!r} leaves {available} seeds to DAgger "
            f"(the upper half [{first}, {seeds.stop}) of its range)"
        )
    rng = np.random.default_rng([seed, seeds.start])
    return [first + int(i) for i in rng.choice(available, size=episodes, replace=False)]


# -- where the records go ---------------------------------------------------------------------------
def feedback_body(episode_id: str, instruction: str, visit: VisitedStep, final: EpisodeRecord | None, quality: int):
    """The /v1/feedback body of one visited step (docs/http_api.md): the expert's command is the
    operator's correction; `intervention` says the expert's command was the one executed.
    """
    return {
        "robot_id": episode_id,
        "episode_id": episode_id,
        "step": visit.step,
        "instruction": instruction,
        "image": jpeg_base64(visit.image, quality),
        "state": [float(v) for v in visit.state],
        "action_executed": [float(v) for v in visit.executed],
        "action_corrected": [float(v) for v in visit.expert_action],
        "intervention": visit.by_expert,
        "episode_done": final is not None,
        "success": None if final is None else final.outcome == SUCCESS,
    }


class StoreFeedback:
    """In-process: each record is checked with the HTTP route's request model, given what the route
    adds (`received_at`, `model`), and appended to this process's segment of the feedback store.
    """

    def __init__(self, policy: BetaMixPolicy, settings: DaggerSettings) -> None:
        self.policy, self.settings = policy, settings
        self.store = FeedbackStore(settings.feedback_dir, repair=False)  # repair is the reader's job
        self.pool = ThreadPoolExecutor(max_workers=8)  # concurrent appends share fsyncs (group commit)
        self.written = 0

    def __call__(self, batch: list[tuple[int, VisitedStep, EpisodeRecord | None]]) -> None:
        records = [self.record(slot, visit, final) for slot, visit, final in batch]
        list(self.pool.map(self.store.append, records))
        self.written += len(records)

    def record(self, slot: int, visit: VisitedStep, final: EpisodeRecord | None) -> dict:
        episode_id, instruction = self.policy.episodes[slot]
        body = feedback_body(episode_id, instruction, visit, final, self.settings.jpeg_quality)
        try:
            record = FeedbackRequest.model_validate(body).model_dump(mode="json")
        except ValidationError as exc:
            raise DataError(f"feedback record {episode_id} step {visit.step}: {format_validation_error(exc)}") from None
        record["received_at"] = time.time()
        if self.settings.model:
            record["model"] = dict(self.settings.model)
        return record

    def close(self) -> None:
        self.pool.shutdown()
        self.store.close()


class HttpFeedback:
    """Over HTTP: each episode's robot client posts its steps to `/v1/feedback`, in order."""

    def __init__(self, policy: BetaMixPolicy, learner: HttpPolicy) -> None:
        self.policy, self.learner = policy, learner
        self.written = 0

    def __call__(self, batch: list[tuple[int, VisitedStep, EpisodeRecord | None]]) -> None:
        if not batch:
            return
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:  # one request per robot, concurrently
            list(pool.map(lambda item: self.post(*item), batch))
        self.written += len(batch)

    def post(self, slot: int, visit: VisitedStep, final: EpisodeRecord | None) -> None:
        client = self.learner.clients[slot]
        if client.step != visit.step:  # the client numbers the steps it reports; they must agree
            raise RuntimeError(f"{client.robot_id}: reporting step {visit.step} but the client is at {client.step}")
        client.feedback(
            visit.image,
            visit.state,
            visit.executed,
            action_corrected=visit.expert_action,
            intervention=visit.by_expert,
            episode_done=final is not None,
            success=None if final is None else final.outcome == SUCCESS,
        )

    def close(self) -> None:
        pass


# -- the Ray task body ------------------------------------------------------------------------------
def collect_episodes(
    jobs: list[tuple[str, int]], spec_json: str, learner: PolicySpec, settings: RolloutConfig, dagger: DaggerSettings
) -> list[dict]:
    """Ray task body: one beta-mixed episode per (split, seed), every step stored as a correction."""
    scenes = job_scenes(jobs, spec_json, settings)
    worlds = worker_slots(scenes[0], settings.obs_size)
    driver = make_policy(learner, settings)
    mixed = BetaMixPolicy(driver, dagger.beta, [(dagger.seed, s.seed) for s in scenes], expert=settings.expert)
    sink = HttpFeedback(mixed, driver) if isinstance(driver, HttpPolicy) else StoreFeedback(mixed, dagger)
    mixed.report = sink  # the sinks name each record after the episode ids the policy was started with
    try:
        records = run_lockstep(worlds, scenes, mixed, settings, episode_prefix=f"{EPISODE_PREFIX}-{dagger.run_tag}")
        mixed.finish(records)
    finally:
        sink.close()
        if isinstance(driver, HttpPolicy):
            driver.close()
    served = driver.served if isinstance(driver, HttpPolicy) else {}
    return [
        {
            "seed": scene.seed,
            "split": scene.split,
            "episode_id": mixed.episodes[slot][0],
            "outcome": record.outcome,
            "steps": record.steps,
            "learner_steps": mixed.learner_steps[slot],
            "expert_steps": mixed.expert_steps[slot],
            "collisions": record.collisions,
            "served_by": sorted(served.get(slot, set())),
        }
        for slot, (scene, record) in enumerate(zip(scenes, records, strict=True))
    ]


# -- the command ------------------------------------------------------------------------------------
@dataclass
class CollectReport:
    """One DAgger collection round: what drove, where the corrections went, and every episode."""

    model: str  # the URI or folder that drove, or the endpoint
    model_version: str | None  # name/version (in-process) or what the server answered as (HTTP)
    split: str
    beta: float
    seed: int
    run_tag: str
    feedback: str  # the store folder (in-process) or the endpoint's /v1/feedback
    episodes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return sum(e["steps"] for e in self.episodes)

    @property
    def learner_steps(self) -> int:
        """Steps that executed the policy's own command (the rest executed the expert's)."""
        return sum(e["learner_steps"] for e in self.episodes)

    @property
    def corrections(self) -> int:
        """Records written: one expert-labelled correction per visited step."""
        return self.steps

    def outcome_rate(self, outcome: str) -> float:
        return sum(e["outcome"] == outcome for e in self.episodes) / len(self.episodes) if self.episodes else math.nan

    def summary(self) -> str:
        """A few lines for people: what drove, how it went, how many corrections were written where."""
        n = len(self.episodes)
        successes = sum(e["outcome"] == SUCCESS for e in self.episodes)
        low, high = wilson_interval(successes, n)
        share = self.learner_steps / self.steps if self.steps else math.nan
        return "\n".join(
            [
                f"collect: {n} episodes of split {self.split} driven by {self.model_version or self.model} "
                f"(beta {self.beta:g}, seed {self.seed}, run {self.run_tag}) in {self.seconds:.0f} s",
                f"  steps: {self.steps}, policy-controlled {self.learner_steps} ({share:.1%}), "
                f"expert-controlled {self.steps - self.learner_steps}",
                f"  driven episodes: success {successes / n:.1%} [{low:.1%}, {high:.1%}], "
                f"wrong target {self.outcome_rate(WRONG_TARGET):.1%}, timeout {self.outcome_rate(TIMEOUT):.1%}, "
                f"with a collision {sum(e['collisions'] > 0 for e in self.episodes) / n:.1%}",
                f"  corrections written: {self.corrections} (every visited step, labelled by the expert) -> "
                f"{self.feedback}",
            ]
        )


def _control_hz(model_dir: Path | None) -> float:
    """The control rate the model was trained at (its saved preprocessing), else the simulator's."""
    if model_dir is None or not (model_dir / "policy" / "preprocessing").is_dir():
        return CONTROL_HZ
    return Preprocessing.load(model_dir / "policy" / "preprocessing", with_tokenizer=False).control_hz


def collect(  # noqa: PLR0913 (the keyword-only options of `mobile-vla collect`)
    model: str | Path | None,
    episodes: int,
    *,
    beta: float = DEFAULT_BETA,
    split: str = TRAIN_SPLIT,
    data: str | Path | None = None,
    spec: SplitSpec | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    feedback_dir: str | Path | None = None,
    seed: int = 0,
    prefer: tuple[str, ...] = (),
    episodes_per_task: int = 8,
    max_steps: int | None = None,
    run_tag: str | None = None,
    progress: bool = True,
) -> CollectReport:
    """One DAgger round: `episodes` beta-mixed episodes on `split`, every visited step stored as an
    expert correction (see the module docstring). In-process with `model` (a models:/ URI or model
    folder) into `feedback_dir` (default `feedback_root()`), or through the server at
    `endpoint` (its model drives, its feedback store keeps the records).

    Raises:
        ConfigError: bad options (the message names the option and value).
        ModelError: the model cannot be resolved or loaded.
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ConfigError(f"--beta {beta!r}: expected a probability in [0, 1]")
    if episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task {episodes_per_task}: expected at least 1")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: expected at least 1")
    if model is not None and str(model) == EXPERT:
        raise ConfigError("--model expert: DAgger needs a learned policy to drive (the expert labels)")
    spec = spec if spec is not None else split_spec_for(data)
    seeds = dagger_scene_seeds(spec, split, episodes, seed)
    if split != TRAIN_SPLIT:
        log.warning("collecting on split %r: its scenes become training data (no longer held out)", split)
    run_tag = run_tag or f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"

    resolved = resolve_model(model) if model is not None else None
    if endpoint:
        if not token:
            raise ConfigError(f"--endpoint {endpoint}: an API token is needed (--token-file)")
        if feedback_dir is not None:
            raise ConfigError(f"--feedback-dir {feedback_dir}: with --endpoint the server stores the feedback")
        learner = PolicySpec("http", endpoint=endpoint, token=token)
        dagger = DaggerSettings(beta, seed, run_tag, feedback_dir=None)
        where = f"{endpoint.rstrip('/')}/v1/feedback"
    else:
        if resolved is None:
            raise ConfigError("--model MODEL_URI is required in-process (or --endpoint URL for the served model)")
        learner = PolicySpec("model", model_path=str(resolved.path), model_uri=str(model), prefer=tuple(prefer))
        root = feedback_root(feedback_dir)
        version = {"name": resolved.name, "version": resolved.version} if resolved.version else None
        dagger = DaggerSettings(beta, seed, run_tag, feedback_dir=str(root.resolve()), model=version)
        where = str(root)
    hz = _control_hz(resolved.path if resolved else None)
    settings = RolloutConfig(control_hz=hz, max_steps=max_steps)

    started = time.time()
    jobs = [(split, s) for s in seeds]
    chunks = [jobs[i : i + episodes_per_task] for i in range(0, len(jobs), episodes_per_task)]
    rows = fan_out(
        collect_episodes, chunks, (spec.model_dump_json(), learner, settings, dagger), f"dagger {split}", progress
    )
    order = {s: i for i, s in enumerate(seeds)}
    rows.sort(key=lambda r: order[r["seed"]])
    served = sorted({s for r in rows for s in r.pop("served_by")})
    if endpoint:  # what the server answered as, whatever --model said
        driven_by = ", ".join(served) or None
    else:
        driven_by = f"{resolved.name}/{resolved.version}" if resolved.version else None
    report = CollectReport(
        model=str(model) if model is not None else str(endpoint),
        model_version=driven_by,
        split=split,
        beta=float(beta),
        seed=seed,
        run_tag=run_tag,
        feedback=where,
        episodes=rows,
        seconds=time.time() - started,
    )
    log.info("collect: %d corrections from %d episodes -> %s", report.corrections, len(rows), where)
    return report
