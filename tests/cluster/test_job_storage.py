"""A job submitted with `ray job submit --working-dir` keeps nothing in Ray's temporary copy of the upload.

The job's driver is faked the way Ray's job supervisor marks it (RAY_JOB_CONFIG_JSON_ENV_VAR) and runs in a
folder laid out like Ray's copy (<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mobile_vla.cli import main
from mobile_vla.errors import ConfigError
from mobile_vla.tracking.job_storage import JOB_CONFIG_ENV, check_job_storage, local_path
from mobile_vla.train.job_config import load_train_config

REPO = Path(__file__).resolve().parents[2]
SUBMISSION_ID = "raysubmit_test123"


@pytest.fixture()
def ray_copy(tmp_path, monkeypatch) -> Path:
    """This test runs in a folder laid out like Ray's working-dir copy, with no home or tracking URI set."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for name in ("MOBILE_VLA_HOME", "MLFLOW_TRACKING_URI", JOB_CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    return copy


@pytest.fixture()
def as_job(monkeypatch) -> None:
    """This process looks like a Ray job's entrypoint (what Ray 2.60's job supervisor sets)."""
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}
    metadata = {"job_submission_id": SUBMISSION_ID, "job_name": SUBMISSION_ID}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": metadata}))


def train_places():
    cfg = load_train_config(None)
    return [cfg.run.storage_place()]


def test_a_job_with_the_default_home_is_refused_naming_the_copy_and_the_fix(ray_copy, as_job):
    with pytest.raises(ConfigError) as refused:
        check_job_storage(train_places())
    message = str(refused.value)
    assert f"Ray job {SUBMISSION_ID}:" in message
    assert "the MLflow store .mobile_vla/mlflow.db (MOBILE_VLA_HOME, unset)" in message
    assert "the MLflow artifacts .mobile_vla/mlartifacts (MOBILE_VLA_HOME, unset)" in message
    assert "run.storage_path .mobile_vla/ray_results (MOBILE_VLA_HOME, unset)" in message
    assert f"temporary copy of the job's working dir, {ray_copy}, which Ray deletes" in message
    assert "Set MOBILE_VLA_HOME to a folder every node shares and MLFLOW_TRACKING_URI" in message
    assert "clusters/runtime_env.yaml" in message
    assert "\n" not in message


def test_outside_a_job_nothing_is_refused(ray_copy):
    check_job_storage(train_places())  # the same folders, but no job supervisor started this process


def test_a_job_whose_home_is_elsewhere_passes(ray_copy, as_job, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path / "shared" / "mobile_vla"))
    check_job_storage(train_places())


@pytest.mark.parametrize("uri", ["http://head:5000", "https://mlflow.example.com", "postgresql://u@db:5432/mlflow"])
def test_a_job_with_a_tracking_server_passes_unless_its_checkpoints_stay_in_the_copy(
    ray_copy, as_job, tmp_path, monkeypatch, uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    check_job_storage(mlflow=True)  # MLflow keeps nothing locally
    check_job_storage([load_train_config(None, [f"run.storage_path={tmp_path}/shared"]).run.storage_place()])
    with pytest.raises(ConfigError) as refused:  # ... but the checkpoints would still go to ./.mobile_vla
        check_job_storage(train_places())
    assert str(refused.value).startswith(
        f"Ray job {SUBMISSION_ID}: run.storage_path .mobile_vla/ray_results (MOBILE_VLA_HOME, unset) would be "
        f"written inside Ray's temporary copy of the job's working dir, {ray_copy},"
    )


def test_an_explicit_sqlite_uri_in_the_copy_is_refused_naming_it(ray_copy, as_job, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path / "shared"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative: inside the job's cwd
    with pytest.raises(ConfigError, match=r"the MLflow store mlflow\.db \(MLFLOW_TRACKING_URI\)"):
        check_job_storage()


def test_a_command_that_logs_nothing_checks_only_its_own_places(ray_copy, as_job):
    check_job_storage(mlflow=False)
    cfg = load_train_config(None, ["mlflow.enabled=false", "run.storage_path=/shared/ray_results"])
    check_job_storage([cfg.run.storage_place()], mlflow=cfg.mlflow.enabled)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("sqlite:////srv/mlflow.db", "/srv/mlflow.db"),
        ("sqlite:///rel.db", "CWD/rel.db"),
        ("file:///srv/mlruns", "/srv/mlruns"),
        ("results/x", "CWD/results/x"),
        ("sqlite://", None),
        ("http://head:5000", None),
        ("postgresql+psycopg2://u:p@db/mlflow", None),
        ("s3://bucket/ray_results", None),
    ],
)
def test_local_path_of_a_location(tmp_path, monkeypatch, location, expected):
    monkeypatch.chdir(tmp_path)
    wanted = Path(expected.replace("CWD", str(tmp_path.resolve()))) if expected else None
    assert local_path(location) == wanted


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--check"],
        ["tune", "--config", str(REPO / "jobs/configs/tune_tiny.yaml"), "--check"],
    ],
    ids=["train", "tune"],  # online-update: tests/online/test_online_update.py
)
def test_the_job_entry_points_exit_2_with_one_line(ray_copy, as_job, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mobile-vla {argv[0]}: error: Ray job {SUBMISSION_ID}: ")
    assert str(ray_copy) in err and "MOBILE_VLA_HOME" in err
    assert "\n" not in err
