"""Worker side of closed-loop evaluation: several MiniWorld episodes stepped in lockstep in one process,
so a learned policy answers all of them with one batched predict call per control step.

    records = rollout_seeds([("unseen_pair", 3000000), ...], spec_json, PolicySpec.for_model(path), settings)

The task bodies run inside Ray tasks only (they open a GL context; see `mobile_vla.sim.navigation_env`,
imported by `worker_slots` alone, after triton). Per step
the policy sees each episode's current frame, its state and the instruction. The state is what the
model's saved preprocessing names (`state_input`, as its training windows built it): the command
executed at the previous step, or with "measured_velocity" the velocity the base realised then
(`sim.scenes.realised_velocity`: no translation after a refused move); zeros at the start. The
robot executes `actions[:, 0]` of the predicted chunk
and the policy plans again from the next frame (receding horizon: the rest of the chunk is never
executed open-loop, so every command reacts to the latest frame and LSTM memory). An episode ends
at the first step where MiniWorld's `near()` holds for the target (success) or for a distractor
(wrong target: the robot drove to the wrong object), or after the scene's `max_steps` (timeout).
A colliding move is refused whole by MiniWorld; it counts as a collision and the robot stays put.

`RolloutConfig.memory_reset_every` = N (a diagnostic): the policy's recurrent memory is reset to
zero before every N-th step of an episode (steps N, 2N, ...; the state input is kept), so with N = the
training window W the LSTM never carries memory older than it was trained on (memory skew).

Before the policy, the scripted expert drives every scene (physics only, no rendering): its path
length is the SPL reference and its outcome sits next to the policy's in every report.

DAgger (`mobile_vla.online.collect`) steps the same loop with a `BetaMixPolicy`: the learned policy
answers every step (its memory follows the whole episode), the scripted expert labels every visited
state, and per step, with probability beta, the expert's command is the one executed.

`RolloutConfig.safety_ladder` (a serve `SafetyConfig`; issue 18): the model also drives every scene a
second time through `SafetyLadderPolicy`, which applies the serving ladder (serve/safety.py: the same
`effective_thresholds`, `decide` and `apply_level` as /v1/act answers) to each executed step: `slow`
scales the command, `stop` sends zero (the robot waits and the episode goes on: stops until the step
limit are a timeout), `handover` sends zero and ends the episode as outcome "handover" (neither success
nor collision). Thresholds: the config's, else the version's calibration, as in serving; the step's
age is never stale (the simulator has no network). Each such episode records its decisions per level.

`RolloutConfig.chunk_ensemble` = m (issue 15): temporal ensembling of overlapping chunks (ACT, Zhao et
al. 2023) instead of executing `actions[:, 0]` alone. The policy still plans every step; the command
executed at step t is the weighted mean of what each of the last K chunks predicted for t, the chunk
planned a steps ago weighted exp(-m * a): m = 0 averages them equally, a large m is the receding horizon.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from mobile_vla_client import Client

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.policy.config import MEASURED_VELOCITY, PREVIOUS_COMMAND
from mobile_vla.runtime.backends import load_backend
from mobile_vla.serve import safety as ladder
from mobile_vla.serve.settings import SafetyConfig
from mobile_vla.sim.expert import ScriptedExpert
from mobile_vla.sim.scenes import CONTROL_HZ, SceneSpec, realised_velocity, scene_from_seed
from mobile_vla.sim.split_spec import SplitSpec
from mobile_vla.tracking import resolve_model

SUCCESS, WRONG_TARGET, TIMEOUT = "success", "wrong_target", "timeout"
HANDOVER = ladder.HANDOVER  # outcome: the safety ladder handed the robot to an operator (SafetyLadderPolicy)


def check_chunk_decay(decay) -> float:
    """`decay` as the chunk ensemble's decay m (a finite number >= 0; 0: equal weights), else ConfigError."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (decay >= 0 and math.isfinite(decay)):
        raise ConfigError(f"--chunk-ensemble {decay!r}: expected a decay >= 0 (0: equal weights)")
    return float(decay)


@dataclass(frozen=True)
class RolloutConfig:
    """How episodes are stepped and what comes back; travels to every Ray task."""

    control_hz: float = CONTROL_HZ
    obs_size: int = 224
    max_steps: int | None = None  # None: the scene's own limit (scenes.MAX_STEPS)
    record_frames: tuple[int, ...] = ()  # seeds whose camera frames come back (for GIFs)
    expert: dict = field(default_factory=dict)  # ScriptedExpert field overrides
    memory_reset_every: int | None = None  # reset the policy's memory before steps N, 2N, ... (diagnostic)
    safety_ladder: SafetyConfig | None = None  # also drive each scene with the serving ladder applied
    chunk_ensemble: float | None = None  # decay m of temporal chunk ensembling; None: actions[:, 0] alone

    def __post_init__(self) -> None:
        every = self.memory_reset_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"--memory-reset-every {every!r}: expected a whole number of steps >= 1")
        if self.chunk_ensemble is not None:
            check_chunk_decay(self.chunk_ensemble)


@dataclass(frozen=True)
class PolicySpec:
    """What drives the robot, in a form that travels to Ray workers (no sessions, no GL)."""

    kind: Literal["expert", "model", "http"]
    model_path: str | None = None  # resolved local model folder (policy/, onnx/)
    model_uri: str | None = None  # resolved again on a worker that lacks model_path (another node)
    prefer: tuple[str, ...] = ()  # backend chain; () = onnx-cpu when onnx/ exists, else torch
    precision: str = "fp32"  # the step graph: "fp32", "fp16" or "int8" (ONNX Runtime's model.<precision>.onnx)
    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # API token: never logged or repr'd

    @classmethod
    def expert(cls) -> PolicySpec:
        return cls("expert")


@dataclass
class EpisodeRecord:
    """One episode of one policy. Trajectory rows are the robot's (x, z) after each step, start first."""

    seed: int
    outcome: str = TIMEOUT
    steps: int = 0
    path_length: float = 0.0
    collisions: int = 0
    confidence: list[float] = field(default_factory=list)
    trajectory: list[tuple[float, float]] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] per step, if recorded
    served_by: set[str] = field(default_factory=set)  # "name/version backend" answers came from (HTTP)
    safety_levels: dict[str, int] | None = None  # steps per ladder level; None: the ladder was not applied

    @property
    def mean_confidence(self) -> float:
        finite = [c for c in self.confidence if math.isfinite(c)]
        return float(np.mean(finite)) if finite else math.nan

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "outcome": self.outcome,
            "steps": self.steps,
            "path_length": self.path_length,
            "collisions": self.collisions,
            "mean_confidence": self.mean_confidence,
            "trajectory": np.asarray(self.trajectory, np.float32),  # [steps + 1, 2]
            "frames": np.stack(self.frames) if self.frames else None,  # uint8 [N, H, W, 3]
            "served_by": sorted(self.served_by),
            "safety_levels": self.safety_levels,
        }


# -- many episodes in one MiniWorld env -------------------------------------------------------------
class SceneSlots:
    """Holds several episodes' worlds in ONE MiniWorld env and swaps them in and out.

    Why not one env per episode: every env opens a GL context (~1 s, driver memory), and MiniWorld
    compiles each room into display list 1 of the shared GL object space, so two envs in one process
    would draw each other's rooms. An episode's world is the env's plain Python state (agent,
    entities, rooms, lights, RNG); swapping it is a dict update, plus recompiling the static display
    list (~4 ms) before the next frame of that episode is drawn.
    """

    RESOURCES = frozenset({"shadow_window", "obs_fb", "vis_fb", "window", "text_label"})

    def __init__(self, env) -> None:
        self.env = env
        self._parked: dict[int, dict] = {}
        self._active: int | None = None
        self._static_is_current = True

    def load(self, slot: int, scene) -> np.ndarray:
        """Builds `scene` in `slot` (replacing what was there); returns its first frame."""
        self._park()
        frame = self.env.load_scene(scene)
        self._active, self._static_is_current = slot, True
        return frame

    def activate(self, slot: int):
        """The env, showing `slot`'s world (physics may run on it at once; frames via `frame()`)."""
        if slot != self._active:
            self._park()
            self.env.__dict__.update(self._parked.pop(slot))
            self._active, self._static_is_current = slot, False
        return self.env

    def frame(self) -> np.ndarray:
        """The active episode's camera frame, uint8 [H, W, 3]."""
        if not self._static_is_current:
            self.env.shadow_window.switch_to()
            self.env._render_static()
            self._static_is_current = True
        return self.env.render_obs()

    def _park(self) -> None:
        if self._active is not None:
            state = {k: v for k, v in self.env.__dict__.items() if k not in self.RESOURCES}
            self._parked[self._active] = state
            self._active = None


# -- policies ---------------------------------------------------------------------------------------
class ExpertPolicy:
    """The scripted expert as a policy: it reads each episode's true simulator state."""

    needs_frames = False
    state_input = PREVIOUS_COMMAND  # (it reads none)

    def __init__(self, overrides: dict | None = None) -> None:
        self.expert = ScriptedExpert(**(overrides or {}))

    def start(self, episodes: list[tuple[str, str]]) -> None:
        pass

    def reset_memory(self, slots: list[int]) -> None:
        """The expert has no memory."""

    def act(self, slots, images, state, instructions, worlds: SceneSlots):
        actions = np.array([self.expert.act(worlds.activate(slot)) for slot in slots], np.float32)  # [B, 3]
        return actions, np.full(len(slots), np.nan, np.float32)


class BackendPolicy:
    """A model through `mobile_vla.runtime.backends`: one batched predict per control step."""

    needs_frames = True

    def __init__(self, backend) -> None:
        self.backend = backend
        self.memory: tuple[np.ndarray, np.ndarray] | None = None
        self.last_chunks: np.ndarray | None = None  # the last act's whole chunks [B, K, 3]
        # the last act's ladder inputs: the executed step's confidence [B] and novelty [B] (None: off)
        self.safety_inputs: tuple[np.ndarray, np.ndarray | None] | None = None

    @property
    def safety_thresholds(self):
        """The version's calibrated ladder thresholds (policy/novelty.py), None where serving has none."""
        return self.backend.safety.thresholds if self.backend.safety is not None else None

    @property
    def safety_note(self) -> str:
        return self.backend.safety_note

    @property
    def control_hz(self) -> float:
        """The control rate the model was trained at (what serving reads the staleness rule at)."""
        return self.backend.preprocessing.control_hz

    @property
    def chunk(self) -> int:
        return self.backend.signature.chunk

    @property
    def state_dim(self) -> int:
        """S: how much of the state the model reads (0 or 3)."""
        return self.backend.state_dim

    @property
    def state_input(self) -> str:
        """What the model's state is (its saved preprocessing's `state_input`)."""
        return self.backend.preprocessing.state_input

    def reset_memory(self, slots: list[int]) -> None:
        """Sets the LSTM memory of `slots` to the model's initial (zero) memory."""
        rows = np.asarray(slots)
        h0, c0 = self.backend.initial_memory(len(rows))  # [layers, R, hidden] each
        h, c = self.memory
        h[:, rows], c[:, rows] = h0, c0

    def start(self, episodes: list[tuple[str, str]]) -> None:
        if self.backend.state_dim not in (0, 3):
            raise ModelError(
                f"{self.backend.model_dir}: state S = {self.backend.state_dim}; MiniWorld gives the "
                "previous command or the measured velocity (S = 3), or nothing (S = 0)"
            )
        self.memory = self.backend.initial_memory(len(episodes))  # (h, c) [layers, slots, hidden]

    def act(self, slots, images, state, instructions, worlds):
        rows = np.asarray(slots)
        h, c = self.memory
        state = state[:, : self.backend.state_dim]  # [B, S]
        out = self.backend.predict(images, state, instructions, (h[:, rows], c[:, rows]))
        h[:, rows], c[:, rows] = out.memory
        self.last_chunks = out.actions  # [B, K, 3]
        # as serving judges a step (serve/routes.py): the executed step's confidence where the graph gives it
        self.safety_inputs = (out.confidence if out.confidence_now is None else out.confidence_now, out.novelty)
        return out.actions[:, 0], out.confidence  # [B, 3] now, [B]


class SafetyLadderPolicy:
    """A model's policy with the serving safety ladder applied to every executed step (module doc).

    `inner` is a BackendPolicy or anything with its `safety_inputs`, `safety_thresholds`, `safety_note`,
    `control_hz` and `chunk`. The consecutive-stop count per episode is what the memory token carries in
    serving. `levels[slot]` counts the episode's steps per level; `handed_over(slot)`: its last step was
    a handover.
    """

    needs_frames = True

    def __init__(self, inner, config: SafetyConfig) -> None:
        self.inner, self.config = inner, config
        self.limits: ladder.SafetyLimits | None = None
        self.stops: list[int] = []
        self.levels: list[dict[str, int]] = []
        self.last: list[str] = []

    @property
    def state_input(self) -> str:
        return self.inner.state_input

    @property
    def state_dim(self) -> int:
        return self.inner.state_dim

    def reset_memory(self, slots: list[int]) -> None:
        self.inner.reset_memory(slots)

    def start(self, episodes: list[tuple[str, str]]) -> None:
        """Starts the inner policy; the thresholds in force as serving sets them.

        Raises:
            ConfigError: no confidence or novelty threshold, given or calibrated: the ladder would never act.
        """
        self.inner.start(episodes)
        self.limits = ladder.effective_thresholds(
            self.config, self.inner.safety_thresholds, self.inner.control_hz, self.inner.chunk
        )
        rules = ("confidence_slow", "confidence_stop", "novelty_slow", "novelty_stop")
        if self.config.enabled and all(getattr(self.limits, name) is None for name in rules):
            raise ConfigError(
                f"--safety-ladder: no confidence or novelty threshold ({self.inner.safety_note}; none set in "
                "the safety config): the ladder would never act"
            )
        self.stops = [0] * len(episodes)
        self.levels = [dict.fromkeys(ladder.LEVELS, 0) for _ in episodes]
        self.last = [ladder.NORMAL] * len(episodes)

    def act(self, slots, images, state, instructions, worlds):
        actions, confidence = self.inner.act(slots, images, state, instructions, worlds)  # [B, 3], [B]
        confidence_now, novelty = self.inner.safety_inputs  # [B] each (novelty None: off)
        allowed = np.array(actions, np.float32, copy=True)  # [B, 3]
        for j, slot in enumerate(slots):
            decision = ladder.SafetyDecision(ladder.NORMAL)
            if self.config.enabled:
                inputs = ladder.SafetyInputs(
                    float(confidence_now[j]), None if novelty is None else float(novelty[j]), None, self.stops[slot]
                )
                decision = ladder.decide(inputs, self.limits, self.config.handover_after_stops)
            self.stops[slot] = decision.stops
            self.levels[slot][decision.level] += 1
            self.last[slot] = decision.level
            allowed[j] = ladder.apply_level(allowed[j : j + 1], decision.level, self.config.slow_factor)[0]
        return allowed, confidence

    def handed_over(self, slot: int) -> bool:
        return self.last[slot] == ladder.HANDOVER


class ChunkEnsemblePolicy:
    """A model's policy executing the temporal ensemble of its overlapping chunks (module doc).

    `inner` is a BackendPolicy (it keeps each act's whole chunks in `last_chunks`); every other attribute
    (state input, memory, the ladder's inputs) is the inner policy's, so the safety ladder can wrap this.
    """

    needs_frames = True

    def __init__(self, inner, decay: float) -> None:
        self.inner, self.decay = inner, float(decay)
        self.planned: list[deque] = []  # per slot: its last K chunks, newest first, each [K, 3]

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (a copy being built): no recursion through the line below
            raise AttributeError(name)
        return getattr(self.inner, name)

    def start(self, episodes: list[tuple[str, str]]) -> None:
        self.inner.start(episodes)
        self.planned = [deque(maxlen=self.inner.chunk) for _ in episodes]

    def act(self, slots, images, state, instructions, worlds):
        _, confidence = self.inner.act(slots, images, state, instructions, worlds)
        chunks = self.inner.last_chunks  # [B, K, 3]
        executed = np.empty((len(slots), chunks.shape[-1]), np.float32)  # [B, 3]
        for j, slot in enumerate(slots):
            planned = self.planned[slot]
            planned.appendleft(np.asarray(chunks[j], np.float32))
            ages = np.arange(len(planned))  # the chunk planned `age` steps ago predicts this step at [age]
            weights = np.exp(-self.decay * ages)  # [A]
            predictions = np.stack([chunk[age] for age, chunk in zip(ages, planned, strict=True)])  # [A, 3]
            executed[j] = weights @ predictions / weights.sum()
        return executed, confidence


class HttpPolicy:
    """The served model through the robot client, one client (robot) per episode; the requests of
    one step go out together so the server can batch them as it would a fleet's.
    """

    needs_frames = True

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint, self.token = endpoint, token
        self.clients = []
        self.served: dict[int, set[str]] = {}
        self.state_input = PREVIOUS_COMMAND  # what the served model's state is: asked in `start`

    def start(self, episodes: list[tuple[str, str]]) -> None:
        self.close()
        self.clients = [
            Client(self.endpoint, self.token, robot_id=episode_id, timeout_s=30.0) for episode_id, _ in episodes
        ]
        for client, (episode_id, instruction) in zip(self.clients, episodes, strict=True):
            client.start_episode(instruction, episode_id=episode_id)
        self.served = {slot: set() for slot in range(len(episodes))}
        if self.clients:  # GET /v1/model names the state its robots send (older servers: the command)
            self.state_input = self.clients[0].model_info().state_input

    def reset_memory(self, slots: list[int]) -> None:
        """The robots of `slots` forget their memory token: the next act starts from a fresh memory (their
        step counters restart too: a diagnostic for evaluation, not for feedback rounds).
        """
        for slot in slots:
            client = self.clients[slot]
            client.start_episode(client.instruction, episode_id=client.episode_id)

    def act(self, slots, images, state, instructions, worlds):
        def one(j: int):
            return self.clients[slots[j]].act(images[j], state[j])

        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            answers = list(pool.map(one, range(len(slots))))  # one request per robot, concurrently
        for slot, answer in zip(slots, answers, strict=True):
            self.note_answer(slot, answer)
        actions = np.array([answer.actions[0] for answer in answers], np.float32)  # [B, 3]: execute now
        return actions, np.array([answer.confidence for answer in answers], np.float32)

    def note_answer(self, slot: int, answer) -> None:
        """Remembers which model version and backend answered `slot` (subclasses keep more)."""
        self.served[slot].add(f"{answer.model.name}/{answer.model.version} {answer.backend}")

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []


@dataclass
class VisitedStep:
    """One state a beta-mixed (DAgger) episode visited: what the learner saw, what it and the expert
    commanded there, and which of the two commands was executed.
    """

    step: int  # index of the step in its episode, from 0
    image: np.ndarray  # uint8 [H, W, 3]: the frame the learner was given
    state: np.ndarray  # float32 [S]: the state the learner was given (its state_input of the step before)
    learner_action: np.ndarray  # float32 [3]: the learner's command (actions[0] of its chunk)
    expert_action: np.ndarray  # float32 [3]: the scripted expert's command in this state: the label
    by_expert: bool  # the expert's command was executed (probability beta), not the learner's

    @property
    def executed(self) -> np.ndarray:
        """The command the robot executed at this step, float32 [3]."""
        return self.expert_action if self.by_expert else self.learner_action


# (slot, step, None while the episode goes on | its record once this was its last step)
StepReport = Callable[[list[tuple[int, VisitedStep, EpisodeRecord | None]]], None]


class BetaMixPolicy:
    """DAgger's beta-mixture of a learned policy and the scripted expert, one draw per step and episode.

    The learner answers every step, whichever command runs, so its memory (LSTM state, or the robot
    client's token over HTTP) follows the whole episode as it would alone. The expert labels every
    visited state. With probability `beta` the expert's command is executed, else the learner's; the
    draws come from one generator per episode (`rng_seeds[slot]`), so they do not depend on how the
    episodes were batched. Each visited step goes to `report` once it is known whether it ended its
    episode: at the episode's next step, or from `finish(records)` after the loop.
    """

    needs_frames = True

    def __init__(
        self,
        learner,
        beta: float,
        rng_seeds: list[tuple[int, ...]],
        report: StepReport | None = None,
        expert: dict | None = None,
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"beta = {beta!r}: expected a probability in [0, 1]")
        self.learner, self.beta, self.report = learner, beta, report
        self.expert = ScriptedExpert(**(expert or {}))
        self.rng_seeds = [tuple(int(v) for v in seeds) for seeds in rng_seeds]
        self.episodes: list[tuple[str, str]] = []  # (episode id, instruction) per slot
        self.learner_steps: list[int] = []  # per slot: steps that executed the learner's command
        self.expert_steps: list[int] = []
        self._rngs: list[np.random.Generator] = []
        self._pending: dict[int, VisitedStep] = {}

    @property
    def state_input(self) -> str:
        """The learner's state (the expert reads none)."""
        return self.learner.state_input

    def reset_memory(self, slots: list[int]) -> None:
        """Resets the learner's memory of `slots`."""
        self.learner.reset_memory(slots)

    def start(self, episodes: list[tuple[str, str]]) -> None:
        if len(episodes) != len(self.rng_seeds):
            raise ValueError(f"{len(episodes)} episodes but {len(self.rng_seeds)} rng seeds")
        self.learner.start(episodes)
        self.episodes = list(episodes)
        self.learner_steps, self.expert_steps = [0] * len(episodes), [0] * len(episodes)
        self._rngs = [np.random.default_rng(list(seeds)) for seeds in self.rng_seeds]
        self._pending = {}

    def act(self, slots, images, state, instructions, worlds: SceneSlots):
        self._report([(slot, self._pending.pop(slot), None) for slot in slots if slot in self._pending])
        learned, confidence = self.learner.act(slots, images, state, instructions, worlds)  # [B, 3], [B]
        learned = np.asarray(learned, np.float32)
        if not np.isfinite(learned).all():
            raise ModelError(f"policy returned non-finite actions for episodes {[self.episodes[s][0] for s in slots]}")
        labels = np.array([self.expert.act(worlds.activate(slot)) for slot in slots], np.float32)  # [B, 3]
        state_dim = getattr(self.learner, "state_dim", state.shape[1])
        executed = np.empty_like(labels)  # [B, 3]
        for j, slot in enumerate(slots):
            by_expert = bool(self._rngs[slot].random() < self.beta)
            step = self.learner_steps[slot] + self.expert_steps[slot]
            visit = VisitedStep(step, images[j], state[j, :state_dim].copy(), learned[j], labels[j], by_expert)
            self._pending[slot] = visit
            executed[j] = visit.executed
            if by_expert:
                self.expert_steps[slot] += 1
            else:
                self.learner_steps[slot] += 1
        return executed, confidence

    def finish(self, records: list[EpisodeRecord]) -> None:
        """Reports every episode's last step, with the episode's record (its outcome is known now)."""
        self._report([(slot, visit, records[slot]) for slot, visit in sorted(self._pending.items())])
        self._pending = {}

    def _report(self, batch: list[tuple[int, VisitedStep, EpisodeRecord | None]]) -> None:
        if batch and self.report is not None:
            self.report(batch)


# -- the lockstep loop ------------------------------------------------------------------------------
def run_lockstep(
    worlds: SceneSlots, scenes: list[SceneSpec], policy, settings: RolloutConfig, episode_prefix: str = "eval"
) -> list[EpisodeRecord]:
    """Runs one episode per scene, all advanced together one control step at a time; the episodes are
    named `<episode_prefix>-<split>-<seed>` (over HTTP also the robot ids).
    """
    records = [EpisodeRecord(seed=scene.seed) for scene in scenes]
    frames = {slot: worlds.load(slot, scene) for slot, scene in enumerate(scenes)}
    for slot, scene in enumerate(scenes):
        records[slot].trajectory.append((scene.agent.x, scene.agent.z))
        if scene.seed in settings.record_frames:
            records[slot].frames.append(frames[slot])
    policy.start([(f"{episode_prefix}-{scene.split}-{scene.seed}", scene.instruction) for scene in scenes])
    measured = policy.state_input == MEASURED_VELOCITY
    state = np.zeros((len(scenes), 3), np.float32)  # [B, S]: previous command, or velocity realised then
    active = list(range(len(scenes)))
    max_steps = max(scene.max_steps for scene in scenes)
    handed_over = policy.handed_over if isinstance(policy, SafetyLadderPolicy) else (lambda slot: False)

    for _ in range(max_steps):
        if not active:
            break
        _reset_memory_when_due(policy, records, active, settings.memory_reset_every)
        images = np.stack([frames[slot] for slot in active]) if policy.needs_frames else None  # [B, H, W, 3]
        instructions = [scenes[slot].instruction for slot in active]
        actions, confidence = policy.act(active, images, state[active], instructions, worlds)
        if not np.isfinite(actions).all():
            raise ModelError(f"policy returned non-finite actions for seeds {[records[s].seed for s in active]}")
        still_running = []
        for j, slot in enumerate(active):
            env, record = worlds.activate(slot), records[slot]
            moved = env.execute_action(actions[j], settings.control_hz)
            state[slot] = realised_velocity(actions[j], moved) if measured else actions[j]
            x, z = float(env.agent.pos[0]), float(env.agent.pos[2])
            record.path_length += math.dist(record.trajectory[-1], (x, z))
            record.trajectory.append((x, z))
            record.collisions += not moved
            record.confidence.append(float(confidence[j]))
            record.steps += 1
            ended = _episode_end(env, handed_over(slot))
            if ended is not None:
                record.outcome = ended
            elif record.steps < scenes[slot].max_steps:
                still_running.append(slot)
            recording = record.seed in settings.record_frames
            if recording or (policy.needs_frames and slot in still_running):
                frames[slot] = worlds.frame()
                if recording:
                    record.frames.append(frames[slot])
        active = still_running
    for slot, record in enumerate(records):
        if isinstance(policy, HttpPolicy):
            record.served_by = policy.served.get(slot, set())
        if isinstance(policy, SafetyLadderPolicy):
            record.safety_levels = dict(policy.levels[slot])
    return records


def _episode_end(env, handed_over: bool) -> str | None:
    """The outcome that ends the episode after this step, or None while it goes on (to its step limit)."""
    if handed_over:  # zero velocity sent; an operator takes the robot over
        return HANDOVER
    if env.near(env.target):
        return SUCCESS
    if any(env.near(d) for d in env.distractors):
        return WRONG_TARGET
    return None


def _reset_memory_when_due(policy, records: list[EpisodeRecord], active: list[int], every: int | None) -> None:
    """Resets the memory of the active episodes that have run a multiple of `every` steps (not at 0)."""
    if every:
        due = [slot for slot in active if records[slot].steps and records[slot].steps % every == 0]
        if due:
            policy.reset_memory(due)


# -- the Ray task body ------------------------------------------------------------------------------
_WORKER: dict = {}  # per worker process: one env (one GL context), loaded backends by model folder


def worker_slots(first_scene: SceneSpec, obs_size: int) -> SceneSlots:
    """This worker process's one MiniWorld env (one GL context), created on first use."""
    slots = _WORKER.get("slots")
    if slots is None or slots.env.obs_size != obs_size:
        _load_triton_before_gl()
        # Imported here, after triton: the env module loads MiniWorld and GL (see its docstring).
        from mobile_vla.sim.navigation_env import NavigationEnv

        slots = _WORKER["slots"] = SceneSlots(NavigationEnv(first_scene, obs_size=obs_size))
    return slots


def _load_triton_before_gl() -> None:
    """Triton's bundled LLVM segfaults when it loads into a process where Mesa's llvmpipe (software
    GL) already runs, and torch loads triton lazily (torch._dynamo, on first model use). Loaded
    first, both work, so a worker can take a model task after an expert-only one.
    """
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401  (optional, and its load order is the point)


def make_policy(spec: PolicySpec, settings: RolloutConfig):
    """The policy object a task steps: the expert, the HTTP client fleet, or a loaded backend."""
    if spec.kind == "expert":
        return ExpertPolicy(settings.expert)
    if spec.kind == "http":
        return HttpPolicy(spec.endpoint, spec.token)
    policy = BackendPolicy(worker_backend(spec))
    return policy if settings.chunk_ensemble is None else ChunkEnsemblePolicy(policy, settings.chunk_ensemble)


def default_prefer(model_dir: Path, precision: str = "fp32") -> tuple[str, ...]:
    """ONNX Runtime on the CPU when the version was exported (fast, what CPU serving runs), else torch.

    fp16 and int8 are ONNX Runtime graphs only: no torch fallback, which would run fp32 under their name.
    """
    if precision != "fp32":
        return ("onnx-cpu",)
    return ("onnx-cpu", "torch") if (model_dir / "onnx" / "signature.json").is_file() else ("torch",)


def worker_backend(spec: PolicySpec):
    """The backend for `spec`, loaded once per worker process and model folder (one thread)."""
    path = Path(spec.model_path) if spec.model_path else None
    if path is None or not path.is_dir():  # a worker on another node: fetch the version there
        path = resolve_model(spec.model_uri or spec.model_path).path
    prefer = spec.prefer or default_prefer(path, spec.precision)
    key = (str(path), prefer, spec.precision)
    if _WORKER.get("backend_key") != key:
        _WORKER.pop("backend", None)
        _WORKER["backend"] = load_backend(
            path, prefer=prefer, fp16=spec.precision == "fp16", int8=spec.precision == "int8", threads=1
        )
        _WORKER["backend_key"] = key
    return _WORKER["backend"]


def job_scenes(jobs: list[tuple[str, int]], spec_json: str, settings: RolloutConfig) -> list[SceneSpec]:
    """The scene of each (split, seed) job under the split spec, capped at `settings.max_steps`."""
    spec = SplitSpec.model_validate_json(spec_json)
    scenes = [scene_from_seed(split, seed, spec) for split, seed in jobs]
    if settings.max_steps is not None:
        scenes = [scene.model_copy(update={"max_steps": settings.max_steps}) for scene in scenes]
    return scenes


def rollout_seeds(
    jobs: list[tuple[str, int]], spec_json: str, policy: PolicySpec, settings: RolloutConfig
) -> list[dict]:
    """Ray task body: the expert and then `policy` on each (split, seed); one dict per episode."""
    cpu_start = time.process_time()
    scenes = job_scenes(jobs, spec_json, settings)
    worlds = worker_slots(scenes[0], settings.obs_size)

    expert_settings = RolloutConfig(settings.control_hz, settings.obs_size, settings.max_steps, (), settings.expert)
    laddered: list[EpisodeRecord | None] = [None] * len(scenes)
    limits: dict | None = None  # the ladder's thresholds in force (SafetyLimits as a dict)
    if policy.kind == "expert":
        reference = run_lockstep(worlds, scenes, ExpertPolicy(settings.expert), settings)
        driven = reference
    else:
        reference = run_lockstep(worlds, scenes, ExpertPolicy(settings.expert), expert_settings)
        runner = make_policy(policy, settings)
        try:
            driven = run_lockstep(worlds, scenes, runner, settings)
        finally:
            if isinstance(runner, HttpPolicy):
                runner.close()
        if settings.safety_ladder is not None:  # the same scenes again, the ladder applied (paired)
            if policy.kind != "model":
                raise ConfigError("--safety-ladder runs a model in-process: a server applies its own ladder")
            ladder_settings = replace(settings, record_frames=())
            safe = SafetyLadderPolicy(make_policy(policy, ladder_settings), settings.safety_ladder)
            laddered = run_lockstep(worlds, scenes, safe, ladder_settings)
            limits = vars(safe.limits)
    cpu_seconds = (time.process_time() - cpu_start) / len(scenes)  # this process only (not a server's)
    results = []
    for scene, mine, expert, safe_run in zip(scenes, driven, reference, laddered, strict=True):
        row = mine.to_dict()
        row.update(
            split=scene.split,
            instruction=scene.instruction,
            scene=scene.to_json(),
            cpu_seconds=cpu_seconds,
            expert={k: v for k, v in expert.to_dict().items() if k != "frames"},
        )
        if safe_run is not None:
            row["safety_ladder"] = {k: v for k, v in safe_run.to_dict().items() if k != "frames"}
            row["safety_ladder"]["limits"] = limits
        results.append(row)
    return results
