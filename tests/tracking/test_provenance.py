"""Every run records which code produced it: the git commit (or "unknown"), a dirty flag, the version."""

from __future__ import annotations

import ast
import shutil
import subprocess
import types
from pathlib import Path

import mobile_vla
from mobile_vla.tracking.provenance import GIT_COMMIT_TAG, GIT_DIRTY_TAG, VERSION_TAG, provenance_tags

REPO = Path(__file__).resolve().parents[2]


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_this_checkout_gives_its_commit_and_the_package_version():
    tags = provenance_tags()
    assert tags[GIT_COMMIT_TAG] == _git(REPO, "rev-parse", "HEAD")
    assert tags[GIT_DIRTY_TAG] in ("true", "false") and tags[VERSION_TAG] == mobile_vla.__version__


def test_a_package_outside_any_checkout_is_unknown(tmp_path):
    """An installed wheel or Ray's copy of a job's working directory: no git checkout around it."""
    copy = tmp_path / "mobile_vla"
    shutil.copytree(Path(mobile_vla.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tags = provenance_tags(copy)
    assert tags == {GIT_COMMIT_TAG: "unknown", GIT_DIRTY_TAG: "unknown", VERSION_TAG: mobile_vla.__version__}


def test_uncommitted_changes_to_the_package_mark_the_run_dirty(tmp_path):
    package = tmp_path / "platform" / "mobile_vla"
    package.mkdir(parents=True)
    (package / "model.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    clean = provenance_tags(package)
    assert clean[GIT_COMMIT_TAG] == _git(tmp_path, "rev-parse", "HEAD") and clean[GIT_DIRTY_TAG] == "false"
    (package / "model.py").write_text("x = 2\n")
    assert provenance_tags(package)[GIT_DIRTY_TAG] == "true"


def _run_creators() -> list[str]:
    """`module:function` for every package function that starts an MLflow run (create_run / start_run)."""
    found = []
    for path in sorted((REPO / "platform" / "mobile_vla").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            calls = {getattr(c.func, "attr", None) for c in ast.walk(node) if isinstance(c, ast.Call)}
            if calls & {"create_run", "start_run"}:
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                found.append(f"{path.relative_to(REPO)}:{node.name}:{'provenance_tags' in names}")
    return found


def test_every_function_that_starts_a_run_tags_it_with_provenance():
    """Training, sweeps, ensembles, online updates and sample versions: each run names its code (the
    online update's and the ensemble's runs had no commit before)."""
    creators = _run_creators()
    assert len(creators) >= 5, creators  # the scan finds them (trainer, sweep, ensemble, online, samples)
    assert [c for c in creators if c.endswith(":False")] == []


def test_the_online_update_run_records_commit_and_version(platform_home):
    from mlflow import MlflowClient

    from mobile_vla.online.update import _mlflow_run
    from mobile_vla.tracking import configure_mlflow

    configure_mlflow()
    run_id = _mlflow_run(types.SimpleNamespace(experiment="mobile-vla-online"), "3")
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[GIT_COMMIT_TAG] == _git(REPO, "rev-parse", "HEAD") and tags[VERSION_TAG] == mobile_vla.__version__
    assert tags["mobile_vla.parent_version"] == "3"
