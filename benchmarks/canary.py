"""Canary rollout on a simulated fleet (issue 18): MiniWorld robots drive over loopback HTTP against the
Serve app while `mobile-vla rollout`'s controller puts a release on `@canary`.

    .venv/bin/python benchmarks/canary.py                        # the quality run's home (make quality)
    .venv/bin/python benchmarks/canary.py --sample --robots 12   # a tiny random model: a smoke run only

Phases, one Serve app (champion + CanaryPolicy + ingress), one fleet of `--robots` robots (fixed robot
ids, so the sticky buckets are fixed; each robot drives one episode after another on held-out scenes):
1. champion: the fleet drives on the champion alone for `--baseline-s` (its success rate: the reference).
2. bad release: the steering bug of benchmarks/online_closed_loop.py (hard right on every frame) goes on
   canary at `--share` percent; the controller must roll it back on its own within 60 s. The fleet's
   success over the episodes that ran during that window is compared with the champion phase's.
   How the bug is made here: the champion's exported files with angular_z's de-normalisation range
   shifted by -0.9 of its half-width (what the head's tanh bias of -1.5 does, tanh(-1.5) = -0.9), so no
   ONNX export runs; `--bias` sets the fraction.
3. good release: the champion's files under a new version number (same behaviour): widened in
   `--good-steps` and promoted. The champion is moved back to the original version at the end.
Writes benchmarks/results/canary.json. On a busy 2-core box the figures are LOADED.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "canary.json"
MODEL = "mobile-vla-policy"
SUCCESS = "success"  # = mobile_vla.evaluate.rollout.SUCCESS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=str(ROOT / ".mobile_vla" / "quality"), help="platform home (trained model)")
    parser.add_argument("--sample", action="store_true", help="a fresh home with a tiny random model (smoke run)")
    parser.add_argument("--robots", type=int, default=12, help="fleet size (>= 10)")
    parser.add_argument("--split", default="unseen_layout")
    parser.add_argument("--share", type=float, default=10.0, help="the bad release's canary share (percent)")
    parser.add_argument("--bias", type=float, default=0.9, help="angular_z shift, fraction of its half-range")
    parser.add_argument("--baseline-s", type=float, default=60.0, help="champion-only phase length")
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--good-steps", default="10,50,100")
    parser.add_argument("--max-steps", type=int, default=120, help="episode step cap")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def copy_release(source: Path, bias: float) -> str:
    """A new version from `source`'s exported files; with `bias`, angular_z's range shifted right."""
    from mobile_vla.export.signature import ONNX_DIR, SIGNATURE_FILE
    from mobile_vla.policy.preprocessing import PREPROCESSING_FILE
    from mobile_vla.serve.sample_model import register_version_copy

    if not bias:
        return register_version_copy(source, MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "release"
        shutil.copytree(source / "policy", folder / "policy")
        shutil.copytree(source / ONNX_DIR, folder / ONNX_DIR)
        signature_path = folder / ONNX_DIR / SIGNATURE_FILE
        signature = json.loads(signature_path.read_text())
        prep_path = folder / signature["preprocessing"]["saved_at"] / PREPROCESSING_FILE
        prep = json.loads(prep_path.read_text())
        half = (prep["action_high"][2] - prep["action_low"][2]) / 2
        for key, sig_key in (("action_low", "low"), ("action_high", "high")):
            prep[key][2] -= bias * half  # every answer's angular_z: bias x half-range to the right
            signature["actions"][sig_key] = prep[key]
        prep_path.write_text(json.dumps(prep, indent=2) + "\n")
        signature_path.write_text(json.dumps(signature, indent=2) + "\n")
        return register_version_copy(folder, MODEL)


class Fleet:
    """`robots` robots with fixed ids driving MiniWorld episodes over HTTP, one lockstep round after another."""

    def __init__(self, url: str, token: str, robots: int, split: str, max_steps: int):
        self.url, self.token, self.robots, self.split, self.max_steps = url, token, robots, split, max_steps
        self.episodes: list[dict] = []  # robot, start, end, outcome, versions
        self.stop = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        from mobile_vla.evaluate.closed_loop import scene_seeds
        from mobile_vla.evaluate.rollout import HttpPolicy, RolloutConfig, run_lockstep, worker_slots
        from mobile_vla.sim.scenes import scene_from_seed
        from mobile_vla.sim.split_spec import default_split_spec

        robots = [f"robot-{i:02d}" for i in range(self.robots)]

        class FleetPolicy(HttpPolicy):  # the fleet's robots keep their ids from episode to episode
            def start(self, episodes):
                super().start([(robot, instruction) for robot, (_, instruction) in zip(robots, episodes, strict=True)])

        spec = default_split_spec()
        settings = RolloutConfig(max_steps=self.max_steps)
        worlds = None
        while not self.stop.is_set():
            seeds = scene_seeds(spec, self.split, self.robots, seed_offset=self.rounds * self.robots)
            scenes = [
                scene_from_seed(self.split, s, spec).model_copy(update={"max_steps": self.max_steps}) for s in seeds
            ]
            worlds = worlds or worker_slots(scenes[0], settings.obs_size)
            policy = FleetPolicy(self.url, self.token)
            start = time.time()
            try:
                records = run_lockstep(worlds, scenes, policy, settings, episode_prefix="fleet")
            finally:
                policy.close()
            end = time.time()
            for robot, record in zip(robots, records, strict=True):
                versions = sorted({s.split()[0].split("/")[-1] for s in record.served_by})
                self.episodes.append(
                    {"robot": robot, "start": start, "end": end, "outcome": record.outcome, "versions": versions}
                )
            self.rounds += 1


def success(episodes: list[dict], start: float, end: float) -> dict:
    """Success over the episodes that overlapped [start, end]."""
    chosen = [e for e in episodes if e["end"] >= start and e["start"] <= end]
    wins = sum(e["outcome"] == SUCCESS for e in chosen)
    return {"episodes": len(chosen), "success": wins / len(chosen) if chosen else None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_home(args) -> tuple[Path, str, str, str, Path, str]:
    """(home, champion version, bad release, good release, tokens file, operator token)."""
    from mobile_vla import tracking
    from mobile_vla.serve.auth import create_tokens_file

    home = Path(tempfile.mkdtemp(prefix="canary-home-")) if args.sample else Path(args.home)
    os.environ["MOBILE_VLA_HOME"] = str(home)
    if args.sample:
        from mobile_vla.serve.sample_model import register_random_policy

        register_random_policy(preset="tiny", alias="champion")
    original = tracking.get_version_by_alias(MODEL, "champion")
    if original is None:
        raise SystemExit(f"{home}: no {MODEL}@champion (run make quality, or pass --sample)")
    source = tracking.resolve_model(f"models:/{MODEL}/{original}").path
    bad, good = copy_release(source, args.bias), copy_release(source, 0.0)
    tokens = home / "serve" / "canary-bench-tokens"
    tokens.unlink(missing_ok=True)
    return home, original, bad, good, tokens, create_tokens_file(tokens)


def deploy(tokens: Path) -> str:
    """The app with a canary on a local Ray; returns its URL."""
    import ray
    from ray import serve

    from mobile_vla.serve.app import ServeAppConfig, compose_app
    from mobile_vla.serve.settings import CanaryConfig

    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYOPENGL_PLATFORM": "egl"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = ServeAppConfig(
        tokens_file=str(tokens),
        max_batch_size=16,
        alias_poll_s=1.0,
        deadline_s=30.0,
        canary=CanaryConfig(mirror_rate=1.0),
    )
    serve.run(compose_app(app_args), name="canary-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def rollouts(args, url: str, token: str, fleet: Fleet, bad: str, good: str) -> dict:
    """Phase 2 (the bad release on canary) and phase 3 (the good one widened); their reports."""
    from mobile_vla.serve.canary import on_canary
    from mobile_vla.serve.rollout import HttpKpis, RolloutController, RolloutPlan, parse_steps

    robots = [f"robot-{i:02d}" for i in range(args.robots)]
    kpis = HttpKpis(url, token)
    try:
        plan = RolloutPlan(model=MODEL, version=bad, steps=[args.share, 50, 100], hold_s=args.hold_s)
        t0 = time.time()
        report = RolloutController(plan, kpis).run()
        rolled = time.time()
        out = {
            "bad_release": {
                "version": bad,
                "share": args.share,
                "robots_on_canary": [r for r in robots if on_canary(r, args.share)],
                "outcome": report.outcome,
                "reason": report.reason,
                "seconds_to_decision": round(rolled - t0, 1),
                "within_60_s": report.outcome == "rolled_back" and rolled - t0 <= 60,
                "fleet_during_window": success(fleet.episodes, t0, rolled),
                "decisions": report.decisions,
            }
        }
        plan = RolloutPlan(model=MODEL, version=good, steps=parse_steps(args.good_steps), hold_s=args.hold_s)
        t1 = time.time()
        report = RolloutController(plan, kpis).run()
        out["good_release"] = {
            "version": good,
            "outcome": report.outcome,
            "reason": report.reason,
            "seconds": round(time.time() - t1, 1),
            "decisions": report.decisions,
        }
    finally:
        kpis.close()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.robots < 10:
        raise SystemExit("--robots: the issue asks for a fleet of at least 10")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import ray
    from ray import serve

    from mobile_vla import tracking

    home, original, bad, good, tokens, token = prepare_home(args)
    url = deploy(tokens)
    fleet = Fleet(url, token, args.robots, args.split, args.max_steps)
    driver = threading.Thread(target=fleet.run, daemon=True)
    result: dict = {"home": str(home), "sample_model": args.sample, "robots": args.robots, "champion": original}
    started = time.time()
    try:
        driver.start()
        time.sleep(args.baseline_s)
        result["champion_phase"] = success(fleet.episodes, started, time.time())
        result.update(rollouts(args, url, token, fleet, bad, good))
    finally:
        fleet.stop.set()
        driver.join(300)
        tracking.set_alias(MODEL, "champion", original, actor="benchmark", reason="canary benchmark: restore")
        serve.shutdown()
        ray.shutdown()
    champion, window = result["champion_phase"]["success"], result["bad_release"]["fleet_during_window"]["success"]
    # the goal: the bad release costs the fleet at most 5 points over its window (doing better is within)
    result["fleet_within_5_points"] = None if champion is None or window is None else champion - window <= 0.05
    result["episodes"] = fleet.episodes
    result["wall_s"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "episodes"}
    for phase in ("bad_release", "good_release"):
        summary[phase] = {k: v for k, v in summary[phase].items() if k != "decisions"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
