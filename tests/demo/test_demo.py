"""`mobile-vla demo --preset tiny` end to end on the shared Ray cluster: real MiniWorld data, Ray Train
(2 workers), MLflow SQLite store, ONNX export, closed-loop evaluation, promotion, Ray Serve on
127.0.0.1, robots driving MiniWorld episodes over HTTP with the expert on the same scenes, one DAgger
round through the fleet path (collect over /v1/act + /v1/feedback, online update, gate, promotion,
hot swap) and the robots again. One demo run is shared by the module."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from ray import serve
from rich.console import Console

from mobile_vla.cli import main
from mobile_vla.demo.runner import run_demo
from mobile_vla.demo.settings import APP_NAME, tiny
from mobile_vla.errors import ConfigError
from mobile_vla.sim.success import wilson_interval
from mobile_vla.tracking import configure_mlflow

DEMO_ARGS = [
    "--preset",
    "tiny",
    "--episodes",
    "8",
    "--epochs",
    "1",
    "--robots",
    "2",
    "--closed-loop-episodes",
    "2",
    "--port",
    "0",
    "--no-progress",
]
MODEL = "mobile-vla-policy"
DAGGER_EPISODES = 4  # the tiny preset's dagger_episodes

pytestmark = pytest.mark.slow  # the whole loop: data, training, export, evaluation, Serve, robots, DAgger


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILE_VLA_HOME", str(path))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield path


@pytest.fixture(scope="module")
def demo(ray_cluster, demo_home):
    """(exit status, printed output, summary) of one tiny demo through the CLI entry point."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["demo", *DEMO_ARGS, "--home", str(demo_home)])
    summary = json.loads((demo_home / "demo_summary.json").read_text())
    return status, out.getvalue(), summary


def _client():
    configure_mlflow()
    return MlflowClient()


def test_demo_exits_zero_and_prints_the_summary(demo):
    status, printed, summary = demo
    assert status == 0
    for section in (
        "data",
        "training",
        "closed loop",
        "export",
        "promotion",
        "serving",
        "robots over HTTP",
        "DAgger",
        "where to look",
    ):
        assert section in printed
    assert "before DAgger" in printed and "after DAgger round 1" in printed
    assert "mobile-vla mlflow-ui" in printed and summary["training"]["run_id"] in printed
    assert set(summary["seconds"]) >= {
        "cluster",
        "data",
        "train",
        "export",
        "evaluate",
        "promote",
        "serve",
        "robots",
        "dagger_1",
        "robots_1",
        "total",
    }


def test_summary_data_training_and_evaluation(demo):
    _, _, summary = demo
    data, training, evaluation = summary["data"], summary["training"], summary["evaluation"]
    assert data["episodes"] == 8 and data["frames"] > 8 and not data["reused"]
    assert data["expert_success"]["kept"] == 8 and data["expert_success"]["attempted"] >= 8
    assert training["epochs"] == 1 and training["workers"] == 2 and math.isfinite(training["val_mae"])
    assert evaluation["episodes"] == 2 and math.isfinite(evaluation["offline_mae"])
    for who in ("model", "expert"):
        rate, (low, high) = evaluation[who]["success_rate"], evaluation[who]["wilson_95"]
        assert 0.0 <= low <= rate <= high <= 1.0


def test_export_parity_and_speed_are_measured(demo):
    export = demo[2]["export"]
    assert export["parity_fp32_max_abs_diff"] < 1e-3
    assert export["step_ms_torch"] > 0 and export["step_ms_onnx"] > 0
    assert export["onnx_speedup"] == pytest.approx(export["step_ms_torch"] / export["step_ms_onnx"], rel=1e-6)


def test_first_champion_is_served_and_robots_drive_over_http(demo):
    _, _, summary = demo
    promotion, serving, before = summary["promotion"], summary["serving"], summary["robots"]["drives"][0]
    version = summary["where_to_look"]["model_version"]
    # A fresh home has no champion: the version becomes it whether or not it passed the floor,
    # and the summary says which.
    assert promotion["first_champion"] is True and promotion["champion"] == version
    assert promotion["decision"] in ("promoted", "forced")
    if promotion["decision"] == "forced":
        assert "first champion" in promotion["reason"] and "success_floor" in promotion["reason"]
    assert serving["model_version"] == version and serving["backend"] == "onnx-cpu"
    assert before["label"] == "before DAgger" and before["served_versions"] == [version]
    assert before["robots"] == 2 and before["requests"] >= 2
    assert before["served_by"] == [f"{MODEL}/{version} onnx-cpu"]
    assert before["success_rate"] == before["successes"] / 2
    assert 0 < before["round_trip_p50_ms"] <= before["round_trip_p99_ms"]
    assert before["memory_resets"] == 0  # every step carried the previous answer's memory token


def test_the_dagger_round_goes_through_the_fleet_path_and_serving_follows(demo):
    """Collected over HTTP by the served champion, every visited step an expert label through
    /v1/feedback; the update fine-tunes it with replay, the gate (tiny: no forgetting) promotes, and
    the robots' second drive is answered by the new version."""
    _, _, summary = demo
    version = summary["where_to_look"]["model_version"]
    (dagger,) = summary["dagger"]["rounds"]
    collected, update = dagger["collect"], dagger["update"]
    assert summary["dagger"]["split"] == collected["split"] == "train" and dagger["beta"] == 0.5
    assert collected["episodes"] == DAGGER_EPISODES and collected["driven_by"] == f"{MODEL}/{version} onnx-cpu"
    assert collected["corrections"] == collected["steps"] > 0 and collected["feedback"].endswith("/v1/feedback")
    assert 0 < collected["policy_steps"] < collected["steps"]  # beta 0.5: both drove
    assert update["feedback_episodes"] == DAGGER_EPISODES and update["champion_version"] == version
    before, after = update["metrics"]["champion"], update["metrics"]["challenger"]
    assert {"online.corrected_mae", "online.replay_mae"} <= set(before) & set(after)  # both scored, same data
    # the tiny preset's gate: no forgetting on the demo's own val data (the shipped 5% bound)
    assert after["online.replay_mae"] <= 1.05 * before["online.replay_mae"], update
    assert update["reason"].startswith("passed: ") and "offline_mae" in update["reason"]
    new = str(int(version) + 1)
    assert update["status"] == "promoted" and update["challenger_version"] == new, update["reason"]
    assert dagger["served_version"] == new != version
    assert summary["serving"]["final_model_version"] == new
    assert summary["where_to_look"]["final_champion"] == new
    assert summary["where_to_look"]["online_update_runs"] == [update["run_id"]]
    after_drive = summary["robots"]["drives"][1]
    assert after_drive["label"] == "after DAgger round 1" and after_drive["served_versions"] == [new]
    assert after_drive["served_by"] == [f"{MODEL}/{new} onnx-cpu"]


def test_the_robots_success_sits_next_to_the_experts_on_the_same_seeds(demo):
    _, printed, summary = demo
    drives = summary["robots"]["drives"]
    assert len(drives) == 2
    seeds = drives[0]["seeds"]
    assert len(seeds) == 2 and len(set(seeds)) == 2
    evaluated = json.loads((Path(summary["evaluation"]["results"]) / "closed_loop.json").read_text())
    assert set(seeds).isdisjoint(e["seed"] for e in evaluated["episodes"])  # scenes evaluation did not see
    for drive in drives:
        assert drive["seeds"] == seeds and drive["split"] == "val"
        for who in (drive, drive["expert"]):
            assert who["success_rate"] == who["successes"] / drive["robots"]
            assert who["wilson_95"] == pytest.approx(list(wilson_interval(who["successes"], drive["robots"])))
    # the scripted expert is deterministic per scene: the same outcome before and after
    assert drives[0]["expert"] == drives[1]["expert"]
    assert drives[0]["expert"]["successes"] >= 1  # tiny scenes within 60 steps: the expert gets there
    for drive in drives:
        expert = drive["expert"]
        assert f"vs expert {expert['successes']}/2 = {expert['success_rate']:.0%}" in printed


def test_mlflow_holds_the_run_version_aliases_and_demo_artifacts(demo, demo_home):
    _, _, summary = demo
    client = _client()
    where = summary["where_to_look"]
    run = client.get_run(where["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == where["experiment"] == "mobile-vla"
    drives = summary["robots"]["drives"]
    history = client.get_metric_history(where["run_id"], "demo.http.success_rate")
    assert sorted((m.step, m.value) for m in history) == [(i, d["success_rate"]) for i, d in enumerate(drives)]
    expert = client.get_metric_history(where["run_id"], "demo.http.expert_success_rate")
    assert sorted((m.step, m.value) for m in expert) == [(i, d["expert"]["success_rate"]) for i, d in enumerate(drives)]
    served = client.get_metric_history(where["run_id"], "demo.http.served_version")
    assert sorted((m.step, m.value) for m in served) == [
        (0, float(where["model_version"])),
        (1, float(where["final_champion"])),
    ]
    assert run.data.metrics["demo.dagger.promoted"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(where["run_id"], "demo")}
    assert artifacts == {"demo/demo_summary.json", "demo/http_latency.png"}
    version = client.get_model_version(MODEL, where["model_version"])
    assert version.run_id == where["run_id"]
    # after the DAgger round the update's version is both: registered @challenger, promoted @champion
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == where["final_champion"]
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == where["final_champion"]
    assert (
        client.get_model_version(MODEL, where["final_champion"]).tags["online.parent_version"] == where["model_version"]
    )
    tags = version.tags
    assert tags["promotion.decision"] == summary["promotion"]["decision"]
    assert "metric.closed_loop.success_rate" in tags and "metric.offline.mae" in tags and "export.onnx" in tags
    assert (demo_home / "mlflow.db").is_file()


def test_demo_leaves_no_serve_app_on_a_reused_cluster(demo, ray_cluster):
    assert ray_cluster.is_initialized()  # the session's cluster was reused, not shut down
    assert APP_NAME not in serve.status().applications


def test_a_failing_step_names_the_problem_and_cleans_up(demo, demo_home, ray_cluster, monkeypatch, tmp_path):
    """The data of the first run is reused; a bad train override fails the train step with a
    ConfigError naming field and value; the summary of the good run stays as it was. Cleaned up: the
    reused cluster stays up without a demo Serve app, no MLflow run is left open, and MOBILE_VLA_HOME
    is the caller's again."""
    before = (demo_home / "demo_summary.json").read_text()
    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path / "callers-home"))
    cfg = tiny(home=demo_home, episodes=8, epochs=1, progress=False, train_overrides=["optim.lr=fast"])
    printed = io.StringIO()
    with pytest.raises(ConfigError, match=r"optim\.lr = 'fast'"):
        run_demo(cfg, console=Console(file=printed, width=200))
    assert "reused 8 episodes" in printed.getvalue()
    assert (demo_home / "demo_summary.json").read_text() == before
    assert os.environ["MOBILE_VLA_HOME"] == str(tmp_path / "callers-home")
    assert ray_cluster.is_initialized() and APP_NAME not in serve.status().applications
    assert mlflow.active_run() is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--robots", "0"], "robots = 0"),
        (["--episodes", "2"], "episodes = 2"),
        (["--success-floor", "1.5"], "success_floor = 1.5"),
        (["--dagger-episodes", "1"], "dagger_episodes = 1"),
        (["--dagger-rounds", "-1"], "dagger_rounds = -1"),
    ],
)
def test_bad_options_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--home", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # refused before anything was written
