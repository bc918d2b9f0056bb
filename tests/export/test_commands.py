"""`mobile-vla export` against a real MLflow SQLite store: artifacts land on the same model version."""

from __future__ import annotations

import shutil

import pytest

from mobile_vla.cli import main


def test_tensorrt_without_gpu_says_so_and_exits_non_zero(exported_copy, capsys):
    shutil.rmtree(exported_copy / "onnx")
    code = main(["export", "--model", str(exported_copy), "--tensorrt"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--tensorrt: TensorRT is not installed" in err and "nothing was exported" in err
    assert not (exported_copy / "onnx").exists()


@pytest.mark.slow  # an ONNX export (fp32 + fp16, parity) through the registry: ~20 s on a loaded 2-core box
def test_export_attaches_graphs_to_the_same_model_version(platform_home, make_policy_dir, tmp_path, capsys):
    import mlflow

    from mobile_vla import tracking
    from mobile_vla.export.signature import load_signature

    folder = make_policy_dir(tmp_path / "trained")
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("export-test")) as run:
        pass
    version = tracking.register_policy(folder, run.info.run_id, name="export-test-policy", alias="challenger")

    code = main(["export", "--model", "models:/export-test-policy@challenger", "--fp16", "--exporter", "legacy"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"attached to export-test-policy version {version}" in out

    # A fresh cache (another replica) resolves the version and finds the graphs MLflow now holds.
    shutil.rmtree(platform_home / "model_cache")
    resolved = tracking.resolve_model(f"models:/export-test-policy/{version}")
    signature = load_signature(resolved.path / "onnx")
    assert (signature.model.name, signature.model.version) == ("export-test-policy", version)
    assert {"model.onnx", "model.fp16.onnx", "text_encoder.onnx"} <= {
        p.name for p in (resolved.path / "onnx").iterdir()
    }
    assert signature.exporter.dynamo is False
    tags = tracking.get_version_tags("export-test-policy", version)
    assert tags["export.onnx"] == "fp16,fp32" or tags["export.onnx"] == "fp32,fp16"
    metrics = tracking.get_version_metrics("export-test-policy", version)
    assert 0 <= metrics["parity_fp32_max_abs_diff"] <= 1e-4
    assert 0 < metrics["parity_fp16_max_abs_diff"] <= 5e-2

    # Exporting again keeps the verified graphs (a TensorRT plan must be built from exactly those bytes).
    before = (resolved.path / "onnx" / "model.onnx").read_bytes()
    assert main(["export", "--model", f"models:/export-test-policy/{version}"]) == 0
    assert "already holds verified graphs" in capsys.readouterr().err
    assert (resolved.path / "onnx" / "model.onnx").read_bytes() == before

    from mobile_vla.runtime.backends import load_backend

    backend = load_backend(f"models:/export-test-policy/{version}")
    assert (backend.name, backend.model_name, backend.model_version) == ("onnx-cpu", "export-test-policy", version)


def test_unknown_model_is_a_one_line_error(platform_home, capsys):
    assert main(["export", "--model", str(platform_home / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
