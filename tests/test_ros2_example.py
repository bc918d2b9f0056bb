"""docs/examples/ros2_node.py, the ROS 2 node robots start from. ROS 2 (rclpy and its message packages)
is not installed here, so the node is compiled, not run: under the oldest Python the client supports
that this machine has (3.9 via pyenv, else this one with 3.9's grammar), with the client's own sources
beside it; its imports are checked against the client's API."""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mobile_vla_client
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "ros2_node.py"
CLIENT_SOURCES = sorted((REPO / "client" / "src" / "mobile_vla_client").glob("*.py"))
ROS_MODULES = {"rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "nav_msgs"}
OLDEST = (3, 9)  # client/pyproject.toml requires-python; ROS 2 Humble runs 3.10, Jazzy 3.12


def _oldest_python() -> tuple[str, int] | None:
    """(interpreter, minor version) of the oldest Python >= 3.9 found (pyenv's versions, then PATH), or None."""
    for minor in range(OLDEST[1], sys.version_info[1]):
        version = f"3.{minor}"
        found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
        for python in [*found, shutil.which(f"python{version}")]:
            if python and subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
                return python, minor
    return None


def test_the_node_and_the_client_compile_under_the_oldest_supported_python():
    files = [EXAMPLE, *CLIENT_SOURCES]
    oldest = _oldest_python()
    if oldest is None:  # no older interpreter: this one, held to 3.9's grammar
        for path in files:
            ast.parse(path.read_text(), str(path), feature_version=OLDEST)
        return
    python, minor = oldest
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f).read(), f, 'exec')\nprint(sys.version_info[:2])"
    run = subprocess.run([python, "-c", code, *map(str, files)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"(3, {minor})", run.stdout


def test_the_node_uses_only_ros_numpy_and_the_client():
    tree = ast.parse(EXAMPLE.read_text())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update({alias.name.split(".")[0]: [] for alias in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.setdefault(node.module.split(".")[0], []).extend(alias.name for alias in node.names)
    others = set(imported) - ROS_MODULES - {"numpy", "mobile_vla_client", "__future__"} - sys.stdlib_module_names
    assert others == set(), f"the node imports {others}: a robot has only ROS 2, numpy and mobile-vla-client"
    assert {"rclpy", "sensor_msgs", "geometry_msgs"} <= set(imported)
    missing = [name for name in imported["mobile_vla_client"] if not hasattr(mobile_vla_client, name)]
    assert missing == [], f"docs/examples/ros2_node.py imports {missing}, which mobile_vla_client does not have"


def test_the_node_imports_where_ros_is_installed():
    if importlib.util.find_spec("rclpy") is None:
        pytest.skip("ROS 2 (rclpy) is not installed here: the node is only compiled and its imports checked")
    spec = importlib.util.spec_from_file_location("ros2_node", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert issubclass(module.VlaDriver, module.Node)
