"""The recipe options of PolicyConfig (issue 15): state input and state dropout, confidence from the
executed step, the internal image resolution; each changes what it should and nothing else."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mobile_vla.errors import ConfigError
from mobile_vla.policy import build_policy, presets

TOKEN_KEYS = ("clip_input_ids", "kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")


def _build(config, seed=0):
    torch.manual_seed(seed)
    model = build_policy(config)
    with torch.no_grad():  # the head starts near zero: make outputs vary so comparisons mean something
        model.head[-1].weight.normal_(std=0.2)
    return model


def _with_image_size(config, size: int, patch: int):
    return config.replace(
        image_size=size,
        kosmos=dataclasses.replace(config.kosmos, patch_size=patch),
        clip=dataclasses.replace(config.clip, patch_size=patch),
    )


def _with_state(batch, state):
    return {**batch, "state": state}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"state_input": "velocity"}, "PolicyConfig.state_input = 'velocity'"),
        ({"state_dropout": 1.0}, "PolicyConfig.state_dropout = 1.0"),
        ({"state_dropout": -0.1}, "PolicyConfig.state_dropout = -0.1"),
        ({"confidence_steps": 0}, "PolicyConfig.confidence_steps = 0"),
        ({"confidence_steps": 11}, "PolicyConfig.confidence_steps = 11: must be at most chunk = 10"),
        ({"image_size": 100}, "PolicyConfig.image_size = 100"),
        ({"image_size": 448}, "PolicyConfig.image_size = 448"),
        ({"image_size": 112}, "PolicyConfig.kosmos.patch_size = 32: must divide image_size = 112"),
    ],
)
def test_bad_recipe_values_name_field_and_value(tiny_config, changes, message):
    with pytest.raises(ConfigError) as info:
        tiny_config.replace(**changes)
    assert message in str(info.value)


def test_pretrained_backbones_keep_the_full_resolution():
    with pytest.raises(ConfigError, match="PolicyConfig.image_size = 112: pretrained kosmos weights need 224"):
        _with_image_size(presets.full(), 112, 16)


def test_defaults_keep_the_old_recipe_and_round_trip(tiny_config):
    assert (tiny_config.state_input, tiny_config.state_dropout) == ("previous_command", 0.0)
    assert tiny_config.confidence_span == tiny_config.chunk and tiny_config.image_size == 224
    config = _with_image_size(tiny_config, 112, 16).replace(state_input="none", state_dropout=0.5, confidence_steps=1)
    assert type(config).from_dict(config.to_dict()) == config
    old = tiny_config.to_dict()  # a checkpoint saved before these fields existed rebuilds the old model
    for key in ("state_input", "state_dropout", "confidence_steps", "image_size"):
        del old[key]
    assert type(config).from_dict(old) == tiny_config


def test_state_is_used_by_default(tiny_config, tiny_tokenizer, make_batch):
    model = _build(tiny_config).eval()
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=2, frames=3)
    with torch.no_grad():
        a = model(batch).actions
        b = model(_with_state(batch, batch["state"] + 1.0)).actions
    assert (a - b).abs().max() > 1e-3


def test_state_input_none_ignores_the_state_but_keeps_the_input(tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(state_input="none")
    model = _build(config)
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=3)
    tokens = {key: batch[key] for key in TOKEN_KEYS}
    for mode in (False, True):
        model.train(mode)
        with torch.no_grad():
            a = model(batch).actions
            b = model(_with_state(batch, batch["state"] * 5.0 + 2.0)).actions
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():  # the serving step still takes state [B, S] and ignores it too
        step_a, _, _ = model.step(batch["images"][:, 0], batch["state"][:, 0], tokens)
        step_b, _, _ = model.step(batch["images"][:, 0], batch["state"][:, 0] + 3.0, tokens)
    assert torch.equal(step_a, step_b)


def test_state_dropout_zeroes_whole_windows_per_sample_in_training_only(tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(state_dropout=0.5)
    model = _build(config).train()
    B = 32
    batch = make_batch(config, tiny_tokenizer, batch_size=B, frames=3)
    zeroed = _with_state(batch, torch.zeros_like(batch["state"]))
    with torch.no_grad():
        reference = model(zeroed).actions  # [B, T, K, 3] without any state
        torch.manual_seed(3)
        dropped = model(batch).actions
        torch.manual_seed(3)
        other_state = model(_with_state(batch, batch["state"] + 1.0)).actions  # the same draws
    # a sample is dropped as a whole window (all T frames equal the zero-state output) or not at all
    per_frame = (dropped - reference).abs().amax(dim=(2, 3)) == 0  # [B, T]
    assert torch.equal(per_frame.all(dim=1), per_frame.any(dim=1))
    is_dropped = per_frame.all(dim=1)  # [B]
    assert 4 <= int(is_dropped.sum()) <= B - 4  # about half of 32
    assert torch.equal(dropped[is_dropped], other_state[is_dropped])  # dropped: independent of the state
    assert (dropped[~is_dropped] - other_state[~is_dropped]).abs().amax() > 1e-3
    model.eval()  # evaluation never drops: the state is used for every sample
    with torch.no_grad():
        evaluated = model(batch).actions
    assert ((evaluated - reference).abs().amax(dim=(1, 2, 3)) > 0).all()


def test_confidence_from_the_first_step_is_the_k0_erf(tiny_config):
    config = tiny_config.replace(confidence_steps=1)
    model = _build(config)
    out_dim = config.chunk * 3
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()
        model.head[-1].bias[out_dim:] = torch.linspace(-6.0, 6.0, out_dim)  # log-variance grows with k
        _, log_var, confidence = model._heads(torch.zeros(1, config.lstm_hidden))
    sigma = torch.exp(0.5 * log_var[0, 0]).double()  # [3] at k = 0
    expected = torch.erf(config.confidence_tolerance / (sigma * math.sqrt(2.0))).mean()
    assert confidence.item() == pytest.approx(expected.item(), abs=1e-6)
    whole_chunk = build_policy(tiny_config)
    whole_chunk.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, _, averaged = whole_chunk._heads(torch.zeros(1, config.lstm_hidden))
    assert averaged.item() < confidence.item() - 0.1  # later, less certain steps pull the old mean down


def test_image_size_112_pools_inside_the_model(tiny_config, tiny_tokenizer, make_batch):
    config = _with_image_size(tiny_config, 112, 16)
    model = _build(config).eval()
    grid = (112 // 16) ** 2 + 1  # patches + class token, as at 224 px with patch 32
    assert model.kosmos.model.vision_model.model.embeddings.position_embedding.weight.shape[0] == grid
    assert model.clip.model.visual.positional_embedding.shape[0] == grid
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=2)
    images = batch["images"]  # [B, T, 224, 224, 3] uint8: the API is unchanged
    # swapping the two columns inside every 2x2 block keeps each block's mean: the pooled input is equal
    swapped = images.view(2, 2, 224, 112, 2, 3).flip(4).reshape(images.shape)
    shifted = images.clone()
    shifted[..., :112, :, :] = 255 - shifted[..., :112, :, :]
    with torch.no_grad():
        a = model(batch)
        b = model({**batch, "images": swapped})
        c = model({**batch, "images": shifted})
    assert a.actions.shape == (2, 2, config.chunk, 3)
    assert not torch.equal(swapped, images)
    assert torch.allclose(a.actions, b.actions, atol=1e-5)
    assert (a.actions - c.actions).abs().max() > 1e-3


@pytest.mark.slow
def test_image_size_112_exports_to_onnx_with_parity(tiny_tokenizer, tmp_path):
    """The dynamo export of a 112 px, state-free, k=0-confidence tiny policy passes the export's own
    parity checks (export_model raises otherwise) and keeps the 224 px frame and state inputs."""
    import onnxruntime as ort

    from mobile_vla.export.onnx_export import export_model
    from mobile_vla.export.parity import FP32_TOLERANCE
    from mobile_vla.export.signature import load_signature
    from mobile_vla.policy import save_policy
    from mobile_vla.policy.preprocessing import Preprocessing

    config = _with_image_size(presets.tiny(), 112, 16).replace(state_input="none", confidence_steps=1)
    model = _build(config).eval()
    preprocessing = Preprocessing(
        action_low=[-0.2, -0.3, -1.0],
        action_high=[0.6, 0.3, 1.0],
        state_mean=[0.1, 0.0, 0.0],
        state_std=[0.2, 0.1, 0.5],
        tokenizer=tiny_tokenizer,
    )
    save_policy(tmp_path / "policy", model, preprocessing)
    result = export_model(tmp_path)  # raises ModelError when a parity figure exceeds its tolerance
    signature = load_signature(result.onnx_dir)
    inputs = {spec.name: spec.shape for spec in signature.inputs}
    assert inputs["images"] == ["B", 224, 224, 3] and inputs["state"] == ["B", 3]
    session = ort.InferenceSession(str(result.onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {"images", "state"} <= {node.name for node in session.get_inputs()}  # the graph still takes state
    assert max(signature.parity.fp32_max_abs_diff.values()) <= FP32_TOLERANCE
    assert signature.parity.sequence_max_abs_diff <= FP32_TOLERANCE


def test_an_ensemble_takes_its_members_confidence_steps(tiny_config, tiny_tokenizer, make_batch):
    from mobile_vla.policy.ensemble import EnsembleConfig, EnsemblePolicy
    from mobile_vla.policy.model import chunk_confidence

    config = tiny_config.replace(confidence_steps=1)
    with pytest.raises(ConfigError, match=r"members\[1\].confidence_span = 10: members must share"):
        EnsembleConfig(members=(config, tiny_config))
    ensemble = EnsemblePolicy.from_members([_build(config, seed=0), _build(config, seed=1)])
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=2)
    with torch.no_grad():
        out = ensemble(batch)
    sigma = torch.exp(0.5 * out.log_var)  # [B, T, K, 3], the mixture's
    assert torch.allclose(out.confidence, chunk_confidence(sigma, config.confidence_tolerance, 1), atol=1e-6)
    assert not torch.allclose(out.confidence, chunk_confidence(sigma, config.confidence_tolerance, config.chunk))
