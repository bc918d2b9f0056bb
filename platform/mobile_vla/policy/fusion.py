"""Fusion of one frame's features: Kosmos-2 multimodal [N, D_k], CLIP image [N, D_c], CLIP text
[N, D_c] and robot state [N, S] -> one vector [N, D] for the LSTM.

Default "gated" - why: Kosmos-2's feature already mixes image and instruction (grounded, but from a
language model that may be frozen or random), CLIP's pair is a global image/text view with a strong
aligned prior. Which to trust differs per channel and per scene, so a sigmoid gate computed from all
three picks a per-channel mix, starting at an even 50/50 (zero-initialised gate) so neither branch is
starved early in training. State is added after the gate: it is never gated away.
"concat" is the plain baseline (MLP over the concatenation); "film" lets the CLIP instruction
embedding scale and shift the visual features (FiLM). `fusion` is a config field so a Tune sweep
compares all three on the same data.

`fusion_pooling = "text_attention"` (`PatchAttention`, before any of the three): the pooled backbone
features see the instruction only through the language model (Kosmos-2) or a global image/text pair
(CLIP). Here the CLIP instruction embedding queries each backbone's vision patch tokens with a small
multi-head cross-attention ("where is the red box?") and what it reads is added to that backbone's
pooled feature through a zero-initialised projection, so the model starts as the pooled one.
Shapes: B batch, T frames, N patch tokens, C token width (the fusion sees frames flattened, B*T).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    # LayerNorm first: backbone features differ in scale by orders of magnitude (random vs pretrained).
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


class GatedFusion(nn.Module):
    """A learnt per-feature gate between the Kosmos-2 and the CLIP features (starts at an even mix), plus state."""

    def __init__(self, kosmos_dim: int, clip_dim: int, state_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.kosmos = _projection(kosmos_dim, dim)
        self.clip = _projection(2 * clip_dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.state = nn.Linear(state_dim, dim)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(dim))

    def forward(self, kosmos, clip_image, clip_text, state):
        k = self.kosmos(kosmos)  # [N, D]
        c = self.clip(torch.cat([clip_image, clip_text], dim=-1))  # [N, D]
        g = torch.sigmoid(self.gate(torch.cat([k, c], dim=-1)))  # [N, D]
        return self.out(g * k + (1.0 - g) * c + self.state(state))


class ConcatFusion(nn.Module):
    """All features and the state concatenated through one MLP."""

    def __init__(self, kosmos_dim: int, clip_dim: int, state_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        in_dim = kosmos_dim + 2 * clip_dim + state_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(dim)
        )

    def forward(self, kosmos, clip_image, clip_text, state):
        return self.mlp(torch.cat([kosmos, clip_image, clip_text, state], dim=-1))


class FilmFusion(nn.Module):
    """The instruction's CLIP text feature scales and shifts the visual features (FiLM; identity at start)."""

    def __init__(self, kosmos_dim: int, clip_dim: int, state_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.visual = _projection(kosmos_dim + clip_dim, dim)
        self.film = _projection(clip_dim, 2 * dim)
        nn.init.zeros_(self.film[1].weight)  # identity modulation at start
        nn.init.zeros_(self.film[1].bias)
        self.state = nn.Linear(state_dim, dim)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(dim))

    def forward(self, kosmos, clip_image, clip_text, state):
        v = self.visual(torch.cat([kosmos, clip_image], dim=-1))  # [N, D]
        scale, shift = self.film(clip_text).chunk(2, dim=-1)  # [N, D] each
        return self.out((1.0 + scale) * v + shift + self.state(state))


class TextAttentionPooling(nn.Module):
    """The instruction embedding attends over one backbone's patch tokens -> a residual for its pooled
    feature. Written out (no nn.MultiheadAttention): the fused fast path of the latter has no ONNX export.
    """

    def __init__(self, query_dim: int, token_dim: int, out_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = _projection(query_dim, dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.key = nn.Linear(token_dim, dim)
        self.value = nn.Linear(token_dim, dim)
        self.out = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.out.weight)  # adds nothing at start: the model begins as the pooled one
        nn.init.zeros_(self.out.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # query [B*T, D_q] (the instruction), tokens [B*T, N, C] (patches) -> [B*T, out_dim]
        BT, N, _ = tokens.shape
        H = self.heads
        q = self.query(query).view(BT, H, 1, -1)  # [B*T, H, 1, A/H]
        tokens = self.token_norm(tokens)
        k = self.key(tokens).view(BT, N, H, -1).transpose(1, 2)  # [B*T, H, N, A/H]
        v = self.value(tokens).view(BT, N, H, -1).transpose(1, 2)  # [B*T, H, N, A/H]
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # [B*T, H, 1, N]
        read = (weights @ v).flatten(1)  # [B*T, A]
        return self.out(read)


class PatchAttention(nn.Module):
    """`fusion_pooling = "text_attention"`: one `TextAttentionPooling` per backbone (module docstring)."""

    def __init__(
        self, kosmos_dim: int, kosmos_token_dim: int, clip_dim: int, clip_token_dim: int, dim: int, heads: int
    ) -> None:
        super().__init__()
        self.kosmos = TextAttentionPooling(clip_dim, kosmos_token_dim, kosmos_dim, dim, heads)
        self.clip = TextAttentionPooling(clip_dim, clip_token_dim, clip_dim, dim, heads)

    def forward(self, kosmos, kosmos_patches, clip_image, clip_patches, clip_text):
        # kosmos [B*T, D_k], kosmos_patches [B*T, N, C_k], clip_image [B*T, D_c], clip_patches [B*T, N, C_c],
        # clip_text [B*T, D_c] -> kosmos [B*T, D_k], clip_image [B*T, D_c], each plus what the instruction read
        return kosmos + self.kosmos(clip_text, kosmos_patches), clip_image + self.clip(clip_text, clip_patches)


FUSION_MODULES = {"gated": GatedFusion, "concat": ConcatFusion, "film": FilmFusion}


def build_fusion(name: str, kosmos_dim: int, clip_dim: int, state_dim: int, dim: int, dropout: float) -> nn.Module:
    """The fusion module `name` ("gated", "concat", "film") for these feature widths -> [N, dim]."""
    return FUSION_MODULES[name](kosmos_dim, clip_dim, state_dim, dim, dropout)
