"""A recipe ablation table from closed-loop results on the SAME scene seeds (benchmarks/closed_loop.py JSON).

    .venv/bin/python benchmarks/ablation_report.py old=results/old.json all=results/all.json \
        --baseline old --out benchmarks/results/recipe_ablation.json

Per row and held-out split: success with its Wilson 95% interval, wrong target, timeout, collisions, SPL,
the AUROC of predicting failure from low confidence, and the ratio to the expert on the same seeds.
Against the baseline row: the paired difference in success on the same seeds (pooled over the splits)
and the exact McNemar p-value from the discordant seeds (one model succeeded, the other not).

When a document was written with `benchmarks/closed_loop.py --safety-ladder` (issue 18), a second table
compares each such row without and with the serving safety ladder on the same seeds, pooled over its
splits: success, collisions per episode, episodes with a collision, handovers, share of steps slowed and
stopped, and the paired difference in success (McNemar) and in collisions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import binomtest

from mobile_vla.sim.success import wilson_interval


def load_row(spec: str) -> tuple[str, dict]:
    """`label=path` -> (label, closed-loop document)."""
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"{spec!r}: expected LABEL=PATH")
    return label, json.loads(Path(path).read_text())


def pooled_outcomes(document: dict, splits: list[str]) -> list[bool]:
    """Success per seed, split after split (the pairing key is (split, seed index))."""
    return [o == "success" for split in splits for o in document["splits"][split]["outcomes"]]


def mcnemar(base: list[bool], other: list[bool]) -> dict:
    """Paired comparison on the same seeds: difference in success and the exact McNemar p-value."""
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    n = len(base)
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"difference": (gained - lost) / n, "gained": gained, "lost": lost, "seeds": n, "p_value": p}


def ablation_table(rows: list[tuple[str, dict]], baseline: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows (label, closed-loop document), in table order -> (JSON entries, markdown lines); `baseline` is the
    label the other rows are compared with on the same seeds (None: no comparison column values).
    """
    splits = list(rows[0][1]["splits"])
    base = dict(rows).get(baseline) if baseline else None
    table, lines = [], []
    header = (
        "| row | " + " | ".join(splits) + " | pooled | wrong target | timeout | collided | SPL | AUROC | vs baseline |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for label, document in rows:
        cells, entry = [], {"row": label, "splits": {}}
        for split in splits:
            policy, expert = document["splits"][split]["policy"], document["splits"][split]["expert"]
            low, high = policy["wilson_95"]
            cells.append(
                f"{policy['success_rate']:.1%} [{low:.0%}, {high:.0%}]"
                f" ({policy['success_rate'] / max(expert['success_rate'], 1e-9):.0%} of expert)"
            )
            entry["splits"][split] = {"policy": policy, "expert_success": expert["success_rate"]}
        outcomes = pooled_outcomes(document, splits)
        n, k = len(outcomes), sum(outcomes)
        low, high = wilson_interval(k, n)

        def mean_of(key: str, document: dict = document) -> float:
            values = [document["splits"][s]["policy"][key] for s in splits]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else float("nan")

        compared = mcnemar(pooled_outcomes(base, splits), outcomes) if base is not None else None
        entry.update(pooled={"success": k / n, "wilson_95": [low, high], "episodes": n}, versus_baseline=compared)
        versus = (
            ""
            if compared is None or label == baseline
            else (
                f"{compared['difference']:+.1%} (+{compared['gained']}/-{compared['lost']},"
                f" p={compared['p_value']:.2g})"
            )
        )
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {k / n:.1%} [{low:.0%}, {high:.0%}] | {mean_of('wrong_target_rate'):.1%}"
            f" | {mean_of('timeout_rate'):.1%} | {mean_of('collision_rate'):.1%} | {mean_of('spl'):.2f}"
            f" | {mean_of('failure_auroc'):.2f} | {versus} |"
        )
        table.append(entry)
    return table, lines


def safety_ladder_table(rows: list[tuple[str, dict]]) -> tuple[list[dict], list[str]]:
    """Rows whose splits carry `safety_ladder` (closed_loop.py --safety-ladder) -> (JSON entries, markdown
    lines) of no ladder -> ladder on the same seeds, pooled over the splits (episode-weighted); ([], [])
    when no row has it.
    """
    table, lines = [], []
    for label, document in rows:
        splits = [s for s, part in document["splits"].items() if part.get("safety_ladder")]
        if not splits:
            continue
        parts = [document["splits"][s] for s in splits]
        weights = [part["policy"]["episodes"] for part in parts]
        n = sum(weights)

        def pooled(side: str, key: str, parts: list[dict] = parts, weights: list[int] = weights, n: int = n):
            values = [(part[side].get(key), w) for part, w in zip(parts, weights, strict=True)]
            values = [(v, w) for v, w in values if v is not None]
            total = sum(w for _, w in values)
            return sum(v * w for v, w in values) / total if total else float("nan")

        plain = [o == "success" for part in parts for o in part["outcomes"]]
        laddered = [o == "success" for part in parts for o in part["ladder_outcomes"]]
        compared = mcnemar(plain, laddered)
        fewer = sum(c["collisions_fewer"] for c in (part["safety_ladder_comparison"] for part in parts))
        more = sum(c["collisions_more"] for c in (part["safety_ladder_comparison"] for part in parts))
        entry = {"row": label, "splits": splits, "episodes": n, "versus_no_ladder": compared}
        for side in ("policy", "safety_ladder"):
            entry[side] = {
                key: pooled(side, key)
                for key in (
                    "success_rate",
                    "collisions_per_episode",
                    "collision_rate",
                    "handover_rate",
                    "slowed_share",
                    "stopped_share",
                )
            }
        entry.update(collisions_fewer=fewer, collisions_more=more)
        p, s = entry["policy"], entry["safety_ladder"]
        lines.append(
            f"| {label} | {n} | {p['success_rate']:.1%} -> {s['success_rate']:.1%}"
            f" | {p['collisions_per_episode']:.2f} -> {s['collisions_per_episode']:.2f}"
            f" | {p['collision_rate']:.1%} -> {s['collision_rate']:.1%} | {s['handover_rate']:.1%}"
            f" | {s['slowed_share']:.1%} | {s['stopped_share']:.1%}"
            f" | {compared['difference']:+.1%} (+{compared['gained']}/-{compared['lost']}, p={compared['p_value']:.2g})"
            f" | {fewer} fewer / {more} more |"
        )
        table.append(entry)
    if not lines:
        return [], []
    header = (
        "| row (safety ladder) | episodes | success | collisions / episode | collided | handover | slowed"
        " | stopped | success vs no ladder | seeds' collisions |"
    )
    return table, [header, "|" + "---|" * (header.count("|") - 1), *lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", help="LABEL=closed_loop.json, in table order")
    parser.add_argument("--baseline", default=None, help="label of the row the others are compared with")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = [load_row(spec) for spec in args.rows]
    table, lines = ablation_table(rows, args.baseline)
    ladder, ladder_lines = safety_ladder_table(rows)
    print("\n".join(lines))
    if ladder_lines:
        print("\n" + "\n".join(ladder_lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {"benchmark": "recipe_ablation", "rows": table, "markdown": lines}
        if ladder:
            document.update(safety_ladder=ladder, safety_ladder_markdown=ladder_lines)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
