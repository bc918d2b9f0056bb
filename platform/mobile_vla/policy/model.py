"""`MobileVLAPolicy`: Kosmos-2 + CLIP features -> fusion -> LSTM over frames -> action chunk + confidence.

    model = build_policy(presets.tiny())
    out = model(batch)                                   # training: [B, T] windows
    actions, confidence, memory = model.step(images, state, tokens, memory, clip_text)   # serving

Shapes: B batch, T frames (window W), K chunk, S state, L tokens, H/W image (224), C channels,
D feature width. Per frame: both backbones see the frame; Kosmos-2 also reads the instruction
tokens (its feature is multimodal); CLIP's text feature depends only on the instruction, so it is
computed once per instruction (`encode_instruction`) and broadcast over frames.

Outputs, in the normalised action range [-1, 1] (the preprocessing scales actions per axis):
- `actions` [B, T, K, 3] = tanh(mean head), the next K commands from each frame;
- `log_var` [B, T, K, 3]: the predicted log-variance of a Gaussian around each action, learned with
  a Gaussian NLL (losses.py), soft-clamped to [log_var_min, log_var_max];
- `confidence` [B, T] in [0, 1]: the mean over the first `confidence_steps` chunk steps (all K by
  default; 1 = the step executed now) and the 3 axes of
  P(|a - mean| < tau) = erf(tau / (sigma * sqrt(2))) under that Gaussian, with sigma = exp(log_var / 2)
  and tau = `confidence_tolerance` (0.1 = 5% of the normalised range). 1 means the model expects the
  true command within tau on every axis and step; low values flag out-of-distribution frames.

Inputs the config reshapes inside the model (the I/O contract never changes):
- frames always arrive as uint8 224x224; with `image_size` < 224 the normalised pixels are average-pooled
  by 224 / image_size (one ONNX AveragePool) before both backbones, whose patch grids follow image_size;
- state [.., S]: `state_input = "none"` multiplies it by 0 (the input stays in the exported graph);
  `state_dropout` p zeroes a whole window's state with probability p per sample, in training mode only,
  so the policy cannot lean on copying its previous command.

Options that add modules (both off by default):
- `fusion_pooling = "text_attention"`: the CLIP instruction embedding queries each backbone's patch tokens
  [B*T, N, C] before the fusion (fusion.PatchAttention); in `forward` and `step` alike, so it is exported;
- `aux_heads`: a small MLP on the fused per-frame feature [B, T, D] predicts the privileged simulator
  labels (`aux` of the output: target bearing as (sin, cos), distance in m, in-view logit), trained by
  `losses.policy_loss(aux_weight=...)`. Training only: `step` (serving, ONNX) never computes them.

`forward` and `step` share one per-frame function and one recurrent step, so `step` over T frames
equals `forward` over the window. `frame_mask` 0 frames (padding) leave the memory unchanged.
`step` has no Python branches on tensor values and takes the LSTM state as explicit tensors, so
`torch.onnx.export` traces it (the export wrapper passes `clip_text` as an input).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobile_vla.errors import ConfigError
from mobile_vla.policy.config import ACTION_DIM, PolicyConfig
from mobile_vla.policy.encoders import (
    ClipEncoder,
    KosmosEncoder,
    apply_lora,
    enable_gradient_checkpointing,
    freeze,
)
from mobile_vla.policy.fusion import PatchAttention, build_fusion
from mobile_vla.policy.preprocessing import CLIP_MEAN, CLIP_STD
from mobile_vla.policy.text import TOKEN_KEYS

Memory = tuple[torch.Tensor, torch.Tensor]
AUX_OUTPUTS = 4  # bearing sin, bearing cos, distance, in-view logit


class AuxPrediction(NamedTuple):
    """The auxiliary heads' predictions per frame (config.aux_heads), compared with the simulator's labels."""

    bearing: torch.Tensor  # [B, T, 2]: (sin, cos) of the target's bearing in the body frame
    distance: torch.Tensor  # [B, T] m
    in_view_logit: torch.Tensor  # [B, T]: sigmoid -> P(target in view)


class PolicyOutput(NamedTuple):
    """What the policy returns for a batch of windows (shapes below; actions in the normalised range)."""

    actions: torch.Tensor  # [B, T, K, 3] normalised
    log_var: torch.Tensor  # [B, T, K, 3]
    confidence: torch.Tensor  # [B, T]
    memory: Memory  # (h, c), each [layers, B, hidden]
    aux: AuxPrediction | None = None  # with config.aux_heads only


class StepOutput(NamedTuple):
    """One serving step (`step_with_safety`): shapes below; actions in the normalised range."""

    actions: torch.Tensor  # [B, K, 3] normalised
    confidence: torch.Tensor  # [B]: over the first confidence_span chunk steps
    memory: Memory  # (h, c), each [layers, B, hidden]
    confidence_now: torch.Tensor  # [B]: the executed step's (k=0) confidence
    vision_features: torch.Tensor  # [B, F]: the frame's pooled vision feature (novelty)


class MobileVLAPolicy(nn.Module):
    """The hybrid policy (see the module docstring): backbones, fusion, LSTM and the action/variance head."""

    def __init__(self, config: PolicyConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.kosmos = KosmosEncoder(config.kosmos, load_pretrained, config.image_size)
        text_attention = config.fusion_pooling == "text_attention"
        self.clip = ClipEncoder(config.clip, load_pretrained, config.image_size, patch_tokens=text_attention)
        if config.freeze_kosmos:
            freeze(self.kosmos)
        if config.freeze_clip:
            freeze(self.clip)
        if config.kosmos.lora_rank:
            apply_lora(self.kosmos, config.kosmos)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.kosmos, self.clip)
        self.patch_attention = None
        if text_attention:
            self.patch_attention = PatchAttention(
                self.kosmos.feature_dim,
                self.kosmos.patch_dim,
                self.clip.feature_dim,
                self.clip.patch_dim,
                config.fusion_dim,
                config.attention_heads,
            )
        self.fusion = build_fusion(
            config.fusion,
            self.kosmos.feature_dim,
            self.clip.feature_dim,
            config.state_dim,
            config.fusion_dim,
            config.dropout,
        )
        self.lstm = nn.LSTM(
            config.fusion_dim,
            config.lstm_hidden,
            num_layers=config.lstm_layers,
            batch_first=True,
            dropout=config.dropout if config.lstm_layers > 1 else 0.0,
        )
        out_dim = config.chunk * ACTION_DIM
        self.head = nn.Sequential(
            nn.Linear(config.lstm_hidden, config.head_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden, 2 * out_dim),  # mean and log-variance, K x 3 each
        )
        nn.init.normal_(self.head[-1].weight, std=1e-3)  # start near action 0 and mid log-variance
        nn.init.zeros_(self.head[-1].bias)
        self.aux_head = None
        if config.aux_heads:
            self.aux_head = nn.Sequential(
                nn.Linear(config.fusion_dim, config.fusion_dim), nn.GELU(), nn.Linear(config.fusion_dim, AUX_OUTPUTS)
            )
        # (x / 255 - mean) / std as one affine map on the channel-last axis: x * scale + shift, with the
        # preprocessing's CLIP constants (the same ones its letterbox bars are filled with)
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)  # [C]
        self.register_buffer("pixel_shift", -mean / std, persistent=False)  # [C]

    # ---- building blocks shared by forward and step -------------------------------------------
    def train(self, mode: bool = True) -> MobileVLAPolicy:
        """Frozen backbones stay in eval mode (no dropout noise in features nobody trains)."""
        super().train(mode)
        if self.config.freeze_kosmos and not self.config.kosmos.lora_rank:
            self.kosmos.eval()
        if self.config.freeze_clip:
            self.clip.eval()
        return self

    def initial_memory(self, batch_size: int) -> Memory:
        shape = (self.config.lstm_layers, batch_size, self.config.lstm_hidden)
        h = torch.zeros(shape, device=self.pixel_scale.device, dtype=self.pixel_scale.dtype)
        return h, torch.zeros_like(h)

    def encode_instruction(self, clip_input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(clip_input_ids)  # [B, 77] -> [B, D_c]

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 [N, H, W, C] -> normalised float [N, C, H, W]; the affine map runs on the contiguous
        # channel-last layout (3x faster than broadcasting over [N, C, H, W] on CPU)
        pixels = images.to(self.pixel_scale.dtype) * self.pixel_scale + self.pixel_shift
        pixels = pixels.permute(0, 3, 1, 2)  # [N, C, 224, 224]
        factor = self.config.pooling_factor
        if factor > 1:  # the internal resolution: [N, C, image_size, image_size]
            pixels = F.avg_pool2d(pixels, kernel_size=factor)
        return pixels

    def _state_input(self, state: torch.Tensor) -> torch.Tensor:
        # state [..., S] -> what the fusion sees: zeros when the config ignores the state. A product
        # (not zeros_like) keeps the state input in the exported graph.
        if self.config.state_input == "none":
            return state * 0.0
        return state

    def _drop_window_state(self, state: torch.Tensor) -> torch.Tensor:
        # state [B, T, S]: in training, each sample's whole window of state is zeroed with p = state_dropout
        p = self.config.state_dropout
        if not self.training or p <= 0.0:
            return state
        keep = (torch.rand(state.shape[0], 1, 1, device=state.device) >= p).to(state.dtype)  # [B, 1, 1]
        return state * keep

    def _frame_features(self, images, state, tokens, clip_text) -> torch.Tensor:
        # images [N, H, W, C] uint8, state [N, S], tokens 3 x [N, L], clip_text [N, D_c] -> [N, D]
        return self._frame_features_and_vision(images, state, tokens, clip_text)[0]

    def _frame_features_and_vision(self, images, state, tokens, clip_text) -> tuple[torch.Tensor, torch.Tensor]:
        # -> fused [N, D], and the frame's vision feature [N, F]: the pooled CLIP image feature [N, D_c] and the
        # pixel layout [N, 51] (instruction-free: what novelty measures; `vision_feature_dim`)
        pixels = self._pixels(images)
        token_inputs = (
            tokens["kosmos_input_ids"],
            tokens["kosmos_attention_mask"],
            tokens["kosmos_image_embeds_position_mask"],
        )
        if self.patch_attention is None:
            kosmos = self.kosmos(pixels, *token_inputs)  # [N, D_k]
            clip_image = vision = self.clip.encode_image(pixels)  # [N, D_c]
        else:
            kosmos, kosmos_patches = self.kosmos(pixels, *token_inputs, with_patches=True)  # [N, D_k], [N, P, C_k]
            vision, clip_patches = self.clip.encode_image(pixels, with_patches=True)  # [N, D_c], [N, P, C_c]
            kosmos, clip_image = self.patch_attention(kosmos, kosmos_patches, vision, clip_patches, clip_text)
        fused = self.fusion(kosmos, clip_image, clip_text, self._state_input(state.to(pixels.dtype)))  # [N, D]
        return fused, torch.cat([vision, pixel_layout(pixels)], dim=-1)  # [N, D], [N, D_c + 51]

    def _recurrent_step(self, features: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, Memory]:
        # features [B, D] -> hidden output [B, hidden]. Under autocast the LSTM runs in fp32 with autocast
        # off: autocast would run the cuDNN LSTM in fp16 even under a bf16 autocast (no loss scaling, so
        # small gradients underflow) and hand h/c back in low precision to the next step. Without
        # autocast (fp32 training, ONNX export) nothing changes: no casts, no context in the graph.
        if not torch.is_autocast_enabled(features.device.type):
            out, (h, c) = self.lstm(features.unsqueeze(1), memory)
            return out.squeeze(1), (h, c)
        h, c = memory
        with torch.autocast(device_type=features.device.type, enabled=False):
            out, (h, c) = self.lstm(features.float().unsqueeze(1), (h.float(), c.float()))
        return out.squeeze(1), (h, c)

    def _heads(self, hidden: torch.Tensor):
        # hidden [..., hidden] -> actions [..., K, 3], log_var [..., K, 3], confidence [...]
        config = self.config
        raw = self.head(hidden).unflatten(-1, (2, config.chunk, ACTION_DIM))  # [..., 2, K, 3]
        actions = torch.tanh(raw[..., 0, :, :])
        span = config.log_var_max - config.log_var_min
        log_var = config.log_var_min + span * torch.sigmoid(raw[..., 1, :, :])
        sigma = torch.exp(0.5 * log_var)
        return actions, log_var, chunk_confidence(sigma, config.confidence_tolerance, config.confidence_span)

    # ---- public API ---------------------------------------------------------------------------
    def forward(self, batch: dict, memory: Memory | None = None) -> PolicyOutput:
        images = _tensor(batch["images"])  # [B, T, H, W, C] uint8
        B, T = images.shape[:2]
        state = self._drop_window_state(_tensor(batch["state"]))  # [B, T, S]
        clip_text = self.encode_instruction(_tensor(batch["clip_input_ids"]))  # [B, D_c]
        frames = {key: _tensor(batch[key]).repeat_interleave(T, dim=0) for key in TOKEN_KEYS[1:]}  # [B*T, L]
        features = self._frame_features(
            images.flatten(0, 1),
            state.flatten(0, 1),
            frames,
            clip_text.repeat_interleave(T, dim=0),
        ).unflatten(0, (B, T))  # [B, T, D]
        frame_mask = batch.get("frame_mask")
        if frame_mask is not None:
            frame_mask = _tensor(frame_mask).to(features.dtype)  # [B, T]
        memory = self.initial_memory(B) if memory is None else memory
        outputs = []
        for t in range(T):
            out, new_memory = self._recurrent_step(features[:, t], memory)  # [B, hidden]
            if frame_mask is not None:
                keep = frame_mask[:, t].view(1, B, 1)  # padding frames leave the memory unchanged
                new_memory = tuple(keep * new + (1.0 - keep) * old for new, old in zip(new_memory, memory, strict=True))
            memory = new_memory
            outputs.append(out)
        actions, log_var, confidence = self._heads(torch.stack(outputs, dim=1))  # [B, T, ...]
        return PolicyOutput(actions, log_var, confidence, memory, self._aux(features))

    def _aux(self, features: torch.Tensor) -> AuxPrediction | None:
        # fused features [B, T, D] -> the auxiliary predictions, or None without aux heads
        if self.aux_head is None:
            return None
        raw = self.aux_head(features)  # [B, T, 4]
        return AuxPrediction(bearing=raw[..., :2], distance=raw[..., 2], in_view_logit=raw[..., 3])

    def step(
        self,
        images: torch.Tensor,
        state: torch.Tensor,
        tokens: dict,
        memory: Memory | None = None,
        clip_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Memory]:
        """One frame per robot: images [B, H, W, C] uint8, state [B, S] -> actions [B, K, 3], confidence [B]."""
        out = self.step_with_safety(images, state, tokens, memory, clip_text)
        return out.actions, out.confidence, out.memory

    def step_with_safety(
        self,
        images: torch.Tensor,
        state: torch.Tensor,
        tokens: dict,
        memory: Memory | None = None,
        clip_text: torch.Tensor | None = None,
    ) -> StepOutput:
        """`step` plus what the serving safety ladder reads: the executed step's (k=0) confidence [B]
        and the frame's pooled vision feature [B, F] (its novelty is scored against training statistics).
        """
        tokens = {key: _tensor(value) for key, value in tokens.items()}
        if clip_text is None:
            clip_text = self.encode_instruction(tokens["clip_input_ids"])
        images = _tensor(images)
        memory = self.initial_memory(images.shape[0]) if memory is None else memory
        features, vision = self._frame_features_and_vision(images, _tensor(state), tokens, clip_text)  # [B, D], [B, F]
        out, memory = self._recurrent_step(features, memory)
        actions, log_var, confidence = self._heads(out)
        confidence_now = chunk_confidence(torch.exp(0.5 * log_var), self.config.confidence_tolerance, 1)  # [B]
        return StepOutput(actions, confidence, memory, confidence_now, vision)

    @property
    def vision_feature_dim(self) -> int:
        """F: the width of `step_with_safety`'s vision feature (pooled CLIP image feature + pixel layout)."""
        return self.clip.feature_dim + PIXEL_LAYOUT_DIM

    def parameter_counts(self) -> dict[str, int]:
        parts = {"kosmos": self.kosmos, "clip": self.clip, "fusion": self.fusion, "lstm": self.lstm, "head": self.head}
        optional = {"patch_attention": self.patch_attention, "aux_head": self.aux_head}
        parts.update({name: part for name, part in optional.items() if part is not None})
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


LAYOUT_GRID = 4
PIXEL_LAYOUT_DIM = 3 * LAYOUT_GRID * LAYOUT_GRID + 3


def pixel_layout(pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels [N, C, H, W] -> [N, 51]: the mean colour of a 4 x 4 grid of cells [N, 48] and
    each channel's standard deviation over the frame [N, 3].

    Why beside the backbone feature for novelty: a covered, blank or washed-out frame differs from the
    training frames first in these low-level statistics, which a backbone's pooled feature (random or
    frozen, and normalised) may hardly move with; together the distance sees both kinds of shift.
    """
    cell = pixels.shape[-1] // LAYOUT_GRID
    grid = F.avg_pool2d(pixels, kernel_size=cell, stride=cell)[..., :LAYOUT_GRID, :LAYOUT_GRID]  # [N, C, 4, 4]
    mean = pixels.mean(dim=(-2, -1))  # [N, C]
    spread = torch.sqrt(torch.clamp((pixels * pixels).mean(dim=(-2, -1)) - mean * mean, min=0.0) + 1e-6)  # [N, C]
    return torch.cat([grid.flatten(1), spread], dim=-1)


def chunk_confidence(sigma: torch.Tensor, tolerance: float, steps: int) -> torch.Tensor:
    """The confidence rule: sigma [..., K, 3] -> mean over the first `steps` chunk steps and the 3 axes of
    P(|error| < tolerance) = erf(tolerance / (sigma * sqrt(2))) under the predicted Gaussian -> [...].
    """
    within = torch.erf(tolerance / (sigma[..., :steps, :] * math.sqrt(2.0)))  # [..., steps, 3]
    return within.mean(dim=(-2, -1))


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def build_policy(config: PolicyConfig, load_pretrained: bool = True) -> MobileVLAPolicy:
    """The model for `config`. `load_pretrained=False` skips hub/local weights (checkpoint loading,
    `model info`): same modules, random init.
    """
    if not isinstance(config, PolicyConfig):
        raise ConfigError(f"build_policy: expected a PolicyConfig, got {type(config).__name__}")
    return MobileVLAPolicy(config, load_pretrained=load_pretrained)
