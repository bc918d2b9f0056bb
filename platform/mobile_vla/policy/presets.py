"""Named policy sizes, numbers written out. All three build the SAME classes; only sizes and weights differ.

mobile-vla model info --preset small
build_policy(presets.full(pretrained=False))   # real Kosmos-2 + CLIP ViT-B/32 sizes, random weights
"""

from __future__ import annotations

from mobile_vla.errors import ConfigError
from mobile_vla.policy.config import ClipConfig, KosmosConfig, PolicyConfig

KOSMOS_HUB_ID = "microsoft/kosmos-2-patch14-224"
CLIP_MODEL_NAME = "ViT-B-32"
CLIP_PRETRAINED_TAG = "openai"


def tiny() -> PolicyConfig:
    """Tests: builds and runs a step in well under a second on one CPU core."""
    return PolicyConfig(
        preset="tiny",
        window=8,
        chunk=10,
        state_dim=3,
        kosmos=KosmosConfig(
            vision_layers=1,
            vision_width=32,
            vision_heads=2,
            vision_mlp=64,
            patch_size=32,
            text_layers=1,
            text_width=64,
            text_heads=2,
            text_ffn=128,
            text_vocab_size=2048,
            latent_query_num=8,
            max_instruction_tokens=32,  # generated instructions need up to ~28
            dropout=0.0,
        ),
        clip=ClipConfig(
            model_name="tiny",
            embed_dim=64,
            vision_layers=1,
            vision_width=64,
            vision_head_width=32,
            patch_size=32,
            text_layers=1,
            text_width=64,
            text_heads=2,
        ),
        fusion="gated",
        fusion_dim=64,
        lstm_hidden=64,
        lstm_layers=1,
        head_hidden=64,
        dropout=0.0,
    )


def small() -> PolicyConfig:
    """A 2-core CPU trains it in minutes: a few million parameters, most in the CLIP token table."""
    return PolicyConfig(
        preset="small",
        window=8,
        chunk=10,
        state_dim=3,
        kosmos=KosmosConfig(
            vision_layers=2,
            vision_width=128,
            vision_heads=4,
            vision_mlp=256,
            patch_size=32,
            text_layers=2,
            text_width=128,
            text_heads=4,
            text_ffn=256,
            text_vocab_size=2048,
            latent_query_num=16,
            max_instruction_tokens=32,
            dropout=0.1,
        ),
        clip=ClipConfig(
            model_name="small",
            embed_dim=128,
            vision_layers=2,
            vision_width=128,
            vision_head_width=32,
            patch_size=32,
            text_layers=2,
            text_width=64,
            text_heads=2,
        ),
        fusion="gated",
        fusion_dim=128,
        lstm_hidden=128,
        lstm_layers=1,
        head_hidden=128,
        dropout=0.1,
    )


def full(
    pretrained: bool = True,
    kosmos_weights: str = KOSMOS_HUB_ID,
    clip_weights: str = CLIP_PRETRAINED_TAG,
    freeze_backbones: bool = True,
    lora_rank: int = 16,
    gradient_checkpointing: bool = True,
) -> PolicyConfig:
    """Kosmos-2 patch14-224 (1.66 B) + CLIP ViT-B/32 (151 M): the GPU model.

    `kosmos_weights` / `clip_weights` may be local paths (offline clusters). With
    `pretrained=False` the same architecture is built with random weights (anywhere, no download).
    """
    return PolicyConfig(
        preset="full",
        window=8,
        chunk=10,
        state_dim=3,
        kosmos=KosmosConfig(
            pretrained=kosmos_weights if pretrained else None,
            vision_layers=24,
            vision_width=1024,
            vision_heads=16,
            vision_mlp=4096,
            patch_size=14,
            text_layers=24,
            text_width=2048,
            text_heads=32,
            text_ffn=8192,
            text_vocab_size=65037,
            latent_query_num=64,
            max_instruction_tokens=32,
            dropout=0.1,
            lora_rank=lora_rank if freeze_backbones else 0,
            lora_alpha=2 * lora_rank if lora_rank else 16,
        ),
        clip=ClipConfig(
            model_name=CLIP_MODEL_NAME,
            pretrained=clip_weights if pretrained else None,
            embed_dim=512,
            vision_layers=12,
            vision_width=768,
            vision_head_width=64,
            patch_size=32,
            text_layers=12,
            text_width=512,
            text_heads=8,
        ),
        fusion="gated",
        fusion_dim=512,
        lstm_hidden=512,
        lstm_layers=2,
        head_hidden=512,
        dropout=0.1,
        freeze_kosmos=freeze_backbones,
        freeze_clip=freeze_backbones,
        gradient_checkpointing=gradient_checkpointing,
    )


PRESETS = {"tiny": tiny, "small": small, "full": full}


def get_preset(name: str) -> PolicyConfig:
    """The PolicyConfig of a named preset ("tiny", "small", "full"); ConfigError for any other name."""
    if name not in PRESETS:
        raise ConfigError(f"policy preset {name!r}: expected one of {', '.join(map(repr, PRESETS))}")
    return PRESETS[name]()
