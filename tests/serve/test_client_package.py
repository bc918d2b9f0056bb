"""The robot client package (client/, `mobile-vla-client`) against the real Serve app: its own tests run
in the platform's environment, and in a fresh virtual environment of another Python (3.12, else 3.10)
holding only `pip install ./client`, which must stay small (issue 17: a robot installs no torch).

The fresh environment installs from the registry the first time and from pip's cache afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_vla.serve.auth import add_token
from tests.serve.conftest import deployed_app

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
APP = "mobile-vla-client-package"
MAX_DOWNLOAD_MB = 50  # the wheels `pip install ./client` pulls (issue 17's bound)
MAX_INSTALLED_MB = 120  # installed: numpy ~66 MB and Pillow ~23 MB of it on Python 3.12; torch alone would be GBs

pytestmark = pytest.mark.slow  # a Serve app for the module: about a minute to deploy on 2 cores


@pytest.fixture(scope="module")
def client_app(ray_cluster, serve_home, tmp_path_factory):
    """The real app, with a robot token (act, feedback) for robots `client-test-*`, as a fleet gets one."""
    from mobile_vla.serve.app import ServeAppConfig

    files = tmp_path_factory.mktemp("client-package")
    tokens = files / "tokens"
    tokens.write_text((serve_home / "tokens").read_text())
    robot_token = add_token(tokens, "client-test-*", ("act", "feedback"), "client-tests")
    args = ServeAppConfig(tokens_file=str(tokens), feedback_dir=str(files / "feedback"), deadline_s=30.0)
    with deployed_app(APP, serve_home, args) as app:
        app.robot_token = robot_token
        yield app


def _run_client_tests(python: str, app, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MOBILE_VLA_CLIENT_TEST_URL": app.url,
        "MOBILE_VLA_CLIENT_TEST_TOKEN": app.robot_token,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:randomly", "tests"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _passed_without_skips(run: subprocess.CompletedProcess) -> None:
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "skipped" not in out.splitlines()[-1] and " passed" in out.splitlines()[-1], out[-2000:]


def test_the_client_tests_pass_against_the_real_app(client_app):
    _passed_without_skips(_run_client_tests(sys.executable, client_app, CLIENT))


def _other_python() -> str | None:
    """A Python 3.12 (ROS 2 Jazzy) or 3.10 (Humble) interpreter, if this machine has one (pyenv or PATH)."""
    for version in ("3.12", "3.10"):
        found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
        candidates = found + [shutil.which(f"python{version}") or ""]
        for python in filter(None, candidates):
            ok = subprocess.run([python, "-c", "import venv"], capture_output=True)
            if ok.returncode == 0:
                return python
    return None


def _ask(python: str, code: str) -> str:
    return subprocess.check_output([python, "-c", code], text=True).strip()


def _megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def test_the_client_installs_alone_into_a_fresh_python_and_passes_there(client_app, tmp_path):
    python = _other_python()
    if python is None:
        pytest.skip("no Python 3.12 or 3.10 on this machine (pyenv or PATH) to build a fresh environment with")
    env_dir = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(env_dir)], check=True)
    fresh = str(env_dir / "bin" / "python")
    site = Path(_ask(fresh, "import sysconfig; print(sysconfig.get_path('purelib'))"))
    bare_mb = _megabytes(site)
    wheels, source = tmp_path / "wheels", tmp_path / "client"  # a copy: the build leaves the checkout alone
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [fresh, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "download", "-d", str(wheels), str(source)], check=True, timeout=600)
    subprocess.run([*pip, "install", str(source)], check=True, timeout=600)  # not editable: the built wheel

    installed = subprocess.run([*pip[:3], "list", "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in installed.stdout.split()}
    assert "mobile-vla-client" in names and not names & {"torch", "mobile-vla", "ray", "mlflow"}, names
    download_mb, added_mb = _megabytes(wheels), _megabytes(site) - bare_mb
    print(f"{python}: pip install ./client pulls {download_mb:.1f} MB of wheels, adds {added_mb:.1f} MB installed")
    assert download_mb <= MAX_DOWNLOAD_MB and added_mb <= MAX_INSTALLED_MB, (download_mb, added_mb)

    subprocess.run([*pip, "install", "pytest"], check=True, timeout=600)  # to run the tests, after measuring
    tests = tmp_path / "client-tests"
    shutil.copytree(CLIENT / "tests", tests / "tests")  # no src/ beside them: the installed package is tested
    assert Path(_ask(fresh, "import mobile_vla_client; print(mobile_vla_client.__file__)")).is_relative_to(site)
    _passed_without_skips(_run_client_tests(fresh, client_app, tests))
