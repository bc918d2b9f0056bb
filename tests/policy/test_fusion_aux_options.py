"""Issue 15 model options: instruction-conditioned pooling over patch tokens (`fusion_pooling =
"text_attention"`) and the training-only auxiliary heads on the simulator labels (`aux_heads`). Each is
off by default, saved with the config, and changes what it should and nothing else."""

from __future__ import annotations

import math

import pytest
import torch

from mobile_vla.errors import ConfigError, DataError
from mobile_vla.policy import build_policy
from mobile_vla.policy.config import AUX_LABELS
from mobile_vla.policy.losses import AUX_TERMS, policy_loss

TOKEN_KEYS = ("clip_input_ids", "kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")


def _build(config, seed=0):
    torch.manual_seed(seed)
    model = build_policy(config)
    with torch.no_grad():  # the head starts near zero: make outputs vary so comparisons mean something
        model.head[-1].weight.normal_(std=0.2)
    return model


def _wake_attention(model):
    """The attention's output projections start at zero (the model begins as the pooled one): randomise them."""
    with torch.no_grad():
        for pooling in (model.patch_attention.kosmos, model.patch_attention.clip):
            pooling.out.weight.normal_(std=0.5)


def _labels(batch, bearing, distance, in_view):
    B, T = batch["frame_mask"].shape
    values = (bearing, distance, in_view)
    return {**batch, **{key: torch.full((B, T), float(v)) for key, v in zip(AUX_LABELS, values, strict=True)}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"fusion_pooling": "cross"},
            "PolicyConfig.fusion_pooling = 'cross': expected one of 'pooled', 'text_attention'",
        ),
        ({"attention_heads": 0}, "PolicyConfig.attention_heads = 0"),
        (
            {"fusion_pooling": "text_attention", "attention_heads": 5},
            "PolicyConfig.fusion_dim = 64: must be divisible by attention_heads = 5",
        ),
        ({"aux_heads": "yes"}, "PolicyConfig.aux_heads = 'yes'"),
    ],
)
def test_bad_option_values_name_field_and_value(tiny_config, changes, message):
    with pytest.raises(ConfigError) as info:
        tiny_config.replace(**changes)
    assert message in str(info.value)


def test_defaults_build_the_old_model_and_the_options_round_trip(tiny_config, tiny_tokenizer, make_batch):
    assert (tiny_config.fusion_pooling, tiny_config.aux_heads) == ("pooled", False)
    model = _build(tiny_config)
    assert model.patch_attention is None and model.aux_head is None
    assert set(model.parameter_counts()) == {"kosmos", "clip", "fusion", "lstm", "head", "total", "trainable"}
    with torch.no_grad():
        assert model(make_batch(tiny_config, tiny_tokenizer, batch_size=1, frames=2)).aux is None
    config = tiny_config.replace(fusion_pooling="text_attention", attention_heads=2, aux_heads=True)
    assert type(config).from_dict(config.to_dict()) == config
    old = tiny_config.to_dict()  # a checkpoint saved before these fields existed rebuilds the old model
    for key in ("fusion_pooling", "attention_heads", "aux_heads"):
        del old[key]
    assert type(config).from_dict(old) == tiny_config
    counts = _build(config).parameter_counts()
    assert counts["patch_attention"] > 0 and counts["aux_head"] > 0
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))


def test_text_attention_starts_as_the_pooled_model_then_reads_the_patches(tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(fusion_pooling="text_attention")
    attending = _build(config).eval()
    pooled = build_policy(tiny_config).eval()
    missing, unexpected = pooled.load_state_dict(attending.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("patch_attention.") for k in unexpected)
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=2)
    with torch.no_grad():
        assert torch.allclose(attending(batch).actions, pooled(batch).actions, atol=1e-6)  # zero-initialised
        _wake_attention(attending)
        woken = attending(batch).actions
        assert (woken - pooled(batch).actions).abs().max() > 1e-3
        # the query is the instruction: the same frames under another instruction read other patches
        kosmos_patches = torch.randn(4, 49, config.kosmos.vision_width)
        texts = torch.randn(2, config.clip.embed_dim).repeat_interleave(2, dim=0)  # [4, D_c], two instructions
        read = attending.patch_attention.kosmos(texts, kosmos_patches)  # [4, D_k]
        read_other = attending.patch_attention.kosmos(texts.flip(0), kosmos_patches)
        assert (read - read_other).abs().max() > 1e-3
        # and what it reads comes from the patch tokens: change one patch, the read changes
        changed = kosmos_patches.clone()
        changed[:, 10] = torch.randn(4, config.kosmos.vision_width) * 3.0  # (a constant shift would be normed away)
        assert (attending.patch_attention.kosmos(texts, changed) - read).abs().max() > 1e-4


def test_text_attention_step_equals_forward_over_the_window(tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(fusion_pooling="text_attention", attention_heads=2)
    model = _build(config).eval()
    _wake_attention(model)
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=3)
    tokens = {key: batch[key] for key in TOKEN_KEYS}
    with torch.no_grad():
        whole = model(batch).actions  # [B, T, K, 3]
        memory = None
        for t in range(3):
            actions, _, memory = model.step(batch["images"][:, t], batch["state"][:, t], tokens, memory)
            assert torch.allclose(actions, whole[:, t], atol=1e-5)


def test_aux_heads_are_training_only(tiny_config, tiny_tokenizer, make_batch):
    """The heads add outputs to `forward` and nothing to the actions, the confidence or `step`."""
    config = tiny_config.replace(aux_heads=True)
    with_aux = _build(config).eval()
    without = build_policy(tiny_config).eval()
    missing, unexpected = without.load_state_dict(with_aux.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("aux_head.") for k in unexpected)
    batch = make_batch(config, tiny_tokenizer, batch_size=2, frames=3)
    tokens = {key: batch[key] for key in TOKEN_KEYS}
    with torch.no_grad():
        out, reference = with_aux(batch), without(batch)
        step_aux = with_aux.step(batch["images"][:, 0], batch["state"][:, 0], tokens)
        step_ref = without.step(batch["images"][:, 0], batch["state"][:, 0], tokens)
    assert out.aux.bearing.shape == (2, 3, 2) and out.aux.distance.shape == out.aux.in_view_logit.shape == (2, 3)
    assert torch.equal(out.actions, reference.actions) and torch.equal(out.confidence, reference.confidence)
    assert all(torch.equal(a, b) for a, b in zip(step_aux[:2], step_ref[:2], strict=True))


def test_aux_loss_terms_follow_their_definition(tiny_config, tiny_tokenizer, make_batch):
    model = _build(tiny_config.replace(aux_heads=True)).eval()
    with torch.no_grad():  # constant predictions: bearing 0 as (sin, cos) = (0, 1), 2 m, P(in view) = 0.5
        model.aux_head[-1].weight.zero_()
        model.aux_head[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, 0.0]))
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=2, frames=3)
    batch = _labels(batch, bearing=math.pi / 2, distance=3.5, in_view=1.0)
    batch["target_in_view"][0, 0] = 0.0  # an out-of-view frame with a wild bearing/distance: not counted
    batch["target_bearing"][0, 0], batch["target_distance"][0, 0] = -3.0, 40.0
    batch["frame_mask"][1, 2] = 0.0  # padding: counts nowhere
    batch["target_distance"][1, 2] = 100.0
    with torch.no_grad():
        output = model(batch)
        plain = policy_loss(output, batch)
        terms = policy_loss(output, batch, aux_weight=0.5)
    assert set(plain) == {"loss", "huber", "nll"} and set(AUX_TERMS) <= set(terms)
    assert terms["aux_bearing"].item() == pytest.approx(2.0, abs=1e-5)  # (1 - 0)^2 + (0 - 1)^2
    assert terms["aux_distance"].item() == pytest.approx(1.5 - 0.5, abs=1e-5)  # Huber(1.5), delta 1
    assert terms["aux_in_view"].item() == pytest.approx(math.log(2.0), abs=1e-5)  # BCE at p = 0.5, 5 frames
    aux = terms["aux_bearing"] + terms["aux_distance"] + terms["aux_in_view"]
    assert terms["aux"].item() == pytest.approx(aux.item(), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * aux.item(), abs=1e-5)


def test_aux_loss_trains_the_fusion_and_not_the_action_head(tiny_config, tiny_tokenizer, make_batch):
    config = tiny_config.replace(aux_heads=True, fusion_pooling="text_attention")
    model = _build(config).train()
    batch = _labels(make_batch(config, tiny_tokenizer, batch_size=2, frames=2), bearing=0.4, distance=2.0, in_view=1.0)
    policy_loss(model(batch), batch, nll_weight=0.0, aux_weight=1.0)["aux"].backward()
    grad = {name: p.grad for name, p in model.named_parameters()}
    assert grad["fusion.kosmos.1.weight"].abs().max() > 0  # the fused feature learns what the labels say
    assert grad["patch_attention.kosmos.out.weight"].abs().max() > 0
    assert all(grad[name] is None for name in grad if name.startswith(("lstm.", "head.")))


def test_aux_loss_needs_heads_and_labels(tiny_config, tiny_tokenizer, make_batch):
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=1, frames=2)
    with torch.no_grad():
        plain_output = _build(tiny_config).eval()(batch)
        aux_output = _build(tiny_config.replace(aux_heads=True)).eval()(batch)
    with pytest.raises(ConfigError, match=r"loss.aux_weight > 0 but the model has no auxiliary heads"):
        policy_loss(plain_output, _labels(batch, 0.0, 1.0, 1.0), aux_weight=0.5)
    partial = _labels(batch, 0.0, 1.0, 1.0)
    del partial["target_distance"]
    with pytest.raises(DataError, match=r"per-frame label\(s\) target_distance in every window"):
        policy_loss(aux_output, partial, aux_weight=0.5)
    assert set(policy_loss(aux_output, batch)) == {"loss", "huber", "nll"}  # weight 0: no labels needed
