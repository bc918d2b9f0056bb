"""The demo's summary: one dict (written as <home>/demo_summary.json and logged to the MLflow run),
a rich table of it, and a latency histogram of the HTTP answers logged next to it.

`robots.drives` holds every drive of the robots over HTTP (before DAgger, then after each round): the
robots' success with its Wilson interval next to the scripted expert's on the same scene seeds, and
the model versions that answered; `dagger.rounds` what each round collected and what its update did.
"""

from __future__ import annotations

import math
import os
import resource
import shlex
import time
from pathlib import Path

import psutil
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric
from rich.table import Table

from mobile_vla.data.manifest import write_json_atomic
from mobile_vla.demo.settings import DAGGER_SPLIT, EVAL_SPLIT, EXPERIMENT, REGISTERED_MODEL
from mobile_vla.evaluate.rollout import SUCCESS
from mobile_vla.evaluate.tasks import jsonable
from mobile_vla.tracking import CHAMPION, configure_mlflow, get_version_by_alias
from mobile_vla.tracking.store import is_embedded, tracking_uri

SUMMARY_FILE = "demo_summary.json"
MLFLOW_DIR = "demo"


def drive_summary(fleet) -> dict:
    """One drive of the robots: their success next to the expert's on the same seeds, who answered, latency."""
    return {
        "label": fleet.label,
        "served_versions": fleet.model_versions,
        "split": fleet.split,
        "seeds": fleet.seeds,
        "robots": fleet.robots,
        "successes": fleet.successes,
        "success_rate": fleet.success,
        "wilson_95": [fleet.success_low, fleet.success_high],
        "expert": {
            "successes": fleet.expert_successes,
            "success_rate": fleet.expert_success,
            "wilson_95": [fleet.expert_low, fleet.expert_high],
        },
        "requests": fleet.requests,
        "round_trip_p50_ms": fleet.round_trip_p50_ms,
        "round_trip_p99_ms": fleet.round_trip_p99_ms,
        "server_p50_ms": fleet.server_p50_ms,
        "backends": fleet.backends,
        "served_by": fleet.served_by,
        "memory_resets": fleet.memory_resets,
    }


def round_summary(dagger) -> dict:
    """One DAgger round: the collection over HTTP, the online update's decision and metrics, serving after."""
    collected, update = dagger.collect, dagger.update
    return {
        "round": dagger.round,
        "beta": dagger.beta,
        "collect": {
            "split": collected.split,
            "episodes": len(collected.episodes),
            "steps": collected.steps,
            "policy_steps": collected.learner_steps,
            "corrections": collected.corrections,
            "success_rate": collected.outcome_rate(SUCCESS),
            "driven_by": collected.model_version,
            "feedback": collected.feedback,
        },
        "update": {
            "status": update.status,
            "champion_version": update.champion_version,
            "challenger_version": update.challenger_version,
            "feedback_episodes": update.feedback_episodes,
            "metrics": update.metrics,
            "reason": update.reason,
            "run_id": update.run_id,
        },
        "served_version": dagger.served_version,
        "seconds": {k: round(v, 1) for k, v in dagger.seconds.items()},
    }


def build_summary(cfg, seconds, data, train, export, evaluation, promotion, serving, fleets, rounds) -> dict:
    """The summary dict (JSON-safe) of one demo run from each step's outcome and the step times;
    `fleets`: the robots' drives (the first before DAgger), `rounds`: the DAgger rounds between them.
    """
    home = cfg.resolved_home()
    ui = "mobile-vla mlflow-ui"
    if not is_embedded():  # a tracking server: its own UI
        ui = f"open {tracking_uri()}"
    elif home != Path(".mobile_vla").resolve():  # the UI command reads the home from the environment
        ui = f"MOBILE_VLA_HOME={shlex.quote(str(home))} {ui}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = {"cpus": os.cpu_count(), "load_average_1m": load, "cpu_seconds_process_tree": process_tree_cpu_seconds()}
    return jsonable(
        {
            "preset": cfg.preset,
            "home": str(home),
            "machine": machine,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "data": {
                "folder": str(data.folder),
                "episodes": data.episodes,
                "frames": data.frames,
                "expert_success": {
                    "kept": data.expert_kept,
                    "attempted": data.expert_attempted,
                    "rate": data.expert_kept / max(data.expert_attempted, 1),
                },
                "reused": data.reused,
            },
            "training": {
                "run_id": train.run_id,
                "run_name": train.run_name,
                "epochs": train.epochs,
                "workers": train.workers,
                "val_mae": train.val_mae,
                "val_loss": train.val_loss,
                "seconds": round(seconds.get("train", math.nan), 1),
            },
            "evaluation": {
                "split": EVAL_SPLIT,
                "offline_mae": evaluation.offline_mae,
                "episodes": evaluation.episodes,
                "model": {
                    "success_rate": evaluation.success,
                    "wilson_95": [evaluation.success_low, evaluation.success_high],
                },
                "expert": {
                    "success_rate": evaluation.expert_success,
                    "wilson_95": [evaluation.expert_low, evaluation.expert_high],
                },
                "results": str(evaluation.results),
            },
            "export": {
                "parity_fp32_max_abs_diff": export.parity_fp32,
                "parity_sequence_max_abs_diff": export.parity_sequence,
                "step_ms_torch": export.torch_ms,
                "step_ms_onnx": export.onnx_ms,
                "onnx_speedup": export.speedup,
            },
            "promotion": {
                "version": train.version,
                "decision": promotion.decision,
                "reason": promotion.reason,
                "first_champion": promotion.first_champion,
                "champion": promotion.champion,
                "gate": f"demo gate: closed-loop success >= {cfg.success_floor} on "
                f"{cfg.closed_loop_episodes} episodes, or the first champion",
            },
            "serving": {
                "url": serving.url,
                "model_version": ", ".join(fleets[0].model_versions),  # what the robots' first drive got
                "final_model_version": serving.model_version,  # what /v1/model answers at the end
                "backend": serving.backend,
                "robots": cfg.robots,
            },
            "robots": {
                "split": EVAL_SPLIT,
                "paired": "the scripted expert drove the same scene seeds as the robots",
                "drives": [drive_summary(fleet) for fleet in fleets],
            },
            "dagger": {
                "split": DAGGER_SPLIT,
                "rounds": [round_summary(dagger) for dagger in rounds],
            },
            "where_to_look": {
                "mlflow_ui": ui,
                "experiment": EXPERIMENT,
                "run_id": train.run_id,
                "registered_model": REGISTERED_MODEL,
                "model_version": train.version,
                "champion": promotion.champion,
                "final_champion": get_version_by_alias(REGISTERED_MODEL, CHAMPION),  # after the DAgger rounds
                "online_update_runs": [dagger.update.run_id for dagger in rounds],
                "summary": str(home / SUMMARY_FILE),
            },
        }
    )


def process_tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants (the Ray processes it started):
    a load-independent measure of the demo's work, where wall time on a shared box is not. A lower
    bound: descendants that exited without being reaped by one of ours are not counted.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            continue
    return round(total, 1)


def write_summary(summary: dict, home: Path) -> Path:
    """Writes <home>/demo_summary.json atomically; returns its path."""
    path = Path(home) / SUMMARY_FILE
    write_json_atomic(path, summary)
    return path


def latency_figure(rows: list[dict]):
    """Histogram of the robots' round-trip times (what a robot waits per step) and the server's share."""
    round_trip = [ms for r in rows for ms in r["round_trip_ms"]]
    server = [ms for r in rows for ms in r["server_ms"]]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    bins = 40
    axes.hist(round_trip, bins=bins, alpha=0.7, label=f"round trip (n={len(round_trip)})")
    axes.hist(server, bins=bins, alpha=0.7, label="inside the server")
    axes.set_xlabel("ms per /v1/act")
    axes.set_ylabel("requests")
    axes.set_title(f"{len(rows)} robot episodes over HTTP")
    axes.legend()
    return figure


def log_summary(summary: dict, fleets: list, run_id: str) -> None:
    """Serving figures as metrics of the training run, with the summary and the latency plot. The
    robots' figures are logged once per drive, the drive's index as the metric step (0: before DAgger,
    N: after round N); each DAgger round's at its round number.
    """
    configure_mlflow()
    client = MlflowClient()
    now = int(time.time() * 1000)
    values = [
        ("demo.onnx_speedup", summary["export"]["onnx_speedup"], 0),
        ("demo.total_seconds", summary["seconds"].get("total"), 0),
    ]
    for step, drive in enumerate(summary["robots"]["drives"]):
        versions = drive["served_versions"]
        values += [
            ("demo.http.success_rate", drive["success_rate"], step),
            ("demo.http.expert_success_rate", drive["expert"]["success_rate"], step),
            ("demo.http.round_trip_p50_ms", drive["round_trip_p50_ms"], step),
            ("demo.http.round_trip_p99_ms", drive["round_trip_p99_ms"], step),
            ("demo.http.served_version", _number(versions[0]) if len(versions) == 1 else None, step),
        ]
    for dagger in summary["dagger"]["rounds"]:
        step, collected, update = dagger["round"], dagger["collect"], dagger["update"]
        values += [
            ("demo.dagger.corrections", collected["corrections"], step),
            ("demo.dagger.collect_success_rate", collected["success_rate"], step),
            ("demo.dagger.promoted", float(update["status"] == "promoted"), step),
        ]
    metrics = [
        Metric(k, float(v), now, step)
        for k, v, step in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, summary, f"{MLFLOW_DIR}/{SUMMARY_FILE}")
    rows = [row for fleet in fleets for row in fleet.rows]
    if any(row["round_trip_ms"] for row in rows):
        client.log_figure(run_id, latency_figure(rows), f"{MLFLOW_DIR}/http_latency.png")


def _number(text: str) -> float | None:
    """A model version as a number (MLflow's versions are integers), else None."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _interval(pair) -> str:
    return "" if not pair or None in pair else f" [{pair[0]:.0%}, {pair[1]:.0%}]"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def summary_rows(summary: dict) -> list[tuple[str, str, str]]:
    """The printed table's rows: (section, what, result) per line."""
    d, t, ev, ex = summary["data"], summary["training"], summary["evaluation"], summary["export"]
    p, s, w, sec = summary["promotion"], summary["serving"], summary["where_to_look"], summary["seconds"]
    expert, m = d["expert_success"], summary["machine"]
    mae = "-" if t["val_mae"] is None else f"{t['val_mae']:.4f}"
    speedup = "-" if ex["onnx_speedup"] is None else f"{ex['onnx_speedup']:.1f}x"
    return [
        ("data", "episodes / frames", f"{d['episodes']} / {d['frames']}" + (" (reused)" if d["reused"] else "")),
        ("", "expert success", f"{expert['kept']}/{expert['attempted']} = {_pct(expert['rate'])}"),
        ("training", "epochs, workers", f"{t['epochs']} epochs on {t['workers']} Ray Train workers"),
        ("", "val MAE (best epoch)", mae),
        ("", "time", f"{sec.get('train', 0):.0f} s"),
        (
            "closed loop",
            f"success on {ev['episodes']} {ev['split']} scenes",
            f"model {_pct(ev['model']['success_rate'])}{_interval(ev['model']['wilson_95'])} vs expert "
            f"{_pct(ev['expert']['success_rate'])}{_interval(ev['expert']['wilson_95'])} (Wilson 95%)",
        ),
        ("", "offline MAE (val)", "-" if ev["offline_mae"] is None else f"{ev['offline_mae']:.4f}"),
        (
            "export",
            "parity (max abs diff)",
            f"fp32 {ex['parity_fp32_max_abs_diff']:.1e}, sequence {ex['parity_sequence_max_abs_diff']:.1e}",
        ),
        (
            "",
            "one step, batch 1",
            f"torch {_ms(ex['step_ms_torch'])}, ONNX Runtime {_ms(ex['step_ms_onnx'])} ({speedup})",
        ),
        ("promotion", f"version {p['version']}: {p['decision']}", p["reason"]),
        ("", "@champion", f"version {p['champion']}"),
        (
            "serving",
            "server, version",
            f"{s['url']} ({s['backend']}), version {s['model_version']}"
            + (f" -> {s['final_model_version']}" if s["final_model_version"] != s["model_version"] else ""),
        ),
        *robots_rows(summary["robots"]),
        *dagger_rows(summary["dagger"]),
        ("where to look", "MLflow UI", f"{w['mlflow_ui']}  (http://127.0.0.1:5000)"),
        ("", "experiment / run", f"{w['experiment']} / {w['run_id']}"),
        (
            "",
            "model",
            f"{w['registered_model']} version {w['model_version']} (@champion = {w['final_champion']})",
        ),
        (
            "",
            "total time",
            f"{sec.get('total', 0):.0f} s  ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in sec.items() if k != "total")
            + ")",
        ),
        (
            "",
            "machine",
            f"{m['cpus']} cores, load average {m['load_average_1m'] or 0:.1f}, "
            f"at least {m['cpu_seconds_process_tree']:.0f} CPU-seconds used by the demo's processes",
        ),
    ]


def _rate(successes: int, n: int, rate, pair) -> str:
    return f"{successes}/{n} = {_pct(rate)}{_interval(pair)}"


def robots_rows(robots: dict) -> list[tuple[str, str, str]]:
    """One row per drive of the robots: their success next to the expert's on the same scenes."""
    rows = []
    for i, d in enumerate(robots["drives"]):
        e = d["expert"]
        rows.append(
            (
                "robots over HTTP" if i == 0 else "",
                f"{d['label']} (version {', '.join(d['served_versions']) or '-'})",
                f"robots {_rate(d['successes'], d['robots'], d['success_rate'], d['wilson_95'])} vs expert "
                f"{_rate(e['successes'], d['robots'], e['success_rate'], e['wilson_95'])} on the same "
                f"{d['robots']} {d['split']} scene seeds (Wilson 95%)",
            )
        )
    if robots["drives"]:
        first = robots["drives"][0]
        rows.append(
            (
                "",
                "latency per /v1/act",
                f"round trip p50 {_ms(first['round_trip_p50_ms'])}, p99 {_ms(first['round_trip_p99_ms'])}; "
                f"server p50 {_ms(first['server_p50_ms'])} ({first['requests']} requests, {first['label']})",
            )
        )
    return rows


def dagger_rows(dagger: dict) -> list[tuple[str, str, str]]:
    """Three rows per DAgger round: what the robots collected, what the update decided, what serves now."""
    rows = []
    for r in dagger["rounds"]:
        c, u, n = r["collect"], r["update"], r["round"]
        share = c["policy_steps"] / c["steps"] if c["steps"] else None
        before, after = u["metrics"].get("champion", {}), u["metrics"].get("challenger", {})
        errors = [
            f"{label} {before[key]:.4f} -> {after[key]:.4f}"
            for key, label in (("online.corrected_mae", "corrected-step MAE"), ("online.replay_mae", "replay MAE"))
            if key in before and key in after
        ]
        rows += [
            (
                "DAgger" if n == 1 else "",
                f"round {n}: collect (beta {r['beta']:g})",
                f"{c['episodes']} {c['split']} scenes over HTTP, {c['steps']} steps ({_pct(share)} policy-driven), "
                f"{c['corrections']} expert labels via /v1/feedback; "
                f"success while collecting {_pct(c['success_rate'])}",
            ),
            (
                "",
                f"round {n}: online update",
                f"{u['status']}: v{u['champion_version']} -> challenger v{u['challenger_version'] or '-'}"
                + (f"; {', '.join(errors)}" if errors else "")
                + (f"; gate {u['reason']}" if u["reason"] else ""),
            ),
            (
                "",
                f"round {n}: serving",
                f"version {r['served_version']} (followed in {r['seconds'].get('swap', 0):.0f} s)",
            ),
        ]
    return rows


def print_summary(summary: dict, console) -> None:
    """Prints the summary table and where to look in the MLflow UI."""
    table = Table(title=f"mobile-vla demo ({summary['preset']})", title_justify="left", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("what")
    table.add_column("result", overflow="fold")
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
    where = summary["where_to_look"]
    console.print(
        f"MLflow UI: {where['mlflow_ui']}   then http://127.0.0.1:5000 -> experiment {where['experiment']}, "
        f"run {where['run_id']}; Models -> {where['registered_model']} version {where['model_version']}",
        soft_wrap=True,
    )
