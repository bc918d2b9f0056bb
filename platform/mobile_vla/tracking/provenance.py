"""Which code produced a run: the git commit of the checkout and the package version, as MLflow tags.

    client.create_run(experiment_id, tags={**provenance_tags(), ...})

The commit is that of the checkout holding the imported `mobile_vla` package ("unknown" when it is not
a git checkout, e.g. an installed wheel or Ray's copy of a job's working directory, or git is missing);
a checkout with uncommitted changes gets `mobile_vla.git_dirty = true`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mobile_vla

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the run page shows it
GIT_DIRTY_TAG = "mobile_vla.git_dirty"
VERSION_TAG = "mobile_vla.version"
UNKNOWN = "unknown"


def _git(folder: Path, *args: str) -> str | None:
    """`git -C folder args` stdout, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance_tags(package_dir: Path | None = None) -> dict[str, str]:
    """The commit, dirty flag and package version of the code in `package_dir`.

    Args:
        package_dir: the package folder to ask git about (default: the imported mobile_vla's).

    Returns:
        Tags for an MLflow run: {mlflow.source.git.commit, mobile_vla.git_dirty, mobile_vla.version}.
    """
    folder = package_dir or Path(mobile_vla.__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD") if folder.is_dir() else None
    dirty = _git(folder, "status", "--porcelain", "--untracked-files=no", "--", ".") if commit else None
    return {
        GIT_COMMIT_TAG: commit or UNKNOWN,
        GIT_DIRTY_TAG: UNKNOWN if dirty is None else str(bool(dirty)).lower(),
        VERSION_TAG: mobile_vla.__version__,
    }
