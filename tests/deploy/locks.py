"""Reads the lock files in requirements/ and the dependencies pyproject.toml declares (shared by the lock,
image and KubeRay tests)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements"
LOCKS = ("dev", "cpu", "gpu")
# where the locks are meant to install: Linux x86_64, CPython 3.11 (markers evaluated for it)
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "python_version": "3.11", "python_full_version": "3.11.7", "implementation_name": "cpython"}  # fmt: skip
LOCAL_PACKAGES = {"mobile-vla", "mobile-vla-client"}  # installed from this repository, never from a lock
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def lock_pins(name: str) -> dict[str, str]:
    """requirements/<name>.lock.txt -> {canonical package name: pinned version}; any line that is not a pin,
    a comment or blank (an editable, a URL, an index option) raises ValueError naming it."""
    pins: dict[str, str] = {}
    path = REQUIREMENTS / f"{name}.lock.txt"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = _PIN.match(text)
        if match is None:
            raise ValueError(f"{path.name}:{number}: not a 'name==version' pin: {text!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def project() -> dict:
    """[project] of pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def client_project() -> dict:
    """[project] of client/pyproject.toml."""
    return tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The platform's and the client's dependencies plus the named extras', those that apply on the target."""
    spec = project()
    lines = list(spec["dependencies"]) + list(client_project()["dependencies"])
    for extra in extras:
        lines += spec["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(TARGET)]
