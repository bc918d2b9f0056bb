"""The MLflow pyfunc flavor of a registered version: the `MLmodel` file (signature, input example, loader).

    files = write_pyfunc_files(folder, state_dim=3, run_id=run_id)   # MLmodel, input example, env files
    model = mlflow.pyfunc.load_model("models:/mobile-vla-policy/3")
    model.predict(pd.DataFrame({"image": [b64_png], "instruction": ["go to the red box"], "state": [[0, 0, 0]]}))

`register_policy` writes these few kilobytes into every version's `model/` folder beside `policy/` and
`onnx/`, so a version is an MLflow model as it stands: `mlflow.pyfunc.load_model`, `mlflow models serve`
and the UI's schema view work on it, and no weights are copied (the loader reads the version's own
folder: `MLmodel` names no `data` path, so pyfunc hands the loader the model root).

Contract (a DataFrame, one row per robot; the HTTP API's /v1/act fields):
- in: `image` (string: base64 JPEG or PNG, any size, resized by the saved preprocessing),
  `instruction` (string), `state` (array of S floats, S as the version's preprocessing),
  optional `memory` (string: the `memory` of this robot's previous answer; absent or empty: episode start).
- out: `actions` (K x 3 floats: linear_x m/s, linear_y m/s, angular_z rad/s; row 0 is executed now),
  `confidence` (float in [0, 1]), `confidence_now` (the executed step's confidence; NaN for a
  version-1 export), `memory` (string: base64 float32 LSTM state (h, c), not signed: a trusted caller's).

The loader (`LOADER_MODULE`, `mobile_vla.runtime.pyfunc`) serves through the runtime's backend chain
(TensorRT, ONNX Runtime, torch: the first that loads here). This module only writes metadata: it imports
no runtime code.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example  # what every built-in flavor uses (MLflow 3.17)
from mlflow.pyfunc import add_to_model
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

import mobile_vla

LOADER_MODULE = "mobile_vla.runtime.pyfunc"
MLMODEL = "MLmodel"
REQUIREMENTS = "requirements.txt"
PYTHON_ENV = "python_env.yaml"
EXAMPLE_INSTRUCTION = "go to the red box"
INPUT_COLUMNS = ("image", "instruction", "state", "memory")
OUTPUT_COLUMNS = ("actions", "confidence", "confidence_now", "memory")


def pyfunc_signature() -> ModelSignature:
    """The pyfunc contract (module doc); array lengths (S, K) are the version's, not fixed here."""
    inputs = Schema(
        [
            ColSpec(DataType.string, "image"),
            ColSpec(DataType.string, "instruction"),
            ColSpec(Array(DataType.double), "state"),
            ColSpec(DataType.string, "memory", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(Array(DataType.double)), "actions"),
            ColSpec(DataType.double, "confidence"),
            ColSpec(DataType.double, "confidence_now"),
            ColSpec(DataType.string, "memory"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image(size: int = 64) -> str:
    """A base64 PNG of a plain grey frame (any size is accepted; the model resizes it)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example(state_dim: int) -> pd.DataFrame:
    """One robot at episode start: a grey frame, an instruction, a zero state of `state_dim` floats."""
    return pd.DataFrame(
        {"image": [example_image()], "instruction": [EXAMPLE_INSTRUCTION], "state": [[0.0] * state_dim]}
    )


def policy_state_dim(model_dir: str | Path) -> int:
    """The state size S saved with the policy (`policy/preprocessing/preprocessing.json`)."""
    path = Path(model_dir) / "policy" / "preprocessing" / "preprocessing.json"
    try:
        return int(json.loads(path.read_text())["state_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no state_dim to build the pyfunc input example from ({exc})") from None


def write_pyfunc_files(folder: str | Path, state_dim: int, run_id: str | None = None) -> list[str]:
    """Writes `MLmodel`, the input example and the environment files into `folder` (a version's `model/`
    root, or a staging folder logged there); returns the file names written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = Model(artifact_path="model", run_id=run_id, signature=pyfunc_signature())
    package = f"mobile-vla=={mobile_vla.__version__}"
    note = "# the platform's package (not on PyPI: install it from its checkout)"
    (folder / REQUIREMENTS).write_text(f"{note}\n{package}\n")
    python = ".".join(str(p) for p in sys.version_info[:3])
    env = f"python: {python}\nbuild_dependencies:\n- pip\ndependencies:\n- -r {REQUIREMENTS}\n"
    (folder / PYTHON_ENV).write_text(env)
    add_to_model(model, loader_module=LOADER_MODULE, python_env=PYTHON_ENV)
    before = set(os.listdir(folder))
    _save_example(model, input_example(state_dim), str(folder))
    model.save(str(folder / MLMODEL))
    return sorted(set(os.listdir(folder)) - before | {MLMODEL, REQUIREMENTS, PYTHON_ENV})


def log_pyfunc_files(client, run_id: str, model_dir: str | Path, artifact_path: str) -> None:
    """Writes the pyfunc files for the policy in `model_dir` and logs them to the run's `artifact_path`."""
    with tempfile.TemporaryDirectory() as tmp:
        write_pyfunc_files(tmp, policy_state_dim(model_dir), run_id)
        client.log_artifacts(run_id, tmp, artifact_path)
