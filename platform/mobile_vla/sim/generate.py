"""MiniWorld episodes driven by the scripted expert, as Ray tasks (`mobile-vla data generate`).

    manifest = generate_dataset("data/nav", episodes=200, spec=default_split_spec(), seed=0)

Each split draws an ordered list of candidate episode seeds from its own seed range (order fixed by
`--seed`); Ray tasks simulate them (one MiniWorld env per worker process, reset per episode); a
split keeps its first N successful candidates in that order. So the same seed gives the same
episodes whatever the number of workers or the order tasks finish in, and the manifest's
`expert_success` (kept / candidates tried up to the last kept one) is reproducible too.
Ray: `mobile_vla.ray_session.ensure_ray` (the running cluster, `RAY_ADDRESS`, or a local one).
Episodes travel back to the driver as finished HDF5 bytes, so `--out` need not be shared storage
on a multi-node cluster.

DART noise (`GeneratorConfig.action_noise`, `--action-noise`): the base executes the expert's
command plus Gaussian noise (std = action_noise x each axis' limit), so the episodes visit states
off the expert's own path; the stored `actions` label stays the CLEAN expert command at every
visited state, `state` is the previous EXECUTED (noisy) command, as closed loop feeds back, and
`executed` keeps what was executed so the file replays exactly. The noise stream of an episode is
seeded from its scene seed (`noise_seed`), so the same seed gives the same episodes.

Every episode also keeps `measured_velocity`: the velocity the base realised after each frame
(`scenes.realised_velocity`: the executed command, with no translation where MiniWorld refused a
colliding move), the state of a policy with `state_input: measured_velocity`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest
from mobile_vla.errors import DataError, ResourceError
from mobile_vla.ray_session import ensure_ray
from mobile_vla.sim.expert import ScriptedExpert, target_bearing, target_distance, target_in_view
from mobile_vla.sim.scenes import CONTROL_HZ, ENV_ID, SPEED_LIMITS, SceneSpec, realised_velocity, scene_from_seed
from mobile_vla.sim.split_spec import SplitSpec, default_split_spec

SOURCE = "miniworld"
NOISE_SALT = 0xDA27  # seeds an episode's DART noise stream apart from its scene stream


@dataclass(frozen=True)
class GeneratorConfig:
    """How episodes are simulated and recorded; travels to every Ray task."""

    control_hz: float = CONTROL_HZ
    obs_size: int = 224
    seeds_per_task: int = 4
    max_steps: int | None = None  # None: the scene's own limit (scenes.MAX_STEPS)
    max_candidates_factor: int = 5  # give up on a split after 5x its episodes + 20 failed tries
    expert: dict = field(default_factory=dict)  # ScriptedExpert field overrides
    # DART: std of the Gaussian noise added to the EXECUTED command, as a fraction of each axis'
    # limit (the expert's max_forward, max_lateral, max_turn); 0 = the expert's commands exactly.
    action_noise: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.action_noise <= 1.0):  # also refuses NaN
            raise DataError(f"action_noise = {self.action_noise!r}: expected a number in [0, 1]")


def episode_noise_seed(episode_seed: int) -> int:
    """The seed of an episode's DART noise stream: a pure function of its scene seed."""
    return int(np.random.SeedSequence([NOISE_SALT, episode_seed]).generate_state(1)[0])


# -- one episode ------------------------------------------------------------------------------------
@dataclass
class Recording:
    """One expert episode as simulated: frames, commands, states and whether it reached the target."""

    images: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, 3]: the clean expert command at each frame (the label)
    state: np.ndarray  # float32 [T, 3]: the command executed at the previous step
    executed: np.ndarray  # float32 [T, 3]: the command executed after each frame (zeros at the end)
    measured: np.ndarray  # float32 [T, 3]: the velocity the base realised after each frame (zeros at the end)
    labels: dict[str, np.ndarray]  # float32 [T] each: target_bearing, target_distance, target_in_view
    success: bool


def privileged_labels(env) -> tuple[float, float, float]:
    """(target_bearing rad, target_distance m, target_in_view 0/1) of the robot's current pose."""
    return target_bearing(env), target_distance(env), float(target_in_view(env))


def record_episode(  # noqa: PLR0913 (the episode's scene, teacher and noise)
    env, scene, expert, control_hz: float, action_noise: float = 0.0, noise_seed: int = 0
) -> Recording:
    """Runs the expert from the scene's start until MiniWorld's `near(target)` or max_steps.

    Frame t is what the robot saw before command t. On success a last frame at the target with a
    zero command is added, so that stopping there is part of what is learned. With `action_noise`
    the base executes the expert's command plus Gaussian noise (see the module doc).
    """
    limits = np.array(SPEED_LIMITS, np.float32)  # [3] what the base can execute
    noise_std = action_noise * np.array([expert.max_forward, expert.max_lateral, expert.max_turn])  # [3]
    rng = np.random.default_rng(noise_seed)
    frame = env.load_scene(scene)
    images, actions, executed, measured, labels = [], [], [], [], []
    success = False
    for _ in range(scene.max_steps):
        # Stored as float32 and executed exactly as stored, so replaying `executed` reproduces the episode.
        clean = np.asarray(expert.act(env), np.float32)  # [3]
        command = clean if action_noise == 0 else np.clip(clean + rng.normal(0.0, noise_std), -limits, limits)
        images.append(frame)
        actions.append(clean)
        executed.append(command.astype(np.float32))
        labels.append(privileged_labels(env))
        moved = env.execute_action(tuple(float(v) for v in executed[-1]), control_hz)
        measured.append(realised_velocity(executed[-1], moved))
        frame = env.render_obs()
        if env.near(env.target):
            images.append(frame)
            actions.append(np.zeros(3, np.float32))
            executed.append(np.zeros(3, np.float32))
            measured.append(np.zeros(3, np.float32))
            labels.append(privileged_labels(env))
            success = True
            break
    executed_array = np.stack(executed)  # [T, 3]
    label_array = np.asarray(labels, np.float32)  # [T, 3]
    return Recording(
        images=np.stack(images),  # [T, H, W, 3]
        actions=np.stack(actions),  # [T, 3]
        state=np.concatenate([np.zeros((1, 3), np.float32), executed_array[:-1]]),  # [T, 3]
        executed=executed_array,
        measured=np.stack(measured),  # [T, 3]
        labels={
            "target_bearing": label_array[:, 0],
            "target_distance": label_array[:, 1],
            "target_in_view": label_array[:, 2],
        },
        success=success,
    )


def episode_name(split: str, seed: int) -> str:
    """The file stem of a generated episode: `<split>-<seed, 7 digits>`."""
    return f"{split}-{seed:07d}"


def episode_attrs(scene: SceneSpec, control_hz: float, action_noise: float = 0.0) -> dict[str, Any]:
    """The attributes a generated episode file carries, the scene JSON that rebuilds it included."""
    return {
        "instruction": scene.instruction,
        "episode_id": episode_name(scene.split, scene.seed),
        "source": SOURCE,
        "success": True,
        "control_hz": float(control_hz),
        "schema_version": SCHEMA_VERSION,
        "scene": scene.to_json(),
        "split": scene.split,
        "seed": int(scene.seed),
        "layout_seed": int(scene.layout_seed),
        "action_noise": float(action_noise),
        "noise_seed": episode_noise_seed(scene.seed),
    }


# -- Ray worker side --------------------------------------------------------------------------------
_WORKER_ENV = None  # one MiniWorld env (one GL context) per worker process, reused across tasks


def simulate_seeds(jobs: list[tuple[str, int]], spec_json: str, settings: GeneratorConfig) -> list[dict]:
    """Ray task body: simulates (split, seed) jobs; successful episodes come back as HDF5 bytes."""
    global _WORKER_ENV
    # Here only: importing the env module loads MiniWorld and GL, which must happen in the worker
    # that renders, never in the driver (see navigation_env's docstring).
    from mobile_vla.sim.navigation_env import NavigationEnv

    spec = SplitSpec.model_validate_json(spec_json)
    expert = ScriptedExpert(**settings.expert)
    results = []
    for split, seed in jobs:
        cpu_start = time.process_time()
        scene = scene_from_seed(split, seed, spec)
        if settings.max_steps is not None:
            scene = scene.model_copy(update={"max_steps": settings.max_steps})
        if _WORKER_ENV is None or _WORKER_ENV.obs_size != settings.obs_size:
            _WORKER_ENV = NavigationEnv(scene, obs_size=settings.obs_size)
        recording = record_episode(
            _WORKER_ENV, scene, expert, settings.control_hz, settings.action_noise, episode_noise_seed(seed)
        )
        result = {
            "split": split,
            "seed": seed,
            "success": recording.success,
            "frames": len(recording.actions),
            "data": None,
        }
        if recording.success:
            episode = Episode(
                recording.images,
                recording.actions,
                recording.state,
                episode_attrs(scene, settings.control_hz, settings.action_noise),
                extras={"executed": recording.executed, "measured_velocity": recording.measured, **recording.labels},
            )
            with tempfile.TemporaryDirectory() as tmp:
                path = write_episode(Path(tmp) / "episode.h5", episode)
                result["data"] = path.read_bytes()
        result["cpu_seconds"] = time.process_time() - cpu_start
        results.append(result)
    return results


# -- driver side ------------------------------------------------------------------------------------
@dataclass
class _SplitRun:
    name: str
    needed: int
    candidates: list[int]  # ordered seeds
    submitted: int = 0
    index_of: dict[int, int] = field(default_factory=dict)  # seed -> candidate index
    cpu_seconds: float = 0.0  # worker CPU spent on this split (simulate, render, compress)

    def __post_init__(self) -> None:
        self.index_of = {seed: index for index, seed in enumerate(self.candidates)}

    outcomes: dict[int, bool] = field(default_factory=dict)  # candidate index -> success
    frames: dict[int, int] = field(default_factory=dict)

    def kept_indices(self) -> list[int] | None:
        """First `needed` successes in candidate order, once every earlier candidate is known."""
        kept = []
        for index in range(self.submitted):
            if index not in self.outcomes:
                return None
            if self.outcomes[index]:
                kept.append(index)
                if len(kept) == self.needed:
                    return kept
        return None if self.needed else []

    @property
    def successes(self) -> int:
        return sum(self.outcomes.values())


def candidate_seeds(spec: SplitSpec, split: str, seed: int, count: int) -> list[int]:
    """Ordered, distinct episode seeds from the split's range; a pure function of (spec, split, seed)."""
    seeds = spec.splits[split].seeds
    index = list(spec.splits).index(split)
    rng = np.random.default_rng([seed, index])
    count = min(count, seeds.size)
    return [seeds.start + int(s) for s in rng.choice(seeds.size, size=count, replace=False)]


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir():
        clutter = [p.name for p in out.iterdir() if p.suffix in (".h5", ".hdf5", ".json")]
        if clutter:
            raise DataError(
                f"{out}: already holds {len(clutter)} dataset file(s) (e.g. {sorted(clutter)[0]}); "
                "generate into a new or empty folder so nothing is overwritten"
            )


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_dataset(
    out: str | Path,
    episodes: int,
    spec: SplitSpec | None = None,
    seed: int = 0,
    settings: GeneratorConfig | None = None,
    progress: bool = True,
) -> dict:
    """Generates `episodes` successful expert episodes split as `spec` says; returns the manifest."""
    spec = spec if spec is not None else default_split_spec()
    settings = settings or GeneratorConfig()
    if episodes < 1:
        raise DataError(f"--episodes {episodes}: expected at least 1")
    out = Path(out)
    _check_out_dir(out)

    allocation = {name: n for name, n in spec.allocate(episodes).items() if n > 0}
    runs = {
        name: _SplitRun(name, n, candidate_seeds(spec, name, seed, settings.max_candidates_factor * n + 20))
        for name, n in allocation.items()
    }
    ensure_ray()
    task = ray.remote(num_cpus=1)(simulate_seeds)
    spec_json = spec.model_dump_json()

    written: dict[tuple[str, int], Path] = {}
    pending: dict[Any, list[tuple[str, int]]] = {}

    def submit(run: _SplitRun, count: int) -> None:
        stop = min(run.submitted + count, len(run.candidates))
        for start in range(run.submitted, stop, settings.seeds_per_task):
            chunk = [(run.name, run.candidates[i]) for i in range(start, min(start + settings.seeds_per_task, stop))]
            pending[task.remote(chunk, spec_json, settings)] = chunk
        run.submitted = stop

    for run in runs.values():  # first wave: a little more than needed, most experts succeed
        submit(run, math.ceil(run.needed * 1.1) + 1)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _run_waves(runs, pending, submit, written, out, progress)
    except BaseException:
        # Leave nothing behind that looks like a dataset: cancel the rest, remove what we wrote.
        for ref in pending:
            ray.cancel(ref, force=True)
        for path in written.values():
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise

    splits, expert_success = {}, {}
    for name, run in runs.items():
        kept = run.kept_indices()
        assert kept is not None and len(kept) == run.needed, f"{name}: {run.successes}/{run.needed}"
        kept_seeds = {run.candidates[i] for i in kept}
        for (split, seed_), path in written.items():  # successes past the first N are not part of it
            if split == name and seed_ not in kept_seeds:
                path.unlink(missing_ok=True)
        attempted = kept[-1] + 1
        splits[name] = [f"{episode_name(name, run.candidates[i])}.h5" for i in kept]
        expert_success[name] = {
            "attempted": attempted,
            "kept": len(kept),
            "success_rate": len(kept) / attempted,
            "mean_frames_kept": float(np.mean([run.frames[i] for i in kept])),
        }

    generator = {
        "kind": "miniworld",
        "env_id": ENV_ID,
        "seed": seed,
        "episodes": episodes,
        "settings": asdict(settings),
        "split_spec": spec.model_dump(mode="json"),
        "held_out_splits": [name for name in runs if spec.is_held_out(name)],
        "worker_cpu_seconds": {name: round(run.cpu_seconds, 2) for name, run in runs.items()},
    }
    return build_manifest(out, splits, generator=generator, expert_success=expert_success, progress=progress)


def _run_waves(runs, pending, submit, written, out: Path, progress: bool) -> None:
    """Collects task results as they finish, writes successes, tops up splits that fall short."""
    with _progress_display(progress) as bars:
        ids = {name: bars.add_task(f"{name:>18}", total=run.needed) for name, run in runs.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(done[0])
            try:
                results = ray.get(done[0])
            except Exception as exc:  # a worker could not render (no EGL?) or crashed
                raise ResourceError(
                    f"generation task for {chunk[0][0]} seeds {[s for _, s in chunk]} failed: {exc}"
                ) from exc
            for result in results:
                run = runs[result["split"]]
                index = run.index_of[result["seed"]]
                run.outcomes[index] = result["success"]
                run.frames[index] = result["frames"]
                run.cpu_seconds += result["cpu_seconds"]
                if result["data"] is not None:
                    path = out / f"{episode_name(run.name, result['seed'])}.h5"
                    _write_bytes(path, result["data"])
                    written[(run.name, result["seed"])] = path
                bars.update(ids[run.name], completed=min(run.successes, run.needed))
            for run in runs.values():  # top up a split whose known outcomes cannot reach its count
                in_flight = run.submitted - len(run.outcomes)
                if run.successes + in_flight < run.needed:
                    if run.submitted >= len(run.candidates):
                        if in_flight == 0:
                            raise DataError(
                                f"split {run.name!r}: the expert succeeded in only {run.successes} of "
                                f"{run.submitted} scenes, {run.needed} needed; check the split spec"
                            )
                        continue
                    rate = max(run.successes / max(len(run.outcomes), 1), 0.3)
                    submit(run, math.ceil((run.needed - run.successes - in_flight) / rate) + 1)


class _NoProgress:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_display(enabled: bool):
    if not enabled:
        return _NoProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
