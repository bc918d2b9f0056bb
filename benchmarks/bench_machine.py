"""The `machine` block of a benchmark's JSON: this machine's CPUs, platform, Python and the load averages
around the run (a figure from a busy box is LOADED: the load says how busy).

Imported as a sibling (`from bench_machine import machine`): a script run as `python benchmarks/X.py` has
benchmarks/ on its path, and tests that load a script with importlib put benchmarks/ on sys.path first.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any


def machine(load_before: Sequence[float] | None = None, **extra: Any) -> dict[str, Any]:
    """`cpus`, `platform`, `python`; with `load_before` (`os.getloadavg()` taken when the run started)
    also `load_avg_before` and `load_avg_after` (now), each [1 min, 5 min, 15 min]; then `extra`'s keys
    (library versions, memory, ...). Call it when the run has finished.
    """
    block: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if load_before is not None:
        block["load_avg_before"] = [round(v, 2) for v in load_before]
        block["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    return {**block, **extra}
