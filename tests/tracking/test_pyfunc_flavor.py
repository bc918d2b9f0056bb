"""Registered versions are MLflow pyfunc models: `mlflow.pyfunc.load_model` on a real SQLite registry
(a tiny exported policy) answers with the right shapes and the backend's own numbers, carries memory,
and `mlflow models serve --env-manager local` answers POST /invocations (slow)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mobile_vla import tracking
from mobile_vla.errors import DataError
from mobile_vla.tracking.pyfunc_flavor import INPUT_COLUMNS, OUTPUT_COLUMNS, example_image
from tests.local_processes import free_port, stop_process_group, wait_until

MODEL = "pyfunc-test"


@pytest.fixture()
def version(platform_home, exported_dir, tmp_path) -> str:
    model_dir = tmp_path / "model"
    shutil.copytree(exported_dir, model_dir)
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("pyfunc-test")) as run:
        pass
    return tracking.register_policy(model_dir, run.info.run_id, name=MODEL)


def rows(count: int, state_dim: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": [example_image(32 + 8 * i) for i in range(count)],
            "instruction": ["go to the red box", "go to the blue ball"][:count],
            "state": [[0.1 * i] * state_dim for i in range(count)],
        }
    )


def test_a_registered_version_loads_as_pyfunc_and_predicts_actions_confidence_memory(version):
    from mobile_vla.runtime import load_backend

    uri = f"models:/{MODEL}/{version}"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == list(INPUT_COLUMNS)
    assert info.signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    example = mlflow.models.Model.load(uri).load_input_example(mlflow.artifacts.download_artifacts(uri))
    assert list(example.columns) == ["image", "instruction", "state"]

    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(rows(2))
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 2
    backend = load_backend(tracking.resolve_model(uri).path, prefer=["onnx-cpu"])
    actions = np.asarray(out["actions"].tolist(), np.float32)
    assert actions.shape == (2, backend.signature.chunk, 3) and np.isfinite(actions).all()
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()

    # The same rows straight through the runtime backend: the flavor adds no numbers of its own.
    prepared = np.stack(
        [backend.preprocessing.prepare_image(np.full((32 + 8 * i, 32 + 8 * i, 3), 128, np.uint8)) for i in range(2)]
    )
    direct = backend.predict(prepared, np.array([[0.0] * 3, [0.1] * 3], np.float32), list(rows(2)["instruction"]))
    np.testing.assert_allclose(actions, direct.actions, atol=1e-5)

    # Memory out, memory in: the second step differs from an episode start with the same inputs.
    h, c = direct.memory
    assert len(base64.b64decode(out["memory"][0])) == 4 * 2 * h.shape[0] * h.shape[2]
    again = model.predict(rows(2).assign(memory=list(out["memory"])))
    fresh = model.predict(rows(2))
    assert not np.allclose(np.asarray(again["actions"].tolist()), np.asarray(fresh["actions"].tolist()))

    with pytest.raises(DataError, match="input row 1: state: expected 3 floats"):
        model.predict(rows(2).assign(state=[[0.0] * 3, [0.0] * 2]))
    with pytest.raises(DataError, match="input row 0: image is not a base64 JPEG or PNG"):
        model.predict(rows(1).assign(image=["bm90IGFuIGltYWdl"]))


@pytest.mark.slow  # an `mlflow models serve` process: about 20 s to answer on 2 cores
def test_mlflow_models_serve_answers_invocations_for_a_version(version, platform_home, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # it runs `uvicorn` from PATH
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL}/{version}"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def answer():
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}: {(tmp_path / 'serve.log').read_text()}")
        body = {"dataframe_records": json.loads(rows(1).to_json(orient="records"))}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read())
        except OSError:
            return None

    try:
        reply = wait_until(answer, 180, every_s=1.0, what="mlflow models serve answering /invocations")
    finally:
        stop_process_group(process, signal.SIGTERM, 20)
    predictions = reply["predictions"]
    assert len(predictions) == 1 and set(predictions[0]) == set(OUTPUT_COLUMNS)
    assert np.asarray(predictions[0]["actions"]).shape[1] == 3 and 0 <= predictions[0]["confidence"] <= 1
