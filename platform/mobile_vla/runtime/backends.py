"""The verified fallback chain over the backend table (runtime/registry.py).

    backend = load_backend(model_dir)            # tries tensorrt, onnx-cuda, onnx-cpu, torch in that order
    backend.name, backend.skipped                # "onnx-cpu", {"tensorrt": "TensorRT is not installed ...", ...}

`registry.BACKENDS` is the one list of backends: its order is the default chain, from the fastest to
the most portable. A backend is only chosen after it has loaded, matched signature.json and answered one
self-test step; every skip keeps its reason, so an operator sees why a GPU replica runs on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mobile_vla.errors import ConfigError, MobileVLAError, ModelError
from mobile_vla.runtime import registry
from mobile_vla.runtime.base import Backend, LoadOptions, ModelFiles
from mobile_vla.tracking import resolve_model

log = logging.getLogger(__name__)


def load_backend(
    model_dir: str | Path,
    prefer: Sequence[str] | None = None,
    fp16: bool = False,
    *,
    int8: bool = False,
    threads: int = 0,
    spinning: bool = True,
    cache_size: int = 1024,
    self_test: bool = True,
    max_batch_size: int | None = None,
) -> Backend:
    """The first backend in `prefer` that loads, matches its signature and passes a self-test step.

    Args:
        model_dir: a resolved model folder (policy/, onnx/, tensorrt/) or a models:/ URI.
        prefer: names from `registry.BACKENDS`, tried in this order (default: all of them, in table order).
        fp16: the fp16 ONNX graph / TensorRT plan (torch stays fp32: it is the reference).
        int8: the int8 ONNX graph (ONNX Runtime backends; TensorRT is skipped, torch stays fp32).
        threads: ONNX Runtime intra-op threads (0: one per core).
        spinning: whether idle ONNX Runtime pool threads busy-wait.
        cache_size: instructions kept by the per-instruction text cache.
        self_test: run one step before choosing a backend.
        max_batch_size: the serve config's batch; a TensorRT plan whose max batch is below it is
            skipped with a reason naming both (None: no check).

    Returns:
        The chosen backend; `backend.skipped` maps each backend tried before it to the reason.

    Raises:
        ConfigError: `prefer` is empty or names an unknown backend, or fp16 and int8 are both asked.
        ModelError: no backend could serve the model (the message names every reason).
    """
    table = registry.BACKENDS  # read at call time: the one table, whatever was added to it
    prefer = tuple(table if prefer is None else prefer)
    unknown = [p for p in prefer if p not in table]
    if unknown or not prefer:
        raise ConfigError(f"prefer = {list(prefer)!r}: expected names from {list(table)}")
    resolved = resolve_model(model_dir)
    model = ModelFiles(Path(resolved.path), resolved.name, resolved.version)
    options = LoadOptions(
        fp16=fp16, int8=int8, threads=threads, spinning=spinning, cache_size=cache_size, max_batch_size=max_batch_size
    )
    skipped: dict[str, str] = {}
    for choice in prefer:
        spec = table[choice]
        try:
            backend = spec.load_class().open(choice, spec, model, options)
            if self_test:
                backend.self_test()
        except Exception as exc:  # any failure of one backend is a reason to try the next one
            if not isinstance(exc, (MobileVLAError, ImportError, OSError)):
                log.warning("backend %s failed unexpectedly", choice, exc_info=True)
            skipped[choice] = f"{type(exc).__name__}: {exc}"
            log.info("backend %s skipped: %s", choice, skipped[choice])
            continue
        backend.skipped = skipped
        if skipped:
            log.warning("serving %s on %s; skipped: %s", model.folder, choice, skipped)
        return backend
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise ModelError(f"{model.folder}: no backend could serve this model ({reasons})")
