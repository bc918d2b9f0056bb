"""The MLflow pyfunc loader of a model version (`loader_module` of the `MLmodel` that
`tracking/pyfunc_flavor.py` writes into every registered version).

    model = mlflow.pyfunc.load_model("models:/mobile-vla-policy/3")     # calls _load_pyfunc(model root)
    answers = model.predict(frame)     # DataFrame: image, instruction, state[, memory] -> actions, confidence, ...

The rows of one call run as one batch through the runtime's backend chain (`load_backend`: TensorRT,
ONNX Runtime CUDA/CPU, torch; the first that loads here and passes its self-test). The contract is in
`tracking/pyfunc_flavor.py`. The recurrent memory travels in the rows (`memory` in, `memory` out, base64
float32 (h, c)), so the loaded model keeps no per-robot state, like the serving replicas; unlike the
HTTP API's token it is not signed: hand it back only as received.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from mobile_vla.errors import DataError
from mobile_vla.runtime.backends import load_backend
from mobile_vla.runtime.base import Backend

REQUIRED_COLUMNS = ("image", "instruction", "state")


def _load_pyfunc(path: str, model_config: dict | None = None) -> PolicyPyfunc:
    """The pyfunc entry point: `path` is the version's model root (policy/, onnx/, tensorrt/, MLmodel)."""
    prefer = (model_config or {}).get("backends")
    return PolicyPyfunc(load_backend(Path(path), prefer=prefer))


class PolicyPyfunc:
    """One loaded backend behind pyfunc's `predict(DataFrame)`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Rows of image (base64 JPEG/PNG), instruction, state[, memory] -> actions [K][3], confidence,
        confidence_now, memory; one batch. DataError names the row and field of bad input.
        """
        frame = pd.DataFrame(model_input)
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            expected = f"{list(REQUIRED_COLUMNS)} (+ optional memory)"
            raise DataError(f"input: missing column(s) {missing}; expected {expected}")
        if frame.empty:
            raise DataError("input: no rows")
        images = np.stack([self._image(i, v) for i, v in enumerate(frame["image"])])  # uint8 [B, S, S, 3]
        state = np.stack([self._state(i, v) for i, v in enumerate(frame["state"])])  # float32 [B, S]
        instructions = [str(v) if isinstance(v, str) else "" for v in frame["instruction"]]
        memory = self._memory(frame["memory"] if "memory" in frame.columns else None, len(frame))
        out = self.backend.predict(images, state, instructions, memory)
        h, c = out.memory  # [layers, B, hidden] each
        now = out.confidence_now
        return pd.DataFrame(
            {
                "actions": [row.astype(np.float64).tolist() for row in out.actions],  # [K][3] per row
                "confidence": out.confidence.astype(np.float64),
                "confidence_now": np.full(len(frame), math.nan) if now is None else now.astype(np.float64),
                "memory": [_encode_memory(h[:, i], c[:, i]) for i in range(len(frame))],
            }
        )

    def _image(self, row: int, value) -> np.ndarray:
        """base64 text (or raw bytes) of a JPEG/PNG -> uint8 [S, S, 3] by the saved preprocessing."""
        try:
            raw = value if isinstance(value, bytes) else base64.b64decode(str(value), validate=True)
            with Image.open(io.BytesIO(raw), formats=("JPEG", "PNG")) as image:
                return self.backend.preprocessing.prepare_image(image.convert("RGB"))
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
            raise DataError(f"input row {row}: image is not a base64 JPEG or PNG ({exc})") from None

    def _state(self, row: int, value) -> np.ndarray:
        state = np.asarray(value, dtype=np.float32).reshape(-1)
        if state.shape != (self.backend.state_dim,):
            raise DataError(f"input row {row}: state: expected {self.backend.state_dim} floats, got {state.size}")
        return state

    def _memory(self, column, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows' memory strings -> (h, c) [layers, B, hidden]; zeros (episode start) where absent."""
        h, c = self.backend.initial_memory(batch)
        layers, hidden = self.backend.layers, self.backend.hidden
        for i, value in enumerate(column if column is not None else []):
            if not isinstance(value, str) or not value:
                continue
            try:
                flat = np.frombuffer(base64.b64decode(value, validate=True), dtype=np.float32)
            except (binascii.Error, ValueError):
                raise DataError(f"input row {i}: memory is not base64") from None
            if flat.size != 2 * layers * hidden:
                raise DataError(
                    f"input row {i}: memory holds {flat.size} floats, this model's is {2 * layers * hidden} "
                    "(a memory from another model version: omit it to start the episode afresh)"
                )
            h[:, i], c[:, i] = flat.reshape(2, layers, hidden)
        return h, c


def _encode_memory(h: np.ndarray, c: np.ndarray) -> str:
    """(h, c) [layers, hidden] each -> base64 of their float32 bytes, h first."""
    return base64.b64encode(np.concatenate([h.reshape(-1), c.reshape(-1)]).astype(np.float32).tobytes()).decode()
