"""benchmarks/bench_machine.py: the one `machine` block every benchmark's JSON carries."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    """A benchmarks/ script as a module, its siblings importable as when the script runs."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_block_names_the_machine_and_the_load_around_the_run():
    block = _load("bench_machine").machine([1.234, 0.5, 0.25], onnxruntime="1.32.0")
    assert list(block) == ["cpus", "platform", "python", "load_avg_before", "load_avg_after", "onnxruntime"]
    assert block["cpus"] == os.cpu_count() and block["python"] == platform.python_version()
    assert block["load_avg_before"] == [1.23, 0.5, 0.25] and len(block["load_avg_after"]) == 3


def test_without_a_load_at_the_start_there_is_no_load_pair():
    assert set(_load("bench_machine").machine()) == {"cpus", "platform", "python"}


def test_the_benchmarks_that_write_it_import_it_as_siblings():
    for name in ("closed_loop", "delay_closed_loop", "data_generate", "policy_step"):
        assert _load(name).machine.__module__ == "bench_machine", name
