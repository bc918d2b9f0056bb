"""The two backbones: Kosmos-2 (image + instruction together) and CLIP (image and text separately).

Both are the real library classes (`transformers.Kosmos2Model`, `open_clip.model.CLIP`) built from
`KosmosConfig` / `ClipConfig`: random init at any size, or pretrained weights (hub id / local path)
when the config names them. Pretrained weights must match the configured sizes, so a checkpoint
saved from a pretrained run rebuilds from its config alone (random init, then its own weights).
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import Kosmos2Config, Kosmos2Model

from mobile_vla.errors import ModelError
from mobile_vla.policy.config import CLIP_CONTEXT_LENGTH, IMAGE_SIZE, ClipConfig, KosmosConfig
from mobile_vla.policy.hub import from_local_or_hub, hub_reachable

CLIP_VOCAB_SIZE = 49408  # open_clip's shipped BPE, shared by every CLIP preset


def kosmos_hf_config(config: KosmosConfig, image_size: int = IMAGE_SIZE):
    """The transformers config of these sizes; the vision grid is image_size / patch_size per side."""
    return Kosmos2Config(
        text_config=dict(
            vocab_size=config.text_vocab_size,
            embed_dim=config.text_width,
            layers=config.text_layers,
            ffn_dim=config.text_ffn,
            attention_heads=config.text_heads,
            dropout=config.dropout,
            attention_dropout=config.dropout,
            use_cache=False,
        ),
        vision_config=dict(
            hidden_size=config.vision_width,
            intermediate_size=config.vision_mlp,
            num_hidden_layers=config.vision_layers,
            num_attention_heads=config.vision_heads,
            patch_size=config.patch_size,
            image_size=image_size,
        ),
        latent_query_num=config.latent_query_num,
    )


class KosmosEncoder(nn.Module):
    """Kosmos-2's multimodal feature: its language model reads the image latents and the instruction
    in one causal sequence; the masked mean of the last hidden states summarises both. [N, D_k]
    """

    def __init__(self, config: KosmosConfig, load_pretrained: bool = True, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if config.pretrained and load_pretrained:
            self.model = _load_kosmos(config)
        else:
            self.model = Kosmos2Model(kosmos_hf_config(config, image_size))
        self.feature_dim = config.text_width
        self.patch_dim = config.vision_width  # C of its vision patch tokens

    def forward(self, pixels, input_ids, attention_mask, image_embeds_position_mask, with_patches: bool = False):
        """Pixels [N, C, H, W] normalised, token arrays [N, L] -> feature [N, D_k], and with `with_patches`
        also the vision tower's patch tokens [N, P, C_k] (its last layer, class token left out).
        """
        output = self.model(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds_position_mask=image_embeds_position_mask,
            use_cache=False,
        )
        hidden = output.last_hidden_state  # [N, L, D_k]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [N, L, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N, D_k]
        if not with_patches:
            return pooled
        return pooled, output.image_outputs.last_hidden_state[:, 1:]  # [N, P, C_k]


def _load_kosmos(config: KosmosConfig):
    try:
        model = from_local_or_hub(Kosmos2Model.from_pretrained, config.pretrained)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load pretrained Kosmos-2 weights from {config.pretrained!r}: no network and no local "
            f"folder ({type(exc).__name__}); pass a local folder path or use preset small"
        ) from None
    loaded = model.config
    expected = kosmos_hf_config(config)
    for name in ("embed_dim", "layers", "vocab_size"):
        got, want = getattr(loaded.text_config, name), getattr(expected.text_config, name)
        if got != want:
            raise ModelError(f"Kosmos-2 weights {config.pretrained!r}: text {name} = {got}, config says {want}")
    if loaded.latent_query_num != config.latent_query_num:
        raise ModelError(
            f"Kosmos-2 weights {config.pretrained!r}: latent_query_num = {loaded.latent_query_num}, "
            f"config says {config.latent_query_num}"
        )
    model.config.text_config.use_cache = False
    return model


def clip_configs(config: ClipConfig, image_size: int = IMAGE_SIZE):
    """open_clip vision and text configs of these sizes; the vision grid is image_size / patch_size per side."""
    vision = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_head_width,
        patch_size=config.patch_size,
        image_size=image_size,
    )
    text = CLIPTextCfg(
        context_length=CLIP_CONTEXT_LENGTH,
        vocab_size=CLIP_VOCAB_SIZE,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    return vision, text


class ClipEncoder(nn.Module):
    """CLIP image features per frame [N, D_c] and text features per instruction [B, D_c]; with
    `patch_tokens` its vision tower also returns the patch tokens [N, P, C_c] (after its final norm).
    """

    def __init__(
        self, config: ClipConfig, load_pretrained: bool = True, image_size: int = IMAGE_SIZE, patch_tokens: bool = False
    ) -> None:
        super().__init__()
        if config.pretrained and load_pretrained:
            self.model = _load_clip(config)
        else:
            vision, text = clip_configs(config, image_size)
            self.model = CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text)
        self.model.visual.output_tokens = patch_tokens  # open_clip: visual(x) -> (pooled, tokens)
        self.feature_dim = config.embed_dim
        self.patch_dim = config.vision_width  # C of its vision patch tokens

    def encode_image(self, pixels, with_patches: bool = False):
        """[N, C, H, W] -> [N, D_c], and with `with_patches` also the patch tokens [N, P, C_c]."""
        output = self.model.visual(pixels)
        pooled, patches = output if self.model.visual.output_tokens else (output, None)
        return (pooled, patches) if with_patches else pooled

    def encode_text(self, clip_input_ids):  # [B, 77] -> [B, D_c]
        return self.model.encode_text(clip_input_ids)


def _load_clip(config: ClipConfig):
    try:
        if not Path(config.pretrained).is_file() and not hub_reachable():
            raise OSError("not a local file and the hub is unreachable")
        model = open_clip.create_model(config.model_name, pretrained=config.pretrained)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/hub errors alike
        raise ModelError(
            f"cannot load pretrained CLIP weights {config.model_name!r} / {config.pretrained!r}: no network "
            f"and no local file ({type(exc).__name__}); pass a local weights file or use preset small"
        ) from None
    if model.visual.output_dim != config.embed_dim:
        raise ModelError(
            f"CLIP weights {config.pretrained!r}: embed_dim = {model.visual.output_dim}, config says {config.embed_dim}"
        )
    return model


def freeze(module: nn.Module) -> None:
    """Stops every parameter of `module` from training."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def apply_lora(encoder: KosmosEncoder, config: KosmosConfig) -> None:
    """LoRA on the language model's attention (not the vision tower): adapts how the frozen LM reads
    instructions for driving, at ~0.5% of its parameters.
    """
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
    )
    inject_adapter_in_model(lora, encoder.model.text_model)


def enable_gradient_checkpointing(kosmos: KosmosEncoder, clip: ClipEncoder) -> None:
    """Recomputes both backbones' activations in backward instead of storing them (memory for time)."""
    kosmos.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    clip.model.set_grad_checkpointing(True)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in `module`, trainable or not."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "ClipEncoder",
    "KosmosEncoder",
    "apply_lora",
    "count_parameters",
    "enable_gradient_checkpointing",
    "freeze",
]
