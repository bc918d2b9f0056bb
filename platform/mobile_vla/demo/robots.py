"""Simulated robots that drive MiniWorld episodes through the HTTP API, as a fleet would (Ray task side).

    rows = fan_out(drive_robots, [[("val", 1000040), ("val", 1000041)]], (spec_json, url, token, settings), ...)

One Ray task runs a group of robots: each robot is one `mobile_vla_client.Client` (its own robot id, its memory
token carried from answer to answer) and one MiniWorld episode. Every control step the group's
requests go out together from threads, so the server sees concurrent robots and may batch them.
The episode rules (success, wrong target, timeout, collisions) are closed-loop evaluation's
(`mobile_vla.evaluate.rollout.run_lockstep`); this module only adds the timings of each answer.
Before the robots, the scripted expert drives the same scenes (physics only), so each robot's
outcome has the expert's beside it on the same scene seed.
GL work stays inside the Ray task: one MiniWorld env per worker process, shared with evaluation.
"""

from __future__ import annotations

from mobile_vla.evaluate.rollout import (
    ExpertPolicy,
    HttpPolicy,
    RolloutConfig,
    job_scenes,
    run_lockstep,
    worker_slots,
)


class TimedHttpPolicy(HttpPolicy):
    """The served model, one robot client per episode, keeping each answer's timings."""

    def start(self, episodes: list[tuple[str, str]]) -> None:
        super().start(episodes)
        self.answers: dict[int, list[dict]] = {slot: [] for slot in range(len(episodes))}

    def note_answer(self, slot: int, answer) -> None:
        super().note_answer(slot, answer)
        self.answers[slot].append(
            {
                "round_trip_ms": answer.round_trip_ms,
                "server_ms": answer.latency_ms,
                "memory_reset": answer.memory_reset,
                "backend": answer.backend,
                "model_version": answer.model.version,
            }
        )


def drive_robots(
    jobs: list[tuple[str, int]], spec_json: str, endpoint: str, token: str, settings: RolloutConfig
) -> list[dict]:
    """Ray task body: the expert, then one robot per (split, seed), all stepped together; one dict per robot."""
    scenes = job_scenes(jobs, spec_json, settings)
    worlds = worker_slots(scenes[0], settings.obs_size)  # the worker's one GL context
    expert = run_lockstep(worlds, scenes, ExpertPolicy(settings.expert), settings)
    policy = TimedHttpPolicy(endpoint, token)
    try:
        records = run_lockstep(worlds, scenes, policy, settings)
        robot_ids = [client.robot_id for client in policy.clients]
    finally:
        policy.close()
    rows = []
    for slot, (scene, record, reference) in enumerate(zip(scenes, records, expert, strict=True)):
        answers = policy.answers.get(slot, [])
        rows.append(
            {
                "robot_id": robot_ids[slot],
                "seed": scene.seed,
                "instruction": scene.instruction,
                "outcome": record.outcome,
                "expert_outcome": reference.outcome,
                "steps": record.steps,
                "collisions": record.collisions,
                "requests": len(answers),
                "served_by": sorted(policy.served.get(slot, set())),
                "round_trip_ms": [a["round_trip_ms"] for a in answers],
                "server_ms": [a["server_ms"] for a in answers],
                "memory_resets": sum(bool(a["memory_reset"]) for a in answers),
                "backends": sorted({a["backend"] for a in answers}),
                "model_versions": sorted({str(a["model_version"]) for a in answers}),
            }
        )
    return rows
