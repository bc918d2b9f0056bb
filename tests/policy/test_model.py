import math

import numpy as np
import pytest
import torch

from mobile_vla.policy import build_policy, policy_loss, presets


def _build(config, seed=0):
    torch.manual_seed(seed)
    return build_policy(config)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_forward_shapes_for_cpu_presets(preset, tiny_tokenizer, make_batch):
    config = presets.get_preset(preset)
    tokenizer = tiny_tokenizer if preset == "tiny" else _tokenizer(config)
    model = _build(config).eval()
    B, T, K = 2, 3, config.chunk
    batch = make_batch(config, tokenizer, batch_size=B, frames=T)
    with torch.no_grad():
        out = model(batch)
    assert out.actions.shape == (B, T, K, 3)
    assert out.log_var.shape == (B, T, K, 3)
    assert out.confidence.shape == (B, T)
    h, c = out.memory
    assert h.shape == c.shape == (config.lstm_layers, B, config.lstm_hidden)
    assert out.actions.abs().max() <= 1.0  # normalised range
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all()
    assert (out.log_var >= config.log_var_min).all() and (out.log_var <= config.log_var_max).all()


def _tokenizer(config):
    from mobile_vla.policy import build_tokenizer

    return build_tokenizer(config)


@pytest.mark.parametrize("fusion", ["gated", "concat", "film"])
def test_backward_reaches_every_trainable_parameter(fusion, tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(fusion=fusion)
    model = _build(config).train()
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=2)
    losses = policy_loss(model(batch), batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    unused = {"clip.model.logit_scale"}  # CLIP's contrastive temperature: not part of the policy's path
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and n not in unused]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seeded_builds_are_identical_and_seeds_matter(tiny_config, tiny_tokenizer, make_batch):
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=1, frames=2)
    with torch.no_grad():
        a = _build(tiny_config, seed=7).eval()(batch).actions
        b = _build(tiny_config, seed=7).eval()(batch).actions
        c = _build(tiny_config, seed=8).eval()(batch).actions
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_step_by_step_equals_sequence_forward(tiny_config, tiny_tokenizer, make_batch):
    model = _build(tiny_config).eval()
    B, T = 2, tiny_config.window
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=B, frames=T)
    tokens = {
        key: batch[key]
        for key in ("clip_input_ids", "kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")
    }
    with torch.no_grad():
        full = model(batch)
        clip_text = model.encode_instruction(tokens["clip_input_ids"])
        memory = model.initial_memory(B)
        for t in range(T):
            actions, confidence, memory = model.step(
                batch["images"][:, t], batch["state"][:, t], tokens, memory, clip_text
            )
            assert (actions - full.actions[:, t]).abs().max() <= 1e-5
            assert (confidence - full.confidence[:, t]).abs().max() <= 1e-5
        # without a precomputed clip_text, step encodes the instruction itself: same answer
        again, _, _ = model.step(batch["images"][:, -1], batch["state"][:, -1], tokens, None, None)
        first, _, _ = model.step(batch["images"][:, -1], batch["state"][:, -1], tokens, None, clip_text)
    for got, want in zip(memory, full.memory, strict=True):
        assert (got - want).abs().max() <= 1e-5
    assert torch.allclose(again, first, atol=1e-6)


def test_padding_frames_leave_memory_unchanged(tiny_config, tiny_tokenizer, make_batch):
    model = _build(tiny_config).eval()
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=2, frames=4)
    masked = dict(batch)
    masked["frame_mask"] = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        short = model({k: v[:, :2] if v.dim() > 1 and k not in _TOKEN_KEYS else v for k, v in batch.items()})
        out = model(masked)
        unmasked = model(batch)
    # sample 0: memory after two real frames + two padding frames == memory after the two real frames
    for got, want in zip(out.memory, short.memory, strict=True):
        assert torch.allclose(got[:, 0], want[:, 0], atol=1e-6)
    for got, want in zip(out.memory, unmasked.memory, strict=True):  # sample 1 is unmasked: unaffected
        assert torch.allclose(got[:, 1], want[:, 1], atol=1e-6)
        assert not torch.allclose(got[:, 0], want[:, 0])


_TOKEN_KEYS = {"clip_input_ids", "kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask"}


def test_confidence_follows_predicted_variance(tiny_config):
    model = _build(tiny_config)
    hidden = torch.zeros(1, tiny_config.lstm_hidden)
    last = model.head[-1]
    out_dim = tiny_config.chunk * 3
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[out_dim:] = -20.0  # log_var at its minimum
        _, log_var, sure = model._heads(hidden)
        last.bias[out_dim:] = 20.0  # log_var at its maximum
        _, _, unsure = model._heads(hidden)
    sigma = math.exp(0.5 * tiny_config.log_var_min)
    expected = math.erf(tiny_config.confidence_tolerance / (sigma * math.sqrt(2)))
    assert torch.allclose(log_var, torch.full_like(log_var, tiny_config.log_var_min), atol=1e-4)
    assert sure.item() == pytest.approx(expected, abs=1e-4)
    assert sure.item() > 0.99 and unsure.item() < 0.05


def test_numpy_batches_are_accepted(tiny_config, tiny_tokenizer, make_batch):
    model = _build(tiny_config).eval()
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=1, frames=2)
    with torch.no_grad():
        a = model(batch).actions
        b = model({k: v.numpy() for k, v in batch.items()}).actions
    assert torch.equal(a, b)


def test_frozen_backbones_with_lora_train_only_adapters_and_head(tiny_config):
    from dataclasses import replace

    config = tiny_config.replace(
        freeze_kosmos=True, freeze_clip=True, kosmos=replace(tiny_config.kosmos, lora_rank=4, lora_alpha=8)
    )
    model = _build(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kosmos_trainable = {n for n in trainable if n.startswith("kosmos.")}
    assert kosmos_trainable and all("lora_" in n for n in kosmos_trainable)
    assert not any(n.startswith("clip.") for n in trainable)
    assert {"lstm.weight_ih_l0", "head.3.weight"} <= trainable
    model.train()
    assert not model.clip.training  # frozen backbone stays in eval mode


def test_gradient_checkpointing_gives_same_gradients(tiny_config, tiny_tokenizer, make_batch):
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=1, frames=2)
    grads = []
    for checkpointing in (False, True):
        model = _build(tiny_config.replace(gradient_checkpointing=checkpointing)).train()
        policy_loss(model(batch), batch)["loss"].backward()
        grads.append(model.lstm.weight_ih_l0.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_images_are_normalised_inside_the_model(tiny_config):
    model = _build(tiny_config)
    white = torch.full((1, 224, 224, 3), 255, dtype=torch.uint8)
    pixels = model._pixels(white)
    expected = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    assert pixels.shape == (1, 3, 224, 224)
    assert np.allclose(pixels[0, :, 0, 0].numpy(), expected, atol=1e-5)


def test_the_model_normalises_with_the_preprocessing_image_constants(tiny_config):
    from mobile_vla.policy.preprocessing import Preprocessing

    pre = Preprocessing(action_low=[-1.0] * 3, action_high=[1.0] * 3, state_mean=[], state_std=[], state_dim=0)
    mean, std = np.array(pre.image_mean), np.array(pre.image_std)
    model = _build(tiny_config)
    # the exact mean colour maps to 0 and mean + one std to 1: the same constants, not a look-alike copy
    colours = torch.tensor(np.stack([mean * 255, (mean + std) * 255]), dtype=torch.float32).view(2, 1, 1, 3)
    pixels = model._pixels(colours)[:, :, 0, 0].numpy()  # [2, C]
    np.testing.assert_allclose(pixels, [[0.0] * 3, [1.0] * 3], atol=1e-5)
    # letterbox bars (the pad colour, the mean rounded to uint8) come out within 1/255 of a std of 0
    bars = model._pixels(torch.tensor(pre.pad_color, dtype=torch.uint8).view(1, 1, 1, 3))[0, :, 0, 0].numpy()
    assert np.abs(bars).max() < 0.5 / 255 / std.min()


def test_pretrained_weights_offline_fail_fast_with_a_clear_message(tiny_config, monkeypatch, tmp_path):
    from dataclasses import replace

    from mobile_vla.errors import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    kosmos = tiny_config.replace(kosmos=replace(tiny_config.kosmos, pretrained="mobile-vla-tests/no-such-kosmos"))
    with pytest.raises(
        ModelError,
        match="cannot load pretrained Kosmos-2 weights from 'mobile-vla-tests/no-such-kosmos'"
        ".*pass a local folder path or use preset small",
    ):
        build_policy(kosmos)
    clip = tiny_config.replace(clip=replace(presets.full().clip, pretrained="openai"))
    with pytest.raises(ModelError, match="cannot load pretrained CLIP weights 'ViT-B-32' / 'openai'"):
        build_policy(clip)
