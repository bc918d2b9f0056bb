"""The demo's summary: one dict (written as <home>/demo_summary.json and logged to the MLflow run),
a rich table of it, and a latency histogram of the HTTP answers logged next to it.
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
from mobile_vla.demo.settings import EVAL_SPLIT, EXPERIMENT, REGISTERED_MODEL
from mobile_vla.evaluate.tasks import jsonable
from mobile_vla.tracking import configure_mlflow
from mobile_vla.tracking.store import is_embedded, tracking_uri

SUMMARY_FILE = "demo_summary.json"
MLFLOW_DIR = "demo"


def build_summary(cfg, seconds, data, train, export, evaluation, promotion, serving, fleet) -> dict:
    """The summary dict (JSON-safe) of one demo run from each step's outcome and the step times."""
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
                "model_version": serving.model_version,
                "backend": serving.backend,
                "robots": fleet.robots,
                "successes": fleet.successes,
                "success_rate": fleet.success,
                "wilson_95": [fleet.success_low, fleet.success_high],
                "requests": fleet.requests,
                "round_trip_p50_ms": fleet.round_trip_p50_ms,
                "round_trip_p99_ms": fleet.round_trip_p99_ms,
                "server_p50_ms": fleet.server_p50_ms,
                "backends": fleet.backends,
                "served_by": fleet.served_by,
                "memory_resets": fleet.memory_resets,
            },
            "where_to_look": {
                "mlflow_ui": ui,
                "experiment": EXPERIMENT,
                "run_id": train.run_id,
                "registered_model": REGISTERED_MODEL,
                "model_version": train.version,
                "champion": promotion.champion,
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
    axes.set_title(f"{len(rows)} robots over HTTP")
    axes.legend()
    return figure


def log_summary(summary: dict, fleet, run_id: str) -> None:
    """Serving figures as metrics of the training run, with the summary and the latency plot."""
    configure_mlflow()
    client = MlflowClient()
    serving = summary["serving"]
    values = {
        "demo.http.success_rate": serving["success_rate"],
        "demo.http.round_trip_p50_ms": serving["round_trip_p50_ms"],
        "demo.http.round_trip_p99_ms": serving["round_trip_p99_ms"],
        "demo.onnx_speedup": summary["export"]["onnx_speedup"],
        "demo.total_seconds": summary["seconds"].get("total"),
    }
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, 0) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, summary, f"{MLFLOW_DIR}/{SUMMARY_FILE}")
    if fleet.requests:
        client.log_figure(run_id, latency_figure(fleet.rows), f"{MLFLOW_DIR}/http_latency.png")


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
            "robots driven over HTTP",
            f"{s['robots']} robots, {s['requests']} requests, "
            f"{s['successes']} reached the target = {_pct(s['success_rate'])}"
            f"{_interval(s['wilson_95'])}",
        ),
        (
            "",
            "latency per /v1/act",
            f"round trip p50 {_ms(s['round_trip_p50_ms'])}, p99 {_ms(s['round_trip_p99_ms'])}; "
            f"server p50 {_ms(s['server_p50_ms'])}",
        ),
        ("", "served by", ", ".join(s["served_by"]) or "-"),
        ("where to look", "MLflow UI", f"{w['mlflow_ui']}  (http://127.0.0.1:5000)"),
        ("", "experiment / run", f"{w['experiment']} / {w['run_id']}"),
        ("", "model", f"{w['registered_model']} version {w['model_version']} (@champion = {w['champion']})"),
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
