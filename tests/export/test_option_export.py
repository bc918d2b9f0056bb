"""The issue-15 model options through the ONNX export at the tiny preset: text-attention pooling is in
the step graph and passes the export's parity checks; the auxiliary heads are training-only, so a model
with them exports the same step graph, signature and parity as one without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobile_vla.export.parity import FP32_TOLERANCE
from mobile_vla.export.signature import load_signature

pytestmark = pytest.mark.slow  # one or two dynamo exports each: about a minute on a loaded 2-core box


def _save(root, config, tokenizer, wake_attention=False):
    from mobile_vla.policy import build_policy, save_policy
    from mobile_vla.policy.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = build_policy(config).eval()
    with torch.no_grad():  # outputs that vary, and (optionally) attention that adds to the pooled features
        model.head[-1].weight.normal_(std=0.2)
        if wake_attention:
            for pooling in (model.patch_attention.kosmos, model.patch_attention.clip):
                pooling.out.weight.normal_(std=0.5)
    preprocessing = Preprocessing(
        action_low=[-0.2, -0.3, -1.0],
        action_high=[0.6, 0.3, 1.0],
        state_mean=[0.1, 0.0, 0.0],
        state_std=[0.2, 0.1, 0.5],
        tokenizer=tokenizer,
    )
    save_policy(root / "policy", model, preprocessing)
    return model, preprocessing


def _initializers(onnx_dir):
    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    return sorted(tuple(init.dims) for init in graph.initializer), len(graph.node)


def test_text_attention_exports_with_parity(tmp_path):
    import onnxruntime as ort

    from mobile_vla.export import parity
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import build_policy, build_tokenizer, presets

    config = presets.tiny().replace(fusion_pooling="text_attention")
    model, preprocessing = _save(tmp_path, config, build_tokenizer(config), wake_attention=True)
    result = export_model(tmp_path)  # raises ModelError when a parity figure exceeds its tolerance
    figures = load_signature(result.onnx_dir).parity
    assert max(figures.fp32_max_abs_diff.values()) <= FP32_TOLERANCE
    assert figures.sequence_max_abs_diff <= FP32_TOLERANCE

    # the graph computes the attention: its answer differs from the same weights without it
    pooled = build_policy(presets.tiny()).eval()
    pooled.load_state_dict(model.state_dict(), strict=False)
    frames = parity.parity_frames(4, seed=3).images
    feeds = parity.step_feeds(model, preprocessing, frames, parity.PARITY_INSTRUCTIONS, seed=3)
    session = ort.InferenceSession(str(result.onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = parity.ort_step(session, feeds)["actions"]
    assert np.abs(got - parity.torch_step(model, feeds)["actions"]).max() <= FP32_TOLERANCE
    assert np.abs(got - parity.torch_step(pooled, feeds)["actions"]).max() > 1e-3


def test_aux_heads_leave_the_exported_graph_and_signature_unchanged(exported_dir, tmp_path):
    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.policy import build_tokenizer, presets

    config = presets.tiny().replace(aux_heads=True)
    model, _ = _save(tmp_path, config, build_tokenizer(config))
    assert sum(p.numel() for p in model.aux_head.parameters()) > 0
    result = export_model(tmp_path)  # parity checked inside: the graph answers like model.step
    with_aux, plain = load_signature(result.onnx_dir), load_signature(exported_dir / "onnx")
    assert with_aux.inputs == plain.inputs and with_aux.outputs == plain.outputs
    assert with_aux.recurrent == plain.recurrent and with_aux.actions.chunk == plain.actions.chunk
    assert max(with_aux.parity.fp32_max_abs_diff.values()) <= FP32_TOLERANCE
    # the same graph: the same weights by shape and the same number of nodes as tiny without aux heads
    assert _initializers(result.onnx_dir) == _initializers(exported_dir / "onnx")
