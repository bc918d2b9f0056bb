"""`PolicyConfig`: every number that shapes the hybrid policy, frozen and validated on construction.

    from mobile_vla.policy import presets, build_policy
    model = build_policy(presets.tiny())

The config is saved (as JSON) with every checkpoint, so a checkpoint rebuilds its exact model without
training code. It holds no seed: seeding is the caller's job (train loop, tests, benchmark).
Validation errors raise `ConfigError` naming the field and the value, e.g.
    PolicyConfig.fusion = 'sum': expected one of 'gated', 'concat', 'film'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mobile_vla.errors import ConfigError

ACTION_DIM = 3  # linear_x, linear_y, angular_z
ACTION_NAMES = ("linear_x", "linear_y", "angular_z")
IMAGE_SIZE = 224
CLIP_CONTEXT_LENGTH = 77
FUSIONS = ("gated", "concat", "film")
FUSION_POOLINGS = ("pooled", "text_attention")
AUX_LABELS = ("target_bearing", "target_distance", "target_in_view")  # per-frame episode keys the aux heads learn
# What the state input [B, S] is (saved with the model and in its preprocessing, so training windows,
# closed loop and robots feed the same thing): the command executed at the previous step; the velocity
# the base realised at the previous step (0 translation after a refused move, so a stuck robot can
# tell); or nothing (zeroed inside the model).
PREVIOUS_COMMAND, MEASURED_VELOCITY = "previous_command", "measured_velocity"
STATE_INPUTS = (PREVIOUS_COMMAND, MEASURED_VELOCITY, "none")


def _fail(owner: str, name: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{owner}.{name} = {value!r}: {expected}")


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(owner, name, value, "expected a positive integer")


def _divisible(owner: str, width_name: str, width: int, heads_name: str, heads: int) -> None:
    if width % heads:
        _fail(owner, width_name, width, f"must be divisible by {heads_name} = {heads}")


@dataclass(frozen=True)
class KosmosConfig:
    """Kosmos-2 backbone. `pretrained` = hub id or local folder; None builds these sizes with random init."""

    pretrained: str | None = None
    vision_layers: int = 24
    vision_width: int = 1024
    vision_heads: int = 16
    vision_mlp: int = 4096
    patch_size: int = 14
    text_layers: int = 24
    text_width: int = 2048
    text_heads: int = 32
    text_ffn: int = 8192
    text_vocab_size: int = 65037
    latent_query_num: int = 64
    max_instruction_tokens: int = 32  # instruction tokens after <image>...</image>; sets the fixed L
    dropout: float = 0.1
    lora_rank: int = 0  # 0 = no LoRA; > 0 applies LoRA (peft) to the language model's attention
    lora_alpha: int = 16

    def __post_init__(self) -> None:
        owner = "PolicyConfig.kosmos"
        _positive(
            owner,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_heads=self.vision_heads,
            vision_mlp=self.vision_mlp,
            patch_size=self.patch_size,
            text_layers=self.text_layers,
            text_width=self.text_width,
            text_heads=self.text_heads,
            text_ffn=self.text_ffn,
            text_vocab_size=self.text_vocab_size,
            latent_query_num=self.latent_query_num,
            max_instruction_tokens=self.max_instruction_tokens,
            lora_alpha=self.lora_alpha,
        )
        _divisible(owner, "vision_width", self.vision_width, "vision_heads", self.vision_heads)
        _divisible(owner, "text_width", self.text_width, "text_heads", self.text_heads)
        if IMAGE_SIZE % self.patch_size:
            _fail(owner, "patch_size", self.patch_size, f"must divide the image size {IMAGE_SIZE}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(owner, "dropout", self.dropout, "expected 0 <= dropout < 1")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            _fail(owner, "lora_rank", self.lora_rank, "expected an integer >= 0 (0 = no LoRA)")
        if self.pretrained is not None and not (isinstance(self.pretrained, str) and self.pretrained):
            _fail(owner, "pretrained", self.pretrained, "expected a hub id, a local folder or null")

    @property
    def token_length(self) -> int:
        """L: <s> <image> N image slots </image> + instruction tokens (fixed, so batches stack)."""
        return 3 + self.latent_query_num + self.max_instruction_tokens


@dataclass(frozen=True)
class ClipConfig:
    """open_clip CLIP backbone. `pretrained` = open_clip tag ("openai") or a local weights file."""

    model_name: str = "ViT-B-32"  # open_clip architecture name used with pretrained weights
    pretrained: str | None = None
    embed_dim: int = 512
    vision_layers: int = 12
    vision_width: int = 768
    vision_head_width: int = 64
    patch_size: int = 32
    text_layers: int = 12
    text_width: int = 512
    text_heads: int = 8

    def __post_init__(self) -> None:
        owner = "PolicyConfig.clip"
        _positive(
            owner,
            embed_dim=self.embed_dim,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_head_width=self.vision_head_width,
            patch_size=self.patch_size,
            text_layers=self.text_layers,
            text_width=self.text_width,
            text_heads=self.text_heads,
        )
        _divisible(owner, "vision_width", self.vision_width, "vision_head_width", self.vision_head_width)
        _divisible(owner, "text_width", self.text_width, "text_heads", self.text_heads)
        if IMAGE_SIZE % self.patch_size:
            _fail(owner, "patch_size", self.patch_size, f"must divide the image size {IMAGE_SIZE}")
        if self.pretrained is not None and not (isinstance(self.pretrained, str) and self.pretrained):
            _fail(owner, "pretrained", self.pretrained, "expected an open_clip tag, a local file or null")


@dataclass(frozen=True)
class PolicyConfig:
    """The whole policy: backbones, fusion, LSTM head, window W, chunk K, state size S."""

    preset: str = "custom"
    window: int = 8  # W: frames per training sample (the LSTM sees them in order)
    chunk: int = 10  # K: actions predicted per frame
    state_dim: int = 3  # S
    kosmos: KosmosConfig = field(default_factory=KosmosConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    fusion: str = "gated"
    fusion_dim: int = 512  # D of the fused per-frame feature
    lstm_hidden: int = 512
    lstm_layers: int = 2
    head_hidden: int = 512
    dropout: float = 0.1
    freeze_kosmos: bool = False
    freeze_clip: bool = False
    gradient_checkpointing: bool = False
    log_var_min: float = -7.0  # clamp range of the predicted log-variance (normalised action units)
    log_var_max: float = 2.0
    confidence_tolerance: float = 0.1  # tau in the confidence definition (normalised units, range [-1, 1])
    # what the state input [B, S] is (STATE_INPUTS): "previous_command" and "measured_velocity" feed it to
    # the fusion (they differ in what training windows, closed loop and robots put there); "none" zeroes
    # it inside the model (the input stays in the I/O contract, so serving and export are unchanged)
    state_input: str = PREVIOUS_COMMAND
    state_dropout: float = 0.0  # training only: P(a whole window's state is zeroed), per sample
    confidence_steps: int | None = None  # chunk steps the confidence averages (from k = 0); None = all K
    image_size: int = IMAGE_SIZE  # the model's internal resolution: 224 / image_size-fold average pooling
    # what each backbone hands the fusion: "pooled" = its own pooled feature; "text_attention" adds what
    # the CLIP instruction embedding reads from that backbone's patch tokens (multi-head cross-attention)
    fusion_pooling: str = "pooled"
    attention_heads: int = 4  # heads of the text_attention pooling (fusion_dim must divide by them)
    # training-only heads on the fused per-frame feature predicting the privileged simulator labels
    # (target bearing as sin/cos, distance, in view); never in the exported graph or the serving outputs
    aux_heads: bool = False

    def __post_init__(self) -> None:
        owner = "PolicyConfig"
        if not isinstance(self.kosmos, KosmosConfig):
            _fail(owner, "kosmos", self.kosmos, "expected a KosmosConfig")
        if not isinstance(self.clip, ClipConfig):
            _fail(owner, "clip", self.clip, "expected a ClipConfig")
        _positive(
            owner,
            window=self.window,
            chunk=self.chunk,
            state_dim=self.state_dim,
            fusion_dim=self.fusion_dim,
            lstm_hidden=self.lstm_hidden,
            lstm_layers=self.lstm_layers,
            head_hidden=self.head_hidden,
        )
        if self.fusion not in FUSIONS:
            _fail(owner, "fusion", self.fusion, f"expected one of {', '.join(map(repr, FUSIONS))}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(owner, "dropout", self.dropout, "expected 0 <= dropout < 1")
        if not self.log_var_min < self.log_var_max:
            _fail(owner, "log_var_min", self.log_var_min, f"must be below log_var_max = {self.log_var_max}")
        if not 0.0 < self.confidence_tolerance <= 2.0:
            _fail(owner, "confidence_tolerance", self.confidence_tolerance, "expected 0 < tau <= 2")
        if self.state_input not in STATE_INPUTS:
            _fail(owner, "state_input", self.state_input, f"expected one of {', '.join(map(repr, STATE_INPUTS))}")
        if not isinstance(self.state_dropout, (int, float)) or not 0.0 <= self.state_dropout < 1.0:
            _fail(owner, "state_dropout", self.state_dropout, "expected 0 <= state_dropout < 1")
        if self.confidence_steps is not None:
            _positive(owner, confidence_steps=self.confidence_steps)
            if self.confidence_steps > self.chunk:
                _fail(owner, "confidence_steps", self.confidence_steps, f"must be at most chunk = {self.chunk}")
        self._check_image_size(owner)
        self._check_fusion_options(owner)
        if self.kosmos.lora_rank and self.freeze_kosmos is False:
            # LoRA only makes sense on a frozen language model: say so instead of silently mixing both.
            _fail(owner, "kosmos.lora_rank", self.kosmos.lora_rank, "LoRA needs freeze_kosmos = true")

    def _check_image_size(self, owner: str) -> None:
        _positive(owner, image_size=self.image_size)
        if self.image_size > IMAGE_SIZE or IMAGE_SIZE % self.image_size:
            _fail(owner, "image_size", self.image_size, f"must divide the input frame size {IMAGE_SIZE}")
        for name, sub in (("kosmos", self.kosmos), ("clip", self.clip)):
            if self.image_size % sub.patch_size:
                _fail(owner, f"{name}.patch_size", sub.patch_size, f"must divide image_size = {self.image_size}")
            if sub.pretrained and self.image_size != IMAGE_SIZE:
                # pretrained position embeddings are sized for the 224 px grid
                _fail(owner, "image_size", self.image_size, f"pretrained {name} weights need {IMAGE_SIZE}")

    def _check_fusion_options(self, owner: str) -> None:
        if self.fusion_pooling not in FUSION_POOLINGS:
            expected = ", ".join(map(repr, FUSION_POOLINGS))
            _fail(owner, "fusion_pooling", self.fusion_pooling, f"expected one of {expected}")
        _positive(owner, attention_heads=self.attention_heads)
        if self.fusion_pooling == "text_attention":
            _divisible(owner, "fusion_dim", self.fusion_dim, "attention_heads", self.attention_heads)
        if not isinstance(self.aux_heads, bool):
            _fail(owner, "aux_heads", self.aux_heads, "expected true or false")

    @property
    def token_length(self) -> int:
        return self.kosmos.token_length

    @property
    def pooling_factor(self) -> int:
        """How many input pixels per side the model averages into one (1 at the full 224 px)."""
        return IMAGE_SIZE // self.image_size

    @property
    def confidence_span(self) -> int:
        """The chunk steps, from k = 0, that the confidence averages."""
        return self.confidence_steps or self.chunk

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "PolicyConfig") -> PolicyConfig:
        """Rebuilds a config from `to_dict()` output (e.g. a checkpoint's config.json), strictly."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        parts: dict[str, Any] = {}
        for name, sub_cls in (("kosmos", KosmosConfig), ("clip", ClipConfig)):
            sub = data.pop(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: {name} = {sub!r}: expected an object")
            _reject_unknown(sub_cls, sub, f"{source}: {name}")
            parts[name] = sub_cls(**sub)
        _reject_unknown(cls, data, source)
        return cls(**data, **parts)

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with top-level fields changed, e.g. `tiny().replace(fusion="film")`."""
        return dataclasses.replace(self, **changes)


def _reject_unknown(cls: type, data: dict, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}")
