"""Real Ray Train V2 runs on the shared local cluster: 2 CPU workers (DDP over gloo), tiny policy, tiny data.

One baseline run is shared by the module (it is the expensive part): its MLflow run, registered
version, resume and a fault-injected twin are all checked against it. The baseline and its twin train
3 epochs of BASELINE_STEPS_PER_EPOCH global steps each (the tiny train split holds ~25 per epoch for 2
workers); the other runs train 2 steps.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.local_processes import free_port, mlflow_server

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
MODEL = "mobile-vla-policy"
# A restarted worker group replays the interrupted epoch from the last checkpoint with the same seeds and
# LR schedule, so the faulted run ends close to the clean one; Ray Data's streaming split may hand the two
# workers different windows of an epoch (different global batches), so it is not bit-identical.
# Tolerance: final validation loss within 30% of the clean run's (same config, same epoch).
FAULT_TOLERANCE = 0.30
# Enough steps for the loss to fall over 3 epochs and for an epoch to outlast the killer thread's reaction
# (it polls every 20 ms); each step is CPU time on a 2-core box, twice over in the faulted run.
BASELINE_STEPS_PER_EPOCH = 8

pytestmark = pytest.mark.slow  # several real Ray Train runs: minutes on 2 cores


def _config(tiny_dataset, home: Path, *overrides: str):
    from mobile_vla.train.job_config import load_train_config

    return load_train_config(
        TINY, [f"data.path={tiny_dataset}", f"run.storage_path={home / 'ray_results'}", *overrides]
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One platform home (SQLite MLflow store + Ray results) for the module's runs."""
    path = tmp_path_factory.mktemp("train_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILE_VLA_HOME", str(path))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield path


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny_dataset, home):
    from mobile_vla.train.trainer import run_training

    cfg = _config(tiny_dataset, home, "run.name=baseline", f"train.max_steps_per_epoch={BASELINE_STEPS_PER_EPOCH}")
    return cfg, run_training(cfg)


def _client():
    from mlflow import MlflowClient

    from mobile_vla.tracking import configure_mlflow

    configure_mlflow()
    return MlflowClient()


def test_two_worker_run_learns_and_is_tracked_in_mlflow(baseline):
    cfg, result = baseline
    client = _client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # resolved config as params
    assert run.data.params["train.epochs"] == "3" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["policy.preset"] == "tiny" and run.data.params["policy.window"] == str(cfg.data.window)
    # metrics per step and per epoch; the loss falls
    step_loss = client.get_metric_history(result.run_id, "train_loss_step")
    epoch_loss = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(step_loss) >= 3 and len(epoch_loss) == 3
    assert epoch_loss[-1] < epoch_loss[0]
    for axis in ("linear_x", "linear_y", "angular_z"):
        for kind in ("mae", "rmse", "r2"):
            per_epoch = {m.step for m in client.get_metric_history(result.run_id, f"val_{kind}_{axis}") if m.step > 0}
            assert per_epoch == {1, 2, 3}  # (step 0 holds the registered version's copy)
    # plots and the resolved config as artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/predicted_vs_true.png"}
    for path in plots:
        local = client.download_artifacts(result.run_id, path)
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {a.path for a in client.list_artifacts(result.run_id, "config")} >= {"config/train_job.yaml"}
    # the best checkpoint (lowest validation loss) became the challenger, with its metrics attached
    kept = sorted(p.name for p in result.best_checkpoint_dir.parent.glob("checkpoint_epoch_*"))
    assert len(kept) <= cfg.train.keep_best + 1  # best N by val_loss, plus the latest
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == result.model_version and version.run_id == result.run_id
    assert float(version.tags["metric.val_mae"]) == pytest.approx(result.metrics["val_mae"], rel=1e-4)
    assert result.metrics["val_loss"] == pytest.approx(
        min(m.value for m in client.get_metric_history(result.run_id, "val_loss") if m.step > 0)
    )


def test_challenger_loads_the_model_of_the_best_checkpoint(baseline, tiny_dataset):
    import torch

    from mobile_vla.policy import load_policy
    from mobile_vla.tracking import resolve_model
    from mobile_vla.train.evaluation import model_inputs
    from mobile_vla.train.windows import WindowDataset

    _, result = baseline
    registered, preprocessing = load_policy(resolve_model(f"models:/{MODEL}@challenger").path)
    checkpoint, _ = load_policy(result.best_checkpoint_dir / "policy")
    samples = WindowDataset(tiny_dataset, "val", preprocessing, augment=False)
    batch = {k: torch.as_tensor(np.stack([samples[i][k] for i in range(2)])) for k in samples[0]}
    with torch.no_grad():
        a, b = registered(model_inputs(batch)), checkpoint(model_inputs(batch))
    assert torch.equal(a.actions, b.actions) and torch.equal(a.confidence, b.confidence)


def test_same_run_name_resumes_and_continues_the_epoch_count(ray_cluster, tiny_dataset, home):
    """A short run of its own (resuming the module's baseline would change what the other tests read),
    then the same run name with one more epoch."""
    from mobile_vla.train.checkpointing import read_history
    from mobile_vla.train.trainer import run_training

    cfg = _config(
        tiny_dataset,
        home,
        "run.name=resumed",
        "scaling.num_workers=1",  # resuming a 2-worker group is the killed-worker test's; one starts faster
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "mlflow.registered_model=null",
    )
    first = run_training(cfg)
    steps_before = first.final_metrics["step"]
    resumed = run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})}))
    assert resumed.run_id == first.run_id  # one MLflow run for the whole history
    assert resumed.final_metrics["epoch"] == 2 and resumed.final_metrics["resumed_from_epoch"] == 1
    assert resumed.final_metrics["step"] > steps_before
    latest = max(Path(resumed.storage_path, cfg.run.name).glob("checkpoint_epoch_*"))
    assert [e["epoch"] for e in read_history(latest)["epochs"]] == [1, 2]
    run = _client().get_run(resumed.run_id)
    assert run.data.tags["resumed_with.train.epochs"] == "2"
    assert {m.step for m in _client().get_metric_history(resumed.run_id, "val_loss") if m.step > 0} == {1, 2}


def _checkpoint_registered(run_dir: Path, name: str) -> bool:
    """The Train controller lists a checkpoint in its snapshot only once it is fully persisted."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return name in snapshot.read_text()
    except OSError:
        return False


def _checkpointed_epochs(run_dir: Path) -> int:
    """The last epoch whose checkpoint the Train controller has registered (0: none yet)."""
    return max((e for e in range(1, 100) if _checkpoint_registered(run_dir, f"checkpoint_epoch_{e:04d}")), default=0)


def _kill_rank_after_first_checkpoint(run_dir: Path, pid_dir: Path, rank: int, killed: dict) -> None:
    """Test thread: once a checkpoint is registered, SIGKILLs one worker; then waits for its replacement
    and records the last registered checkpoint when the new worker group started: the one it must
    resume from, however many epochs ran before the kill landed (a busy box can delay this thread)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and _checkpointed_epochs(run_dir) < 1:
        time.sleep(0.02)
    pid_file = pid_dir / f"rank{rank}.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return  # no worker left to kill: the test says so
    killed["pid"] = pid
    while time.monotonic() < deadline:
        try:
            if int(pid_file.read_text()) != pid:  # a replacement wrote its pid: the group restarted
                killed["checkpointed_at_restart"] = _checkpointed_epochs(run_dir)
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


@pytest.mark.timeout(1800)  # a clean run and a faulted one; about a minute on a quiet 2-core box
def test_killed_worker_is_replaced_and_training_finishes_from_the_last_checkpoint(
    baseline, tiny_dataset, home, tmp_path
):
    from mobile_vla.train.checkpointing import read_history
    from mobile_vla.train.trainer import run_training

    _, clean = baseline
    latest = max(clean.best_checkpoint_dir.parent.glob("checkpoint_epoch_*"))
    clean_epoch_3 = next(e for e in read_history(latest)["epochs"] if e["epoch"] == 3)
    pid_dir = tmp_path / "pids"
    cfg = _config(
        tiny_dataset,
        home,
        "run.name=faulted",
        f"run.pid_dir={pid_dir}",
        f"train.max_steps_per_epoch={BASELINE_STEPS_PER_EPOCH}",  # the baseline's config: comparable losses
        "mlflow.registered_model=null",
    )
    killed: dict = {}
    killer = threading.Thread(
        target=_kill_rank_after_first_checkpoint,
        args=(Path(cfg.storage_path()) / "faulted", pid_dir, 1, killed),
        daemon=True,
    )
    killer.start()
    result = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert "checkpointed_at_restart" in killed, "the killed worker was never replaced"
    assert int((pid_dir / "rank1.pid").read_text()) != killed["pid"]  # a new worker took rank 1
    assert result.final_metrics["epoch"] == 3
    # continued from the last checkpoint registered when it failed (epoch 1, or 2 if the kill came late)
    resumed_from = result.final_metrics["resumed_from_epoch"]
    assert resumed_from == killed["checkpointed_at_restart"] and 1 <= resumed_from < 3, (resumed_from, killed)
    clean_loss, faulted_loss = clean_epoch_3["val_loss"], result.final_metrics["val_loss"]
    assert abs(faulted_loss - clean_loss) <= FAULT_TOLERANCE * clean_loss, (faulted_loss, clean_loss)


@pytest.fixture()
def mlflow_server_url(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts."""
    with mlflow_server(tmp_path / "server.db", tmp_path / "server_artifacts", free_port()) as url:
        yield url


@pytest.mark.unseeded_home  # asserts that no embedded store is created
def test_run_against_an_mlflow_server(ray_cluster, tiny_dataset, platform_home, mlflow_server_url, monkeypatch):
    from mlflow import MlflowClient

    from mobile_vla.policy import load_policy
    from mobile_vla.tracking import resolve_model
    from mobile_vla.train.trainer import run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_url)
    cfg = _config(
        tiny_dataset,
        platform_home,
        "run.name=served",
        "scaling.num_workers=1",  # what goes to the server, not DDP: one worker starts faster on 2 cores
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    )
    result = run_training(cfg)
    client = MlflowClient(tracking_uri=mlflow_server_url, registry_uri=mlflow_server_url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "served"
    assert len(client.get_metric_history(result.run_id, "train_loss_step")) == 2
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == result.model_version
    model, _ = load_policy(resolve_model(f"models:/{MODEL}@challenger").path)
    assert model.config.preset == "tiny"
    assert not (platform_home / "mlflow.db").exists()  # everything went to the server


def test_fsdp_strategy_trains_and_checkpoints_full_weights(ray_cluster, tiny_dataset, platform_home):
    """FSDP2 (fully_shard per block) over gloo: the checkpoint holds the gathered, loadable full model."""
    import torch

    from mobile_vla.policy import build_policy, load_policy
    from mobile_vla.train.preflight import resolve_policy_config
    from mobile_vla.train.trainer import run_training

    cfg = _config(
        tiny_dataset,
        platform_home,
        "run.name=fsdp",
        "train.strategy=fsdp",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "mlflow.enabled=false",
    )
    result = run_training(cfg)
    assert result.final_metrics["epoch"] == 1 and np.isfinite(result.final_metrics["val_loss"])
    trained, _ = load_policy(result.best_checkpoint_dir / "policy")
    torch.manual_seed(cfg.train.seed)
    initial = build_policy(resolve_policy_config(cfg))
    changed = [
        name
        for name, value in trained.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, initial.state_dict()[name])
    ]
    assert changed  # the optimiser stepped and the gathered weights are the trained ones
