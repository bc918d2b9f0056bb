"""A served model with random weights: registered in MLflow, exported to ONNX, alias set.

For tests, the serving benchmark and drills on a machine with no trained model: the same classes,
files and registry entries as a trained version, only the weights are random (policy/random_policy.py;
no pretrained weights are loaded, whatever the preset). The preprocessing uses plausible fixed
statistics (`SAMPLE_SCALING`: velocities within +-0.5 m/s, +-1 rad/s; state standardised as is).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow

from mobile_vla.export.onnx_export import export_model
from mobile_vla.export.parity import parity_frames
from mobile_vla.export.publish import attach_onnx
from mobile_vla.export.signature import ONNX_DIR, SIGNATURE_FILE
from mobile_vla.policy import presets
from mobile_vla.policy.preprocessing import PREPROCESSING_FILE
from mobile_vla.policy.random_policy import save_random_policy
from mobile_vla.tracking import (
    CHAMPION,
    DEFAULT_MODEL_NAME,
    ResolvedModel,
    attach_artifacts,
    configure_mlflow,
    get_or_create_experiment,
    register_policy,
)
from mobile_vla.tracking.provenance import provenance_tags
from mobile_vla.train.safety_calibration import calibrate_on_frames

SAMPLE_EXPERIMENT = "mobile-vla-serve-samples"
# velocities within +-0.5 m/s, +-1 rad/s; state standardised as is
SAMPLE_SCALING = {
    "action_low": [-0.5, -0.5, -1.0],
    "action_high": [0.5, 0.5, 1.0],
    "state_mean": [0.0, 0.0, 0.0],
    "state_std": [1.0, 1.0, 1.0],
}


def register_random_policy(
    preset: str = "tiny",
    name: str = DEFAULT_MODEL_NAME,
    alias: str = CHAMPION,
    seed: int = 0,
    fp16: bool = False,
    safety_frames: int = 96,
    exporter: str = "dynamo",
) -> str:
    """Builds, saves, registers and exports a random `preset` policy; returns `models:/NAME@alias`.

    `exporter` is export_model's (the legacy TorchScript exporter takes about a quarter of dynamo's
    time on 2 cores, and serving cannot tell the graphs apart: the test suite's sample model uses it).

    With `safety_frames` > 0 the version carries novelty statistics and safety thresholds fitted on
    that many MiniWorld frames (two thirds as "training", a third from other rooms as "validation"), as a trained
    version does; 0 leaves them out (the version serves with novelty off).
    """
    config = presets.get_preset(preset)  # an unknown preset fails here, before a run is opened
    configure_mlflow()
    experiment_id = get_or_create_experiment(SAMPLE_EXPERIMENT)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(experiment_id=experiment_id, run_name=f"random-{preset}", tags=provenance_tags()) as run,
    ):
        model_dir = Path(tmp) / "model"
        save_random_policy(config, model_dir, seed=seed, scaling=SAMPLE_SCALING)
        if safety_frames:
            train_frames = parity_frames(2 * safety_frames // 3, 224, seed=seed + 100).images
            val_frames = parity_frames(safety_frames - len(train_frames), 224, seed=seed + 200).images
            source = {"frames": f"miniworld random walks, seeds {seed + 100} and {seed + 200}", "sample": "random"}
            calibrate_on_frames(model_dir / "policy", train_frames, val_frames, source=source)
        version = register_policy(
            model_dir, run.info.run_id, name=name, alias=alias, tags={"sample": "random-weights", "preset": preset}
        )
        result = export_model(model_dir, name=name, version=version, fp16=fp16, exporter=exporter)
        registered = ResolvedModel(path=model_dir, uri=f"models:/{name}/{version}", name=name, version=version)
        attach_onnx(registered, result.signature)  # the same files, tags and parity metrics as a real export
    return f"models:/{name}@{alias}"


def register_version_copy(
    source_dir: str | Path,
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = None,
    action_offset: float = 0.0,
    with_onnx: bool = True,
) -> str:
    """A new version made of an exported version's files (`policy/` + `onnx/`), with no export run.

    The same network under a new version number; with `action_offset` != 0 its action range (the
    de-normalisation in both preprocessing.json and signature.json) is shifted, so every answer differs
    by exactly that offset (a random-weight network answers near the range's middle, so scaling would
    not do). For hot-swap and shadow drills and tests, where an ONNX export per version would cost
    minutes. `with_onnx=False` leaves out onnx/: a version serving cannot load (what an
    interrupted export leaves). Returns the version.
    """
    source = Path(source_dir)
    configure_mlflow()
    experiment_id = get_or_create_experiment(SAMPLE_EXPERIMENT)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(experiment_id=experiment_id, run_name="version-copy", tags=provenance_tags()) as run,
    ):
        model_dir = Path(tmp) / "model"
        shutil.copytree(source / "policy", model_dir / "policy")
        onnx_dir = Path(tmp) / "onnx"
        shutil.copytree(source / ONNX_DIR, onnx_dir)
        signature_path = onnx_dir / SIGNATURE_FILE
        signature = json.loads(signature_path.read_text())
        if action_offset:
            prep_path = model_dir / signature["preprocessing"]["saved_at"] / PREPROCESSING_FILE
            prep = json.loads(prep_path.read_text())
            for key, sig_key in (("action_low", "low"), ("action_high", "high")):
                prep[key] = [v + action_offset for v in prep[key]]
                signature["actions"][sig_key] = prep[key]
            prep_path.write_text(json.dumps(prep, indent=2) + "\n")
        version = register_policy(
            model_dir,
            run.info.run_id,
            name=name,
            alias=alias,
            tags={"sample": "version-copy", "copied_from": str(source), "action_offset": action_offset},
        )
        signature["model"] = {**signature.get("model", {}), "name": name, "version": version}
        signature_path.write_text(json.dumps(signature, indent=2) + "\n")
        if with_onnx:
            attach_artifacts(name, version, onnx_dir, ONNX_DIR)
    return version
