"""The exported graphs answer like PyTorch: one step at batch 1 and 32, T steps vs the sequence
forward, the text encoder, and the fp16 graph within its stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.errors import ModelError
from mobile_vla.export import parity
from mobile_vla.export.signature import ParityFigures, load_signature


@pytest.fixture(scope="module")
def parts(exported_dir):
    import onnxruntime as ort

    from mobile_vla.policy import load_policy

    model, preprocessing = load_policy(exported_dir)
    sessions = {
        name: ort.InferenceSession(str(exported_dir / "onnx" / name), providers=["CPUExecutionProvider"])
        for name in ("model.onnx", "model.fp16.onnx", "text_encoder.onnx")
    }
    return model, preprocessing, sessions


def _diff(reference, got):
    return max(float(np.abs(reference[k] - got[k]).max()) for k in reference)


@pytest.mark.parametrize("batch", [1, 32])
def test_fp32_step_matches_torch_on_real_frames(parts, real_frames, batch):
    model, preprocessing, sessions = parts
    feeds = parity.step_feeds(model, preprocessing, real_frames[:batch], parity.PARITY_INSTRUCTIONS, seed=100 + batch)
    reference = parity.torch_step(model, feeds)
    got = parity.ort_step(sessions["model.onnx"], feeds)
    assert got["actions"].shape == (batch, 10, 3) and got["h_out"].shape == (1, batch, 64)
    assert np.abs(reference["actions"]).max() > 0.05  # outputs vary: the comparison is not trivially 0 vs 0
    assert _diff(reference, got) <= 1e-4


def test_recurrent_round_trip_equals_sequence_forward(parts, real_frames):
    model, preprocessing, sessions = parts
    worst = parity.sequence_max_abs(model, preprocessing, sessions["model.onnx"], real_frames, steps=8, batch=3, seed=5)
    assert worst <= 1e-4


def test_memory_changes_the_answer(parts, real_frames):
    """The state inputs are live: the same frame with another memory gives other actions."""
    model, preprocessing, sessions = parts
    feeds = parity.step_feeds(model, preprocessing, real_frames[:4], parity.PARITY_INSTRUCTIONS, seed=1)
    zero = dict(feeds, h_in=np.zeros_like(feeds["h_in"]), c_in=np.zeros_like(feeds["c_in"]))
    a = parity.ort_step(sessions["model.onnx"], feeds)["actions"]
    b = parity.ort_step(sessions["model.onnx"], zero)["actions"]
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("batch", [1, 32])
def test_fp16_graph_within_stated_tolerance(parts, real_frames, batch):
    model, preprocessing, sessions = parts
    feeds = parity.step_feeds(model, preprocessing, real_frames[:batch], parity.PARITY_INSTRUCTIONS, seed=7)
    diff = _diff(parity.torch_step(model, feeds), parity.ort_step(sessions["model.fp16.onnx"], feeds))
    assert diff <= parity.FP16_TOLERANCE
    assert diff > 1e-6  # it really computes in fp16 (an fp32 copy would pass the check without this)


def test_text_encoder_matches_encode_instruction(parts):
    import torch

    model, preprocessing, sessions = parts
    ids = preprocessing.tokenize(["go to the red box", "turn around"])["clip_input_ids"]
    with torch.inference_mode():
        reference = model.encode_instruction(torch.from_numpy(ids)).numpy()
    got = sessions["text_encoder.onnx"].run(None, {"clip_input_ids": ids})[0]
    assert np.abs(reference - got).max() <= 1e-4


def test_export_records_its_parity_figures(exported_dir):
    figures = load_signature(exported_dir / "onnx").parity
    assert figures.frames.startswith("miniworld:")
    assert set(figures.fp32_max_abs_diff) == {"batch_1", "batch_32"}
    assert max(figures.fp32_max_abs_diff.values()) <= figures.fp32_tolerance == 1e-4
    assert figures.sequence_max_abs_diff <= 1e-4 and figures.sequence_steps == 8
    assert figures.fp16_tolerance == parity.FP16_TOLERANCE
    assert 0 < max(figures.fp16_max_abs_diff.values()) <= figures.fp16_tolerance


def test_parity_failures_name_each_bad_figure():
    figures = ParityFigures(
        frames="test",
        instructions=["x"],
        fp32_tolerance=1e-4,
        fp32_max_abs_diff={"batch_1": 5e-5, "batch_32": 3e-3},
        sequence_steps=8,
        sequence_max_abs_diff=float("nan"),
        text_encoder_max_abs_diff=0.0,
        fp16_tolerance=5e-2,
        fp16_max_abs_diff={"batch_1": float("inf")},
    )
    failures = parity.parity_failures(figures)
    assert len(failures) == 3
    assert any("fp32 batch_32" in f for f in failures)
    assert any("round trip" in f for f in failures)  # NaN is a failure, not a pass
    assert any("fp16 batch_1" in f for f in failures)


def test_refused_export_leaves_previous_graphs_untouched(exported_copy, frames_dataset, monkeypatch):
    """Parity above tolerance -> ModelError and onnx/ stays as it was (legacy exporter, dataset frames)."""
    from mobile_vla.export.onnx_export import export_model

    before = {p.name: p.read_bytes() for p in (exported_copy / "onnx").iterdir()}
    monkeypatch.setattr(parity, "FP32_TOLERANCE", 0.0)  # no real graph is bit-exact: parity must refuse
    with pytest.raises(ModelError, match="parity check failed: fp32 batch_1 max abs diff"):
        export_model(exported_copy, exporter="legacy", data_dir=frames_dataset)
    after = {p.name: p.read_bytes() for p in (exported_copy / "onnx").iterdir()}
    assert after == before
    assert not (exported_copy / ".onnx.partial").exists()


def test_frozen_backbones_export(make_policy_dir, frames_dataset, tmp_path):
    """`full` freezes CLIP: without gradients nn.MultiheadAttention takes a fused path that has no ONNX
    export. The exporter must switch it off (here: tiny with frozen backbones, legacy exporter)."""
    from mobile_vla.export.onnx_export import export_model

    folder = make_policy_dir(tmp_path, freeze=True)
    result = export_model(folder, exporter="legacy", data_dir=frames_dataset)
    assert result.signature.parity.frames == f"dataset:{frames_dataset}"
    assert max(result.signature.parity.fp32_max_abs_diff.values()) <= 1e-4
    assert result.signature.exporter.dynamo is False
