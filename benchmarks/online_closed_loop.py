"""Does an online update from fleet corrections fix a broken champion *when it drives*? Closed-loop
success before and after, on the same held-out scene seeds.

    make quality                                                # first: a trained `small` (@bc)
    .venv/bin/python benchmarks/online_closed_loop.py --base bc # then this, in the same platform home

1. The champion: the quality run's `small` model with a release bug (the head's angular-velocity bias
   drives hard right on every frame), registered and promoted (forced) as @champion.
2. Its closed-loop success on `--split` (MiniWorld, Ray tasks), logged on the version: "before".
3. The fleet's report: fresh expert-driven MiniWorld episodes (a new data seed, train-split scenes
   only, so nothing overlaps the held-out seeds) appended to the real feedback store step by step as
   operator corrections of what the champion did.
4. `run_online_update` (the job behind `mobile-vla online-update`): fine-tune on the corrections plus
   replay of the original data, register @challenger, closed-loop evaluation on the same seeds, and
   the gate with `require_closed_loop`: "after" and the decision.
Writes benchmarks/results/online_closed_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "online_closed_loop.json"
MODEL = "mobile-vla-policy"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", default=str(ROOT / ".mobile_vla" / "quality"), help="platform home of the quality run"
    )
    parser.add_argument("--data", default=None, help="the quality run's dataset (default HOME/data)")
    parser.add_argument("--base", default="challenger", help="alias of the trained model to break")
    parser.add_argument("--split", default="unseen_layout")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument(
        "--feedback-episodes", type=int, default=60, help="fresh expert episodes generated (train share used)"
    )
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate (a bias of -1.5 must move)")
    parser.add_argument("--trainable", default="policy_head", choices=["policy_head", "all"])
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def break_champion(base_uri: str, workdir: Path) -> str:
    """Registers the base model with a steering bug and makes it @champion; returns its version."""
    import mlflow
    import torch

    from mobile_vla import tracking
    from mobile_vla.policy import load_policy, save_policy
    from mobile_vla.tracking.lifecycle import GateConfig, promote

    base = tracking.resolve_model(base_uri)
    model, pre = load_policy(base.path / "policy")
    chunk = model.config.chunk
    with torch.no_grad():  # head output = (mean, log_var) x K x 3: the mean of angular_z on every k
        model.head[-1].bias[2 : 3 * chunk : 3] = -1.5  # tanh(-1.5) = -0.9 of the range: hard right
    save_policy(workdir / "broken" / "policy", model, pre)
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("mobile-vla-online")) as run:
        mlflow.set_tag("mlflow.runName", "broken-release")
    version = tracking.register_policy(
        workdir / "broken",
        run.info.run_id,
        name=MODEL,
        alias=None,
        tags={"source": "online_closed_loop benchmark: steering bug", "parent_version": str(base.version)},
    )
    promote(
        MODEL, version=version, gate=GateConfig(require_closed_loop=False, max_offline_mae_regression=None), force=True
    )
    return version


def send_corrections(root: Path, episodes: int, workdir: Path, champion: str) -> dict:
    """Fresh expert episodes (data seed 1) become feedback: every step an operator correction."""
    from mobile_vla_client import jpeg_base64

    from mobile_vla.data.episodes import read_episode
    from mobile_vla.online.feedback_store import FeedbackStore
    from mobile_vla.sim.generate import generate_dataset

    folder = workdir / "fleet_drives"
    manifest = generate_dataset(folder, episodes, seed=1, progress=True)
    names = manifest["splits"]["train"]
    store = FeedbackStore(root)
    steps = 0
    for e, name in enumerate(names):
        episode = read_episode(folder / name)
        T = episode.num_frames
        for t in range(T):
            expert = [float(v) for v in episode.actions[t]]
            store.append(
                {
                    "robot_id": f"robot-{e % 4}",
                    "episode_id": f"fleet-{e}",
                    "step": t,
                    "instruction": episode.instruction,
                    "image": jpeg_base64(episode.images[t], quality=90),
                    "state": [float(v) for v in episode.state[t]] if episode.state is not None else [0.0, 0.0, 0.0],
                    "action_executed": [expert[0], expert[1], -0.9],
                    "action_corrected": expert,
                    "intervention": True,
                    "episode_done": t == T - 1,
                    "success": True if t == T - 1 else None,
                    "model_version": champion,
                }
            )
            steps += 1
    store.close()
    return {"episodes": len(names), "steps": steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    home = Path(args.home).resolve()
    data = Path(args.data).resolve() if args.data else home / "data"
    os.environ["MOBILE_VLA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from mobile_vla import tracking
    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop
    from mobile_vla.online.update import load_update_config, run_online_update

    tracking.configure_mlflow()
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="online-closed-loop-", dir=home))
    feedback_root = workdir / "feedback"
    champion = break_champion(f"models:/{MODEL}@{args.base}", workdir)
    print(f"broken champion: v{champion}", flush=True)

    before = evaluate_closed_loop(f"models:/{MODEL}/{champion}", args.split, args.eval_episodes, data=data)
    tracking.log_version_metrics(MODEL, champion, before.metrics(primary=True))
    print(f"before: success {before.policy.success_rate:.3f} (expert {before.expert.success_rate:.3f})", flush=True)

    fleet = send_corrections(feedback_root, args.feedback_episodes, workdir, champion)
    print(f"feedback: {fleet}", flush=True)

    shipped = ROOT / "jobs" / "configs" / "online_update.yaml"
    cfg = load_update_config(
        shipped,
        [
            f"feedback.root={feedback_root}",
            f"replay.data={data}",
            f"workdir={workdir / 'update'}",
            "feedback.min_new_episodes=4",
            f"finetune.steps={args.steps}",
            f"finetune.lr={args.lr}",
            f"finetune.trainable={args.trainable}",
            "finetune.device=cpu",
            "closed_loop.enabled=true",
            f"closed_loop.split={args.split}",
            f"closed_loop.episodes={args.eval_episodes}",
            "gate.require_closed_loop=true",
            f"gate.min_episodes={args.eval_episodes}",
        ],
    )
    report = run_online_update(cfg)
    after = report.metrics.get("challenger", {})
    print(report.summary(), flush=True)

    document = {
        "benchmark": "online_closed_loop",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{os.cpu_count()}-core CPU box",
        "base": f"models:/{MODEL}@{args.base}",
        "broken_champion_version": champion,
        "split": args.split,
        "eval_episodes": args.eval_episodes,
        "feedback": fleet,
        "finetune": {"steps": args.steps, "lr": args.lr, "trainable": args.trainable},
        "before": {
            "success_rate": round(before.policy.success_rate, 4),
            "wilson_95": [round(before.policy.success_low, 4), round(before.policy.success_high, 4)],
            "expert_success_rate": round(before.expert.success_rate, 4),
        },
        "after": {k: round(v, 4) for k, v in after.items() if k.startswith("closed_loop.") or k.startswith("online.")},
        "champion_offline": {k: round(v, 4) for k, v in report.metrics.get("champion", {}).items()},
        "challenger_version": report.challenger_version,
        "decision": report.status,
        "reason": report.reason,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
