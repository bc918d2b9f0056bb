"""Closed loop in MiniWorld at the control rate with an added round trip (issue 17): the same model on
the same scene seeds, three rows: no delay; the delay with `mobile_vla_client.ChunkExecutor` (the robot
executes its current chunk while the next request is in flight); the delay with blocking per-step
execution (send, stand still until the answer, execute its actions[0], send again). Success with Wilson
95% intervals and the mean |delta action| at chunk seams (the first command of each new chunk against
the command executed the tick before it). Writes benchmarks/results/delay_closed_loop.json.

    .venv/bin/python benchmarks/delay_closed_loop.py --model ~/.mobile_vla/model_cache/mobile-vla-policy/1 \
        --data data/nav --episodes 50
    .venv/bin/python benchmarks/delay_closed_loop.py --smoke    # random-init tiny model, 2 seeds, few steps

Time is simulated, nothing sleeps: the simulator steps once per control tick, the model answers in
process (runtime backend, `evaluate.rollout.worker_backend`) at once, and the answer becomes visible to
the robot ceil(round_trip / control period) ticks after the request (150 ms at 5 Hz: 1 tick). A request
carries the frame and state of the tick it is sent at, and the LSTM memory advances once per request,
as a server's memory token would. The episodes of one row step in lockstep (`evaluate.rollout.
run_lockstep`), so every row sees the same scenes; a row's success counts ticks, so time spent standing
still waiting for an answer is time lost. The seam statistic leaves out each episode's first chunk (a
start from standstill, the same in every row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "delay_closed_loop.json"
HELD_OUT = ["unseen_layout", "unseen_pair", "unseen_paraphrase", "visual_shift"]
MODES = ("zero_delay", "executor", "blocking")


def delay_ticks(round_trip_ms: float, control_hz: float) -> int:
    """Control ticks until an answer is visible: ceil(round trip / period) (150 ms at 5 Hz: 1)."""
    if round_trip_ms < 0 or control_hz <= 0:
        raise ValueError(f"round_trip_ms {round_trip_ms!r} must be >= 0 and control_hz {control_hz!r} > 0")
    return math.ceil(round(round_trip_ms * control_hz / 1000.0, 9))


class DelayedChunkPolicy:
    """A `run_lockstep` policy: the learner's chunks executed as a robot would with a delayed answer.

    `learner` has `start(episodes)`, `chunks(slots, images, state, instructions) -> (actions [B, K, 3],
    confidence [B])` and `state_input` (`ChunkLearner` over a runtime backend). `mode`: zero_delay
    (a fresh chunk every tick, its actions[0] executed at once), executor (one request in flight, a
    `ChunkExecutor` per episode) or blocking (one request, zeros until its answer, then its actions[0]).
    """

    needs_frames = True

    def __init__(self, learner, mode: str, delay: int, blend_steps: int = 2) -> None:
        from mobile_vla_client import ChunkExecutor

        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        self.learner, self.mode, self.delay, self.blend_steps = learner, mode, int(delay), blend_steps
        self._executor_type = ChunkExecutor
        self.seam_deltas: list[np.ndarray] = []  # |a_t - a_{t-1}| [3] at each seam (not an episode's first chunk)

    @property
    def state_input(self) -> str:
        return self.learner.state_input

    def reset_memory(self, slots: list[int]) -> None:
        self.learner.reset_memory(slots)

    def start(self, episodes: list[tuple[str, str]]) -> None:
        self.learner.start(episodes)
        n = len(episodes)
        self.tick = [0] * n  # per episode: the step about to be executed
        self.executors = [self._executor_type(self.blend_steps) for _ in range(n)]
        self.in_flight: list[tuple[int, np.ndarray, int, float] | None] = [None] * n  # (arrives, chunk, anchor, conf)
        self.previous = [np.zeros(3) for _ in range(n)]
        self.chunks_seen = [0] * n
        self.confidence = [math.nan] * n

    def act(self, slots, images, state, instructions, worlds):
        # 1. answers visible by this tick (the executor takes its chunk in at once)
        ready: dict[int, tuple] = {}
        for slot in slots:
            flight = self.in_flight[slot]
            if flight is not None and flight[0] <= self.tick[slot]:
                ready[slot], self.in_flight[slot] = flight, None
        # 2. requests: episodes with nothing in flight send this tick's frame and state (blocking: not in the
        #    tick it executes an answer; it sends the next frame once that command has run)
        send = [
            j
            for j, slot in enumerate(slots)
            if self.in_flight[slot] is None and not (self.mode == "blocking" and slot in ready)
        ]
        if send:
            chunks, confidence = self.learner.chunks(
                [slots[j] for j in send], images[send], state[send], [instructions[j] for j in send]
            )
            for row, j in enumerate(send):
                slot, t = slots[j], self.tick[slots[j]]
                flight = (t + self.delay, np.asarray(chunks[row], np.float64), t, float(confidence[row]))
                if self.mode == "zero_delay":
                    ready[slot] = flight
                else:
                    self.in_flight[slot] = flight
        # 3. the command of this tick
        actions = np.zeros((len(slots), 3), np.float32)  # [B, 3]
        confidence_now = np.full(len(slots), np.nan, np.float32)
        for j, slot in enumerate(slots):
            actions[j], confidence_now[j] = self._execute(slot, ready.get(slot))
        return actions, confidence_now

    def _execute(self, slot: int, answer: tuple | None) -> tuple[np.ndarray, float]:
        """The command of `slot` at its tick, given the answer that became visible now (or None)."""
        seam = False
        if answer is not None:
            self.confidence[slot] = answer[3]
        if self.mode == "executor":
            executor = self.executors[slot]
            if answer is not None:
                seam = executor.accept(answer[1], answer[2]).used
            action = executor.tick()
        elif answer is not None:  # zero_delay, blocking: the answer's actions[0]
            action, seam = answer[1][0], True
        else:  # blocking, waiting for the answer: stand still
            action = np.zeros(3)
        if seam:
            if self.chunks_seen[slot]:
                self.seam_deltas.append(np.abs(action - self.previous[slot]))
            self.chunks_seen[slot] += 1
        self.previous[slot] = np.asarray(action, np.float64)
        self.tick[slot] += 1
        return action, self.confidence[slot]


class ChunkLearner:
    """A runtime backend's whole chunks, one LSTM memory per episode (evaluate.rollout.BackendPolicy's
    bookkeeping; it returns only actions[:, 0])."""

    def __init__(self, backend) -> None:
        from mobile_vla.evaluate.rollout import BackendPolicy

        self.policy = BackendPolicy(backend)

    @property
    def state_input(self) -> str:
        return self.policy.state_input

    def start(self, episodes) -> None:
        self.policy.start(episodes)

    def reset_memory(self, slots) -> None:
        self.policy.reset_memory(slots)

    def chunks(self, slots, images, state, instructions):
        backend, rows = self.policy.backend, np.asarray(slots)
        h, c = self.policy.memory
        out = backend.predict(images, state[:, : backend.state_dim], instructions, (h[:, rows], c[:, rows]))
        h[:, rows], c[:, rows] = out.memory
        return np.asarray(out.actions), np.asarray(out.confidence)  # [B, K, 3], [B]


def row_summary(records, seam_deltas: list[np.ndarray]) -> dict:
    from mobile_vla.sim.success import wilson_interval

    n = len(records)
    successes = sum(r.outcome == "success" for r in records)
    low, high = wilson_interval(successes, n)
    deltas = np.asarray(seam_deltas).reshape(-1, 3)  # [seams, 3]
    return {
        "episodes": n,
        "success_rate": round(successes / n, 4),
        "wilson_95": [round(low, 4), round(high, 4)],
        "wrong_target_rate": round(sum(r.outcome == "wrong_target" for r in records) / n, 4),
        "timeout_rate": round(sum(r.outcome == "timeout" for r in records) / n, 4),
        "mean_steps": round(float(np.mean([r.steps for r in records])), 2),
        "collisions_per_episode": round(float(np.mean([r.collisions for r in records])), 3),
        "seams": int(len(deltas)),
        # mean over seams and the three components (m/s, m/s, rad/s), and per component
        "seam_mean_abs_delta": round(float(deltas.mean()), 4) if len(deltas) else None,
        "seam_mean_abs_delta_xyz": [round(float(v), 4) for v in deltas.mean(axis=0)] if len(deltas) else None,
        "outcomes": [r.outcome for r in records],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a trained model: models:/ URI or model folder")
    parser.add_argument("--smoke", action="store_true", help="a random-init tiny model, 2 seeds, 8 steps")
    parser.add_argument("--data", type=Path, default=None, help="dataset whose split spec to use")
    parser.add_argument("--splits", nargs="+", default=HELD_OUT)
    parser.add_argument("--episodes", type=int, default=50, help="scene seeds per split")
    parser.add_argument("--control-hz", type=float, default=5.0)
    parser.add_argument("--round-trip-ms", type=float, default=150.0)
    parser.add_argument("--blend-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.splits, args.episodes, args.max_steps = args.splits[:1], 2, args.max_steps or 8
    elif not args.model:
        parser.error("--model is required (or --smoke)")

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from mobile_vla.evaluate.closed_loop import scene_seeds, split_spec_for
    from mobile_vla.evaluate.rollout import (
        PolicySpec,
        RolloutConfig,
        job_scenes,
        run_lockstep,
        worker_backend,
        worker_slots,
    )
    from mobile_vla.tracking import resolve_model

    with tempfile.TemporaryDirectory(prefix="bench_delay_") as tmp:
        model = args.model
        if args.smoke:
            os.environ["MOBILE_VLA_HOME"] = tmp
            from mobile_vla.serve.sample_model import register_random_policy

            model = register_random_policy(preset="tiny", name="bench-random-tiny", alias="champion")
        resolved = resolve_model(model)
        backend = worker_backend(PolicySpec("model", model_path=str(resolved.path)))
        control_hz = args.control_hz
        settings = RolloutConfig(control_hz=control_hz, max_steps=args.max_steps)
        spec = split_spec_for(args.data)
        jobs = [(split, seed) for split in args.splits for seed in scene_seeds(spec, split, args.episodes)]
        scenes = job_scenes(jobs, spec.model_dump_json(), settings)
        worlds = worker_slots(scenes[0], settings.obs_size)
        delay = delay_ticks(args.round_trip_ms, control_hz)
        load_before, rows = os.getloadavg(), {}
        for mode in MODES:
            policy = DelayedChunkPolicy(ChunkLearner(backend), mode, delay, args.blend_steps)
            start = time.perf_counter()
            records = run_lockstep(worlds, scenes, policy, settings, episode_prefix=f"delay-{mode}")
            rows[mode] = {
                **row_summary(records, policy.seam_deltas),
                "wall_seconds": round(time.perf_counter() - start, 1),
            }
            r = rows[mode]
            print(
                f"{mode:>11}: success {r['success_rate']:6.1%} [{r['wilson_95'][0]:.1%}, {r['wilson_95'][1]:.1%}]"
                f"  seam |da| {r['seam_mean_abs_delta']}  steps {r['mean_steps']}  {r['wall_seconds']} s"
            )

    document = {
        "benchmark": "delay_closed_loop",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": "random-tiny (smoke)" if args.smoke else args.model,
        "data": str(args.data) if args.data else None,
        "splits": args.splits,
        "episodes_per_split": args.episodes,
        "seeds": [list(job) for job in jobs],
        "control_hz": control_hz,
        "round_trip_ms": args.round_trip_ms,
        "delay_ticks": delay,
        "blend_steps": args.blend_steps,
        "max_steps": args.max_steps,
        "backend": getattr(backend, "name", None),
        "machine": machine(load_before),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
