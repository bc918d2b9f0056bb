"""The demo's robots step: a fleet of simulated robots drives val scenes through the served model.

    fleet = drive_fleet(cfg, serving, data, "before DAgger")
    fleet.success, fleet.expert_success, fleet.model_versions, fleet.round_trip_p99_ms

The robots run as Ray tasks (`mobile_vla.demo.robots.drive_robots`, `ROBOTS_PER_TASK` per task) on
the val scene seeds just past the closed-loop evaluation's, so they see scenes evaluation did not;
every drive of one demo uses the same seeds, and the scripted expert drives each of them too, so the
robots' success sits next to the expert's on the same scenes (paired), before and after DAgger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mobile_vla.demo.robots import drive_robots
from mobile_vla.demo.serving import Serving
from mobile_vla.demo.settings import EVAL_SPLIT, DemoConfig
from mobile_vla.demo.training import DataOutcome
from mobile_vla.evaluate.closed_loop import scene_seeds, split_spec_for
from mobile_vla.evaluate.rollout import SUCCESS, RolloutConfig
from mobile_vla.evaluate.tasks import fan_out
from mobile_vla.sim.success import wilson_interval

ROBOTS_PER_TASK = 8  # robots stepped together by one Ray task (one MiniWorld GL context)


@dataclass
class FleetOutcome:
    """The robots' results next to the expert's on the same scenes, and what each /v1/act cost them."""

    label: str  # which drive: "before DAgger", "after DAgger round 1", ...
    split: str
    seeds: list[int]
    robots: int
    successes: int
    success: float
    success_low: float
    success_high: float
    expert_successes: int
    expert_success: float
    expert_low: float
    expert_high: float
    model_versions: list[str]  # the versions whose answers the robots got
    requests: int
    round_trip_p50_ms: float
    round_trip_p99_ms: float
    server_p50_ms: float
    backends: list[str]
    served_by: list[str]
    memory_resets: int
    rows: list[dict] = field(default_factory=list, repr=False)


def drive_fleet(cfg: DemoConfig, serving: Serving, data: DataOutcome, label: str) -> FleetOutcome:
    """`robots` MiniWorld episodes on val scene seeds past the closed-loop ones, through HTTP, with the
    scripted expert on the same seeds.
    """
    spec = split_spec_for(data.folder)
    seeds = scene_seeds(spec, EVAL_SPLIT, cfg.robots, seed_offset=cfg.closed_loop_episodes)
    jobs = [(EVAL_SPLIT, seed) for seed in seeds]
    groups = [jobs[i : i + ROBOTS_PER_TASK] for i in range(0, len(jobs), ROBOTS_PER_TASK)]
    settings = RolloutConfig(control_hz=data.control_hz, max_steps=cfg.episode_max_steps)
    rows = fan_out(
        drive_robots,
        groups,
        (spec.model_dump_json(), serving.url, serving.token, settings),
        f"{cfg.robots} robots over HTTP",
        cfg.progress,
    )
    rows.sort(key=lambda r: r["seed"])
    successes = sum(r["outcome"] == SUCCESS for r in rows)
    low, high = wilson_interval(successes, len(rows))
    expert_successes = sum(r["expert_outcome"] == SUCCESS for r in rows)
    expert_low, expert_high = wilson_interval(expert_successes, len(rows))
    round_trip = np.array([ms for r in rows for ms in r["round_trip_ms"]], np.float64)
    server = np.array([ms for r in rows for ms in r["server_ms"]], np.float64)

    def pct(values, q):
        return float(np.percentile(values, q)) if values.size else math.nan

    return FleetOutcome(
        label=label,
        split=EVAL_SPLIT,
        seeds=[r["seed"] for r in rows],
        robots=len(rows),
        successes=successes,
        success=successes / len(rows),
        success_low=low,
        success_high=high,
        expert_successes=expert_successes,
        expert_success=expert_successes / len(rows),
        expert_low=expert_low,
        expert_high=expert_high,
        model_versions=sorted({v for r in rows for v in r["model_versions"]}),
        requests=int(round_trip.size),
        round_trip_p50_ms=pct(round_trip, 50),
        round_trip_p99_ms=pct(round_trip, 99),
        server_p50_ms=pct(server, 50),
        backends=sorted({b for r in rows for b in r["backends"]}),
        served_by=sorted({s for r in rows for s in r["served_by"]}),
        memory_resets=sum(r["memory_resets"] for r in rows),
        rows=rows,
    )
