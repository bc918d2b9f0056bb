"""The lock files pin what pyproject.toml declares (issue 19 part 1): every declared dependency of the platform
and the robot client is pinned, inside its declared range, the same version in every lock; the locks are
portable (no editables, URLs or local paths). Reads files only."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.locks import LOCAL_PACKAGES, LOCKS, REPO, REQUIREMENTS, declared, lock_pins, project

# lock -> the extras it installs (requirements/<lock>.in says the same); gpu: onnxruntime-gpu only (gpu.in)
EXTRAS = {"dev": ("cpu", "dev"), "cpu": ("cpu",), "gpu": ()}


def _out_of_range(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in LOCAL_PACKAGES:
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement}: the lock pins {pins[name]}")
    return problems


@pytest.mark.parametrize("lock", LOCKS)
def test_every_declared_dependency_is_pinned_inside_its_range(lock):
    assert _out_of_range(declared(EXTRAS[lock]), lock_pins(lock)) == []


def test_gpu_lock_pins_onnxruntime_gpu_inside_the_gpu_extra_and_leaves_tensorrt_to_the_image():
    pins = lock_pins("gpu")
    gpu_extra = [Requirement(r) for r in project()["optional-dependencies"]["gpu"]]
    onnxruntime_gpu = [r for r in gpu_extra if r.name == "onnxruntime-gpu"]
    assert _out_of_range(onnxruntime_gpu, pins) == []
    # the .in repeats the extra's range (tensorrt-cu13 is left out of the lock): the two must not drift apart
    in_lines = [line for line in (REQUIREMENTS / "gpu.in").read_text().splitlines() if line.startswith("onnxruntime")]
    assert [Requirement(line) for line in in_lines] == onnxruntime_gpu
    assert "onnxruntime" not in pins and "tensorrt-cu13" not in pins  # one onnxruntime module per environment
    assert "onnxruntime-gpu" not in lock_pins("dev") and "onnxruntime-gpu" not in lock_pins("cpu")


def test_locks_agree_with_each_other():
    dev = lock_pins("dev")
    for lock in ("cpu", "gpu"):
        pins = lock_pins(lock)
        assert {n: v for n, v in pins.items() if n in dev and dev[n] != v} == {}, lock
        # the images hold the dev environment less the test tools (and onnxruntime-gpu in the GPU image)
        assert set(pins) - set(dev) <= {"onnxruntime-gpu"}, lock


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_is_portable_and_names_how_it_was_made(lock):
    text = (REQUIREMENTS / f"{lock}.lock.txt").read_text()
    assert "file:" not in text and "/opt/" not in text and "/tmp/" not in text and "-e " not in text
    command = next(line for line in text.splitlines() if "uv pip compile" in line)
    assert f"requirements/{lock}.in" in command and f"-o requirements/{lock}.lock.txt" in command
    assert "--python-version 3.11" in command and "--python-platform x86_64-manylinux" in command
    assert not LOCAL_PACKAGES & set(lock_pins(lock))  # the repository's own packages install from ./ and ./client


def test_lock_parser_refuses_what_is_not_a_pin(tmp_path, monkeypatch):
    (tmp_path / "bad.lock.txt").write_text("# made by hand\nray==2.60.0\n-e ./client\n")
    monkeypatch.setattr("tests.deploy.locks.REQUIREMENTS", tmp_path)
    with pytest.raises(ValueError, match=r"bad.lock.txt:3: not a 'name==version' pin: '-e ./client'"):
        lock_pins("bad")


def test_range_check_catches_a_pin_outside_the_declared_range():
    problems = _out_of_range([Requirement("ray[serve]==2.60.*"), Requirement("rich>=13")], {"ray": "2.61.0"})
    assert problems == ["ray[serve]==2.60.*: the lock pins 2.61.0", "rich>=13 is not in the lock"]


def test_setup_installs_the_dev_lock():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r"^LOCK=\$\{LOCK:-requirements/dev\.lock\.txt\}$", setup, re.M)
    assert re.search(r'pip install -q "\$\{lock_args\[@\]\}" -e \./client -e "\.\[\$EXTRAS\]"', setup)
    assert 'lock_args=(-r "$LOCK")' in setup
