"""The model card: each registered version's description in the MLflow UI, as short markdown.

    refresh_model_card("mobile-vla-policy", "7", champion_alias="champion")   # collect, render, write
    markdown = render_model_card(collect_card_facts(client, "mobile-vla-policy", "7", "champion"))

What a person needs before promoting, on the version's page: what it was trained on (data path and the
manifest's counts, preset, steps, hardware, time), closed-loop success per split next to the scripted
expert's on the same seeds and the current champion's, each with its Wilson 95% interval, the gate's
decision and why, and links to the trajectory and latency plots logged on the version's run.

Everything comes from the registry: the version's tags (`metric.closed_loop.<split>.*` written by
evaluation, `promotion.*` by the gate), its source run (params `data.path`, `model.preset`, ...,
tag `data.counts` from training, metric `best_step`, artifacts under `evaluation/<split>/`, `plots/`,
`demo/`) and the champion version's tags. The card is rewritten whenever results land on the version
(`log_version_metrics`, an evaluation's artifacts, a gate decision), so it never describes an older
evaluation; the champion column is the champion at the time of writing (the card says which).

A card stays under MLflow's 5000-character description column (plots are dropped first, then splits).
A note given at registration (`register_policy(description=...)`) is kept as tag `card.note` and shown
at the top.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mobile_vla.sim.success import wilson_interval
from mobile_vla.tracking.store import mlflow_client

log = logging.getLogger(__name__)

NOTE_TAG = "card.note"  # the registration's own description, kept above the card
DATA_COUNTS_TAG = "data.counts"  # run tag: the manifest's {split: {episodes, frames}} as JSON
MAX_CHARS = 5000  # MLflow's SQL store: model_versions.description is VARCHAR(5000)
PLOT_FOLDERS = ("evaluation", "plots", "demo")  # run artifact folders whose .png files the card links
_SPLIT_METRIC = re.compile(r"^metric\.closed_loop\.(?P<split>[^.]+)\.success_rate$")
_LATENCY_WORDS = ("latency", "round_trip")


@dataclass
class Interval:
    """A success rate with its Wilson 95% interval, and the episodes it was measured on."""

    rate: float
    low: float
    high: float
    episodes: int | None = None

    def text(self) -> str:
        return f"{self.rate:.1%} [{self.low:.1%}, {self.high:.1%}]"


@dataclass
class SplitRow:
    """Closed-loop success on one split: this version, the expert on the same seeds, the champion."""

    split: str
    policy: Interval
    expert: Interval | None = None
    champion: Interval | None = None


@dataclass
class CardFacts:
    """Everything the card shows (see `collect_card_facts`); `render_model_card` is a pure function of it."""

    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    note: str = ""
    source: str = ""  # how the version came to be: "train", "online-update", "sweep", ...
    run_id: str | None = None
    experiment_id: str | None = None
    training: dict[str, str] = field(default_factory=dict)  # row label -> text, in order
    splits: list[SplitRow] = field(default_factory=list)
    primary_split: str | None = None  # the split the gate reads (evaluation's first --split)
    offline: dict[str, float] = field(default_factory=dict)  # split -> MAE
    champion_version: str | None = None
    gate: dict[str, str] = field(default_factory=dict)  # the version's promotion.* tags, prefix removed
    plots: list[tuple[str, str]] = field(default_factory=list)  # (label, run artifact path)
    written: str = ""  # UTC time the card was written


# -- reading the registry ---------------------------------------------------------------------------
def _interval(metrics: dict[str, float], prefix: str) -> Interval | None:
    """`<prefix>success_rate` with `_low`/`_high` (recomputed from `episodes` when absent), or None."""
    rate = metrics.get(f"{prefix}success_rate")
    if rate is None or not math.isfinite(rate):
        return None
    episodes = metrics.get(f"{prefix}episodes")
    low, high = metrics.get(f"{prefix}success_low"), metrics.get(f"{prefix}success_high")
    if (low is None or high is None) and episodes:
        low, high = wilson_interval(rate * episodes, episodes)
    if low is None or high is None:
        low, high = rate, rate
    return Interval(rate, low, high, int(episodes) if episodes else None)


def _metrics(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            try:
                out[key.removeprefix("metric.")] = float(value)
            except ValueError:
                continue
    return out


def split_rows(metrics: dict[str, float], champion: dict[str, float] | None) -> list[SplitRow]:
    """One row per split with `closed_loop.<split>.success_rate` among `metrics` (version metric keys)."""
    splits = sorted({m["split"] for key in metrics if (m := _SPLIT_METRIC.match(f"metric.{key}"))})
    rows = []
    for split in splits:
        prefix = f"closed_loop.{split}."
        policy = _interval(metrics, prefix)
        if policy is None:
            continue
        rows.append(
            SplitRow(
                split,
                policy,
                expert=_interval(metrics, f"{prefix}expert_"),
                champion=_interval(champion, prefix) if champion else None,
            )
        )
    return rows


def dataset_tags(manifest: dict) -> dict[str, str]:
    """Run tags describing a dataset from its manifest (training sets them; the card reads them)."""
    counts = {
        split: {"episodes": int(c["episodes"]), "frames": int(c["frames"])}
        for split, c in (manifest.get("counts") or {}).items()
    }
    return {DATA_COUNTS_TAG: json.dumps(counts, separators=(",", ":"))[:4900]}


def _training_rows(run, version_tags: dict[str, str]) -> dict[str, str]:
    """What the version was trained on and how, from its source run's params, tags and metrics."""
    if run is None:
        return {}
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    rows: dict[str, str] = {}
    data = params.get("data.path") or params.get("replay.data") or ""
    counts = _counts_text(tags.get(DATA_COUNTS_TAG))
    if data or counts:
        rows["data"] = " · ".join(x for x in (f"`{data}`" if data else "", counts) if x)
    preset = params.get("model.preset") or version_tags.get("preset")
    if preset:
        rows["model"] = f"preset {preset}"
    steps = metrics.get("best_step")
    epoch = metrics.get("best_epoch") or version_tags.get("epoch")
    schedule = [f"{int(steps)} optimiser steps" if steps is not None else ""]
    if epoch not in (None, "", "None"):
        schedule.append(f"best checkpoint at epoch {int(float(epoch))}")
    if params.get("train.epochs"):
        schedule.append(f"of {params['train.epochs']} epochs")
    if any(schedule):
        rows["training"] = ", ".join(x for x in schedule if x)
    if "scaling.use_gpu" in params:
        hardware = "GPU" if params["scaling.use_gpu"].lower() == "true" else "CPU"
        workers = params.get("scaling.num_workers", "1")
        rows["compute"] = f"{hardware}, {workers} Ray Train worker{'s' if workers != '1' else ''}"
    if run.info.end_time and run.info.start_time:
        minutes = (run.info.end_time - run.info.start_time) / 60000.0
        rows["compute"] = (rows.get("compute", "") + f", {minutes:.1f} min wall").lstrip(", ")
    commit = tags.get("mlflow.source.git.commit")
    if commit and commit != "unknown":
        dirty = " (uncommitted changes)" if tags.get("mobile_vla.git_dirty") == "true" else ""
        rows["code"] = f"commit `{commit[:10]}`{dirty}"
    return rows


def _counts_text(raw: str | None) -> str:
    try:
        counts = json.loads(raw) if raw else {}
    except ValueError:
        return ""
    parts = [
        f"{split} {c['episodes']:,} episodes / {c['frames']:,} frames"
        for split, c in counts.items()
        if split != "total" and isinstance(c, dict) and "episodes" in c and "frames" in c
    ]
    return "; ".join(parts)


def _plots(client, run_id: str | None) -> list[tuple[str, str]]:
    """(label, artifact path) of the .png files under the run's plot folders (two levels deep)."""
    if not run_id:
        return []
    found: list[str] = []

    def walk(path: str, depth: int) -> None:
        for entry in client.list_artifacts(run_id, path):
            if entry.is_dir and depth < 2:
                walk(entry.path, depth + 1)
            elif entry.path.endswith(".png"):
                found.append(entry.path)

    for folder in PLOT_FOLDERS:
        walk(folder, 1)
    # trajectories first (what a person checks), then latency, then the rest
    rank = {True: 0, False: 1}
    found.sort(key=lambda p: (rank["trajectories" in p], rank[any(w in p for w in _LATENCY_WORDS)], p))
    return [(_plot_label(path), path) for path in found]


def _plot_label(path: str) -> str:
    parts = path.split("/")
    stem = parts[-1].removesuffix(".png").replace("_", " ")
    if parts[0] == "evaluation" and len(parts) == 3:
        return f"{stem}, {parts[1]}"
    return stem


def collect_card_facts(client, name: str, version: str, champion_alias: str) -> CardFacts:
    """Reads what the card shows from the registry (the version, its run, the champion's version)."""
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags)
    run = None
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except Exception as exc:  # a deleted run: the card says less, it is still written
            log.warning("model card of %s/%s: cannot read run %s: %s", name, version, mv.run_id, exc)
    try:
        champion_version = str(client.get_model_version_by_alias(name, champion_alias).version)
    except Exception:  # no champion yet
        champion_version = None
    champion = None
    if champion_version and champion_version != str(version):
        champion = _metrics(dict(client.get_model_version(name, champion_version).tags))
    metrics = _metrics(tags)
    offline = {
        key.split(".")[1]: value
        for key, value in metrics.items()
        if key.startswith("offline.") and key.endswith(".mae") and key.count(".") == 2
    }
    return CardFacts(
        name=name,
        version=str(version),
        aliases=sorted(getattr(mv, "aliases", None) or []),
        note=tags.get(NOTE_TAG, ""),
        source=tags.get("source", "train" if tags.get("train_run") else ""),
        run_id=mv.run_id,
        experiment_id=run.info.experiment_id if run else None,
        training=_training_rows(run, tags),
        splits=split_rows(metrics, champion),
        primary_split=tags.get("evaluation.closed_loop.split"),
        offline=offline,
        champion_version=champion_version,
        gate={k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")},
        plots=_plots(client, mv.run_id) if run else [],
        written=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# -- rendering --------------------------------------------------------------------------------------
def _artifact_link(facts: CardFacts, path: str) -> str:
    """The MLflow UI's page of a run artifact (a hash route, relative to wherever the UI is served)."""
    return f"#/experiments/{facts.experiment_id}/runs/{facts.run_id}/artifactPath/{path}"


def _gate_lines(facts: CardFacts) -> list[str]:
    gate = facts.gate
    if not gate.get("decision"):
        return ["Not gated yet: `mobile-vla promote --model NAME --version V` runs the gate."]
    compared = gate.get("compared_to", "none")
    against = "as the first champion" if compared == "none" else f"against champion v{compared}"
    lines = [f"**{gate['decision']}** {against} ({gate.get('time', '?')}): {gate.get('reason', '')}"]
    try:
        checks = json.loads(gate.get("checks") or "[]")
    except ValueError:
        checks = []
    lines += [f"- {'pass' if c.get('passed') else 'FAIL'}: {c.get('name')} ({c.get('detail')})" for c in checks]
    if gate.get("superseded_by"):
        lines.append(f"\nSuperseded as champion by v{gate['superseded_by']} ({gate.get('superseded_time', '?')}).")
    return lines


def _split_table(facts: CardFacts, rows: list[SplitRow]) -> list[str]:
    if not rows:
        return ["No closed-loop evaluation yet: `mobile-vla evaluate --model models:/NAME/V --closed-loop`."]
    if facts.champion_version == facts.version:
        champion_head = "champion (this version)"
    elif facts.champion_version:
        champion_head = f"champion v{facts.champion_version}"
    else:
        champion_head = "champion (none yet)"
    lines = [
        f"| split | episodes | this version | expert (same seeds) | {champion_head} |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"**{row.split}** (gate)" if row.split == facts.primary_split else row.split
        champion = row.champion.text() if row.champion else "-"
        if facts.champion_version == facts.version:
            champion = row.policy.text()
        episodes = "-" if row.policy.episodes is None else str(row.policy.episodes)
        expert = row.expert.text() if row.expert else "-"
        lines.append(f"| {name} | {episodes} | {row.policy.text()} | {expert} | {champion} |")
    return lines


def _render(facts: CardFacts, rows: list[SplitRow], plots: list[tuple[str, str]]) -> str:
    aliases = ", ".join(f"@{a}" for a in facts.aliases) or "none"
    head = f"**{facts.name} v{facts.version}** · aliases: {aliases}"
    if facts.source:
        head += f" · from {facts.source}"
    out = [head]
    if facts.note:
        out += ["", facts.note]
    out += ["", "#### Trained on"]
    if facts.training:
        out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.training.items()]
    else:
        out.append("No training run recorded with this version.")
    if facts.run_id:
        run = f"[run {facts.run_id[:8]}](#/experiments/{facts.experiment_id}/runs/{facts.run_id})"
        out.append(f"\nSource: {run}.")
    out += ["", "#### Closed-loop success (Wilson 95% interval)"] + _split_table(facts, rows)
    if facts.offline:
        out.append("\nOffline MAE: " + ", ".join(f"{s} {v:.4f}" for s, v in sorted(facts.offline.items())) + ".")
    out += ["", "#### Promotion gate"] + _gate_lines(facts)
    out += ["", "#### Plots"]
    out += [f"- [{label}]({_artifact_link(facts, path)})" for label, path in plots] or ["None logged yet."]
    out += ["", f"_Card written {facts.written} by the platform; rewritten on every evaluation and gate decision._"]
    return "\n".join(out)


def render_model_card(facts: CardFacts, max_chars: int = MAX_CHARS) -> str:
    """The card as markdown, at most `max_chars` (plots dropped first, then splits past the gate's)."""
    rows, plots = list(facts.splits), list(facts.plots)
    text = _render(facts, rows, plots)
    while len(text) > max_chars and plots:
        plots.pop()
        text = _render(facts, rows, plots)
    if len(text) > max_chars:  # keep the gate's split
        rows.sort(key=lambda r: r.split != facts.primary_split)
    while len(text) > max_chars and len(rows) > 1:
        rows.pop()
        text = _render(facts, rows, plots)
    return text[:max_chars]


def refresh_model_card(name: str, version: str, *, champion_alias: str, strict: bool = False) -> str | None:
    """Rewrites the version's description with its card; returns it. A failure is logged and None
    returned (the results it describes are already stored), or raised with `strict`.
    """
    try:
        client = mlflow_client()
        card = render_model_card(collect_card_facts(client, name, str(version), champion_alias))
        client.update_model_version(name, str(version), description=card)
        return card
    except Exception as exc:
        if strict:
            raise
        log.warning("model card of %s/%s not written: %s: %s", name, version, type(exc).__name__, exc)
        return None
