"""The demo loop: one step after another, each calling the stage's own public code in-process.

    data      generate_data (training.py)      MiniWorld episodes from the scripted expert (Ray tasks)
    train     train_policy (training.py)       Ray Train V2, 2 DDP workers; MLflow run; version @challenger
    export    export_policy (release.py)       ONNX graph + parity, attached to the version; ONNX vs torch speed
    evaluate  evaluate_policy (release.py)     val MAE; MiniWorld success next to the expert
    promote   promote_policy (release.py)      @champion moves if the demo gate passes (or the first champion)
    serve     start_serving (serving.py)       Ray Serve on 127.0.0.1 serving @champion (ONNX Runtime)
    robots    drive_fleet (fleet.py)           robots drive MiniWorld episodes through POST /v1/act, the
                                               expert drives the same scenes
    dagger_N  dagger_round (dagger.py)         the served policy drives train scenes over HTTP, the expert's
                                               labels go through /v1/feedback, the online update fine-tunes
                                               @champion (replay, gate, promotion), serving follows
    robots_N  drive_fleet (fleet.py)           the robots drive the same scenes again, after round N

The cluster (cluster.py) and Serve are shut down in `finally` (also on Ctrl-C and errors); a Ray
already running in this process (tests, `ray job submit`) is reused and left running, and only the
demo's own Serve application is removed from it. The summary is summary.py's.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from mobile_vla.demo.cluster import start_cluster, stop_cluster
from mobile_vla.demo.dagger import dagger_round, update_config
from mobile_vla.demo.fleet import drive_fleet
from mobile_vla.demo.release import evaluate_policy, export_policy, promote_policy
from mobile_vla.demo.serving import start_serving
from mobile_vla.demo.settings import DAGGER_SPLIT, EVAL_SPLIT, REGISTERED_MODEL, DemoConfig
from mobile_vla.demo.summary import build_summary, log_summary, print_summary, write_summary
from mobile_vla.demo.training import generate_data, train_policy

# -- the whole loop ---------------------------------------------------------------------------------
STEPS = ("cluster", "data", "train", "export", "evaluate", "promote", "serve", "robots")
BEFORE_DAGGER = "before DAgger"


def planned_steps(cfg: DemoConfig) -> list[str]:
    """Every step's name in order: STEPS, then dagger_N and robots_N for each DAgger round N."""
    rounds = [name for n in range(1, cfg.dagger_rounds + 1) for name in (f"dagger_{n}", f"robots_{n}")]
    return [*STEPS, *rounds]


@contextmanager
def _home_env(home: Path):
    """MOBILE_VLA_HOME = the demo's home for every stage (MLflow store, Ray results, tokens)."""
    saved = os.environ.get("MOBILE_VLA_HOME")
    os.environ["MOBILE_VLA_HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MOBILE_VLA_HOME", None)
        else:
            os.environ["MOBILE_VLA_HOME"] = saved


class _Steps:
    """Prints each step's heading and the time it took; remembers the times for the summary."""

    def __init__(self, console, names: list[str]) -> None:
        self.console, self.names, self.seconds = console, names, {}

    @contextmanager
    def step(self, name: str, title: str):
        index = self.names.index(name) + 1
        self.console.rule(f"[bold]{index}/{len(self.names)} {title}", align="left")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        self.console.print(f"[green]done[/green] {name} in {self.seconds[name]:.1f} s")

    @contextmanager
    def status(self, text: str, enabled: bool):
        if not enabled:
            yield lambda _: None
            return
        with self.console.status(text) as status:
            yield lambda line: status.update(f"{text}: {line}")


def _drive(cfg: DemoConfig, steps: _Steps, name: str, label: str, serving, data):
    """One drive of the robots over HTTP (the expert on the same scenes), printed next to each other."""
    with steps.step(name, f"robots ({label}): {cfg.robots} MiniWorld robots through POST /v1/act"):
        fleet = drive_fleet(cfg, serving, data, label)
        steps.console.print(
            f"{fleet.successes}/{fleet.robots} robots reached their target (expert on the same scenes: "
            f"{fleet.expert_successes}/{fleet.robots}), served by version {', '.join(fleet.model_versions)}; "
            f"round trip p50 {fleet.round_trip_p50_ms:.1f} ms, p99 {fleet.round_trip_p99_ms:.1f} ms"
        )
    return fleet


def run_demo(cfg: DemoConfig, console=None) -> dict:
    """Runs every step; returns the summary (also written to <home>/demo_summary.json)."""
    console = console or Console()
    home = cfg.resolved_home()
    home.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = _Steps(console, planned_steps(cfg))
    cluster = None
    with _home_env(home):
        try:
            with steps.step("cluster", "Ray: local cluster on 127.0.0.1 (or the one already running)"):
                cluster = start_cluster(cfg)
            with steps.step("data", f"data: {cfg.episodes} MiniWorld episodes from the scripted expert"):
                data = generate_data(cfg)
                console.print(
                    f"{'reused' if data.reused else 'wrote'} {data.episodes} episodes, {data.frames} frames "
                    f"in {data.folder}; expert success {data.expert_kept}/{data.expert_attempted}"
                )
                update_cfg = update_config(cfg, data) if cfg.dagger_rounds else None  # bad overrides fail now
            with steps.step(
                "train",
                f"train: {cfg.preset} policy, {cfg.epochs} epochs, Ray Train with "
                f"{cfg.train_workers} workers -> MLflow, @challenger",
            ):
                train = train_policy(cfg, data)
                console.print(
                    f"run {train.run_name} ({train.run_id}): {REGISTERED_MODEL} version {train.version}, "
                    f"val MAE {train.val_mae:.4f}"
                )
            with steps.step("export", "export: ONNX + parity, attached to the version"):
                with steps.status("exporting", cfg.progress) as say:
                    export = export_policy(train, data, say)
                console.print(
                    f"parity fp32 {export.parity_fp32:.2g}; one step torch {export.torch_ms:.2f} ms, "
                    f"ONNX Runtime {export.onnx_ms:.2f} ms ({export.speedup:.1f}x)"
                )
            with steps.step(
                "evaluate",
                f"evaluate: offline on {EVAL_SPLIT}, {cfg.closed_loop_episodes} closed-loop "
                "MiniWorld episodes next to the expert",
            ):
                evaluation = evaluate_policy(cfg, train, data)
                console.print(
                    f"closed-loop success {evaluation.success:.0%} "
                    f"[{evaluation.success_low:.0%}, {evaluation.success_high:.0%}], expert "
                    f"{evaluation.expert_success:.0%}; offline MAE {evaluation.offline_mae:.4f}"
                )
            with steps.step(
                "promote", f"promote: demo gate (closed-loop success >= {cfg.success_floor:.0%}, or the first champion)"
            ):
                promotion = promote_policy(cfg, train)
                console.print(f"{promotion.decision}: {promotion.reason}; @champion = version {promotion.champion}")
            with steps.step("serve", "serve: @champion on Ray Serve, 127.0.0.1"):
                with steps.status("deploying", cfg.progress):
                    serving = start_serving(cfg, cluster)
                console.print(f"serving version {serving.model_version} at {serving.url}/v1/act")
            fleets = [_drive(cfg, steps, "robots", BEFORE_DAGGER, serving, data)]
            rounds = []
            for n in range(1, cfg.dagger_rounds + 1):
                with steps.step(
                    f"dagger_{n}",
                    f"DAgger round {n}: the served policy drives {cfg.dagger_episodes} {DAGGER_SPLIT} scenes over "
                    "HTTP, the expert labels them via /v1/feedback, online update of @champion",
                ):
                    dagger = dagger_round(cfg, n, serving, data, update_cfg)
                    console.print(dagger.collect.summary())
                    console.print(dagger.update.summary())
                    console.print(f"serving version {dagger.served_version}")
                rounds.append(dagger)
                fleets.append(_drive(cfg, steps, f"robots_{n}", f"after DAgger round {n}", serving, data))
            steps.seconds["total"] = time.perf_counter() - started
            summary = build_summary(
                cfg, steps.seconds, data, train, export, evaluation, promotion, serving, fleets, rounds
            )
            path = write_summary(summary, home)
            log_summary(summary, fleets, train.run_id)
            print_summary(summary, console)
            console.print(f"summary: {path}")
            if cfg.keep_serving:
                console.print(
                    f"[bold]serving at {serving.url}/v1/act[/bold] (token: first line of "
                    f"{serving.tokens_file}); Ctrl-C to stop"
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:  # the way to stop serving: not an error
                    pass
            return summary
        finally:
            if cluster is not None:
                console.print("shutting down Serve and Ray" if cluster.owned else "removing the demo's Serve app")
                stop_cluster(cluster)
