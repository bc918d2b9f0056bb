"""Benchmark closed-loop success: the scripted expert and a model on the held-out splits (and with
--with-val the in-distribution val split), side by side on the same scene seeds, with Wilson 95%
intervals. Writes benchmarks/results/closed_loop.json.

    .venv/bin/python benchmarks/closed_loop.py --model expert --episodes 200
    .venv/bin/python benchmarks/closed_loop.py --model models:/mobile-vla-policy@champion --data data/nav
    .venv/bin/python benchmarks/closed_loop.py --model random-tiny --episodes 20    # plumbing and speed
    .venv/bin/python benchmarks/closed_loop.py --model models:/mobile-vla-policy@champion --data data/nav \
        --splits unseen_layout unseen_pair unseen_paraphrase --with-val --memory-reset-every window

`--model random-tiny` registers a random-weight tiny policy, exported to ONNX, in a temporary
platform home (what a trained version looks like, minus the training). `--data` gives the split
spec the model was trained with (held-out pairs, templates, layouts); the default spec otherwise.
Use >= 200 episodes per split for success rates worth comparing (50 swing by about +-7 points).
Besides wall time the JSON has the CPU the Ray tasks spent per episode, which does not depend on
what else the machine runs, and the load average before and after.

Issue 15 diagnostics: `--with-val` adds the val split after --splits (not by default: benchmarks/
ablation_report.py pools every split of the file as held-out); each split records `in_distribution`
(val: training layouts, pairs and templates, never trained on) and `comparison` pools success per
kind with the gap between them
(`evaluate.closed_loop.split_comparison`); `--memory-reset-every N|window` resets the policy's LSTM
memory every N steps (window: the model's training W) to measure memory skew, recorded per split.

Issue 18 (closed-loop half of safe stop): `--safety-ladder` drives every seed a second time with the
serving safety ladder applied to each executed step (evaluate/rollout.py `SafetyLadderPolicy`, the
code of serve/safety.py): per split `safety_ladder` (success, collisions per episode, episodes with a
collision, handovers, share of steps slowed/stopped) next to `policy` (no ladder, same seeds) and
`safety_ladder_comparison` (paired per seed); benchmarks/ablation_report.py shows the columns.

    .venv/bin/python benchmarks/closed_loop.py --model models:/mobile-vla-policy@champion --data data/nav \
        --splits unseen_layout unseen_pair unseen_paraphrase visual_shift --with-val --safety-ladder \
        --out benchmarks/results/closed_loop_safety_ladder.json

Issue 15: `--chunk-ensemble M` executes the temporal ensemble of the overlapping chunks (ACT; the chunk
planned a steps ago weighted exp(-M * a)) instead of each step's newest first action; recorded per split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "closed_loop.json"
HELD_OUT = ["unseen_layout", "unseen_pair", "unseen_paraphrase", "visual_shift"]
IN_DISTRIBUTION = "val"


def summary(s) -> dict:
    return {
        "episodes": s.episodes,
        "success_rate": round(s.success_rate, 4),
        "wilson_95": [round(s.success_low, 4), round(s.success_high, 4)],
        "wrong_target_rate": round(s.wrong_target_rate, 4),
        "timeout_rate": round(s.timeout_rate, 4),
        "spl": None if s.spl != s.spl else round(s.spl, 4),
        "collision_rate": round(s.collision_rate, 4),
        "collisions_per_episode": round(s.collisions_per_episode, 4),
        "handover_rate": round(s.handover_rate, 4),
        "slowed_share": None if s.slowed_share != s.slowed_share else round(s.slowed_share, 4),
        "stopped_share": None if s.stopped_share != s.stopped_share else round(s.stopped_share, 4),
        "mean_steps": round(s.mean_steps, 2),
        "confidence_success": None if s.confidence_success != s.confidence_success else round(s.confidence_success, 4),
        "confidence_failure": None if s.confidence_failure != s.confidence_failure else round(s.confidence_failure, 4),
        "failure_auroc": None if s.failure_auroc != s.failure_auroc else round(s.failure_auroc, 4),
        "collisions_by_outcome": s.collisions_by_outcome,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="expert", help="'expert', 'random-tiny', a models:/ URI or a model folder")
    parser.add_argument("--data", type=Path, default=None, help="dataset whose split spec to use")
    parser.add_argument("--splits", nargs="+", default=HELD_OUT)
    parser.add_argument("--with-val", action="store_true", help="also the val split (in-distribution) after --splits")
    parser.add_argument(
        "--memory-reset-every",
        metavar="N|window",
        default=None,
        help="reset the policy's LSTM memory every N steps ('window': the model's training W)",
    )
    parser.add_argument(
        "--safety-ladder",
        action="store_true",
        help="also drive each seed with the serving safety ladder applied (paired with the plain run)",
    )
    parser.add_argument(
        "--chunk-ensemble",
        type=float,
        metavar="DECAY",
        default=None,
        help="execute the temporal ensemble of overlapping chunks, weights exp(-DECAY * age) (0: equal)",
    )
    parser.add_argument("--episodes", type=int, default=200, help="scene seeds per split")
    parser.add_argument("--episodes-per-task", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from mobile_vla.evaluate.closed_loop import (
        evaluate_closed_loop,
        safety_ladder_comparison,
        split_comparison,
        split_spec_for,
    )
    from mobile_vla.ray_session import ensure_ray

    with tempfile.TemporaryDirectory(prefix="bench_closed_loop_") as tmp:
        model = args.model
        if model == "random-tiny":
            os.environ["MOBILE_VLA_HOME"] = tmp
            from mobile_vla.serve.sample_model import register_random_policy

            model = register_random_policy(preset="tiny", name="bench-random-tiny", alias="champion")
        ensure_ray()
        spec = split_spec_for(args.data)
        load_before = os.getloadavg()
        results, reports = {}, []
        splits = list(dict.fromkeys(args.splits + ([IN_DISTRIBUTION] if args.with_val else [])))
        for split in splits:
            report = evaluate_closed_loop(
                model,
                split,
                args.episodes,
                spec=spec,
                max_steps=args.max_steps,
                episodes_per_task=args.episodes_per_task,
                record_frames=0,
                memory_reset_every=args.memory_reset_every,
                safety_ladder=args.safety_ladder or None,
                chunk_ensemble=args.chunk_ensemble,
            )
            reports.append(report)
            results[split] = {
                "in_distribution": report.settings["in_distribution"],
                "memory_reset_every": report.settings["memory_reset_every"],
                "chunk_ensemble": report.settings["chunk_ensemble"],
                "state_input": report.settings["state_input"],
                "seeds": [report.seeds[0], report.seeds[-1] + 1],
                "policy": summary(report.policy),
                "expert": summary(report.expert),
                "wall_seconds": round(report.seconds, 1),
                "worker_cpu_seconds_per_episode": round(report.worker_cpu_seconds / len(report.seeds), 3),
                "backend_chain": report.settings["prefer"] or "default (onnx-cpu if exported, else torch)",
                # per seed, in seed order: what paired comparisons between models (same seeds) need
                "outcomes": [row["outcome"] for row in report.episodes],
                "expert_outcomes": [row["expert"]["outcome"] for row in report.episodes],
                "mean_confidence": [row["mean_confidence"] for row in report.episodes],
                "collisions": [row["collisions"] for row in report.episodes],
            }
            if report.safety_ladder is not None:
                results[split].update(
                    safety_ladder=summary(report.safety_ladder),
                    safety_ladder_comparison=safety_ladder_comparison(report.episodes),
                    safety_limits=report.settings["safety_limits"],
                    ladder_outcomes=[row["safety_ladder"]["outcome"] for row in report.episodes],
                    ladder_collisions=[row["safety_ladder"]["collisions"] for row in report.episodes],
                    ladder_levels=[row["safety_ladder"]["safety_levels"] for row in report.episodes],
                )
            p, e = report.policy, report.expert
            print(
                f"{split:>18}: {args.model} {p.success_rate:6.1%} [{p.success_low:.1%}, {p.success_high:.1%}]"
                f"  expert {e.success_rate:6.1%} [{e.success_low:.1%}, {e.success_high:.1%}]"
                f"  {report.seconds:6.1f} s, {report.worker_cpu_seconds / len(report.seeds):.2f} CPU s/episode"
            )
            if report.safety_ladder is not None:
                s = report.safety_ladder
                print(
                    f"{'':>18}  ladder {s.success_rate:6.1%}, collisions/episode {p.collisions_per_episode:.2f} -> "
                    f"{s.collisions_per_episode:.2f}, collided {p.collision_rate:.1%} -> {s.collision_rate:.1%}, "
                    f"handover {s.handover_rate:.1%}, slowed {s.slowed_share:.1%}, stopped {s.stopped_share:.1%}"
                )
        ray.shutdown()
        gap = split_comparison(reports)["generalisation_gap"]
        if gap is not None:
            print(f"in-distribution minus held-out success: {gap:+.1%}")

    document = {
        "benchmark": "closed_loop",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": args.model,
        "data": str(args.data) if args.data else None,
        "episodes_per_split": args.episodes,
        "episodes_per_task": args.episodes_per_task,
        "max_steps": args.max_steps,
        "memory_reset_every": args.memory_reset_every,
        "safety_ladder": args.safety_ladder,
        "chunk_ensemble": args.chunk_ensemble,
        "machine": machine(load_before),
        "splits": results,
        # in-distribution (val) vs held-out success, pooled, and the gap
        "comparison": split_comparison(reports),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
