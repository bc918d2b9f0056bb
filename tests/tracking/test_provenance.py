"""Every run records which code produced it: the git commit (or "unknown"), a dirty flag, the version."""

from __future__ import annotations

import shutil
import subprocess
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
