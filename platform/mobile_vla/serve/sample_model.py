"""A served model with random weights: registered in MLflow, exported to ONNX, alias set.

For tests, the serving benchmark and drills on a machine with no trained model: the same classes,
files and registry entries as a trained version, only the weights are random. The preprocessing
uses plausible fixed statistics (velocities within +-0.5 m/s, +-1 rad/s; state standardised as is).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SAMPLE_EXPERIMENT = "mobile-vla-serve-samples"


def register_random_policy(
    preset: str = "tiny", name: str = "mobile-vla-policy", alias: str = "champion", seed: int = 0,
    fp16: bool = False,
) -> str:
    """Builds, saves, registers and exports a random `preset` policy; returns `models:/NAME@alias`."""
    import mlflow
    import torch

    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import build_policy, build_tokenizer, presets, save_policy
    from mobile_vla.preprocessing import Preprocessing
    from mobile_vla.tracking import attach_artifacts, configure_mlflow, get_or_create_experiment, register_policy

    config = presets.get_preset(preset)
    torch.manual_seed(seed)
    model = build_policy(config).eval()
    preprocessing = Preprocessing(
        action_low=[-0.5, -0.5, -1.0], action_high=[0.5, 0.5, 1.0],
        state_mean=[0.0] * config.state_dim, state_std=[1.0] * config.state_dim, state_dim=config.state_dim,
        window=config.window, chunk=config.chunk, tokenizer=build_tokenizer(config),
    )
    configure_mlflow()
    experiment_id = get_or_create_experiment(SAMPLE_EXPERIMENT)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=experiment_id, run_name=f"random-{preset}") as run:
        model_dir = Path(tmp) / "model"
        save_policy(model_dir / "policy", model, preprocessing)
        version = register_policy(model_dir, run.info.run_id, name=name, alias=alias,
                                  tags={"sample": "random-weights", "preset": preset})
        export_model(model_dir, name=name, version=version, fp16=fp16)
        attach_artifacts(name, version, model_dir / "onnx", "onnx")
    return f"models:/{name}@{alias}"
