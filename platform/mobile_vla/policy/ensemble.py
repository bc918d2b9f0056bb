"""`EnsemblePolicy`: M trained policies behind the `MobileVLAPolicy` interface, confidence from disagreement.

    ensemble = EnsemblePolicy.from_members([policy_a, policy_b, policy_c])
    save_policy(folder, ensemble, preprocessing)          # config.json kind "ensemble"; load_policy rebuilds it
    actions, confidence, memory = ensemble.step(images, state, tokens, memory, clip_text)

Why: a single policy's confidence comes from its own predicted variance, which it learned only on the
frames it saw; far from them it can be confidently wrong. Members trained from different seeds or
configurations agree where the data pinned them down and disagree elsewhere, so their spread is the
honest signal a robot should slow down or ask for help on.

Combination, per robot, chunk step k and axis j, in normalised action units (each member m gives a mean
a_m and a log-variance; sigma_m^2 = exp(log_var_m)):

    action       a   = 1/M sum_m a_m
    variance     s^2 = 1/M sum_m sigma_m^2   +   1/M sum_m (a_m - a)^2
                       (the members' own)        (their disagreement)
    confidence   c   = mean over k < confidence_steps (all K by default), j of erf(tau / (s * sqrt(2)))

s^2 is the variance of the members' equally weighted Gaussian mixture (the deep-ensemble rule of
Lakshminarayanan et al., 2017), and c is the single policy's own definition (P(|error| < tau) under a
Gaussian, tau = confidence_tolerance) applied to it. So c equals a member's confidence when the members
agree exactly, and can only fall as they spread apart. `log_var` = log s^2.

The interface matches MobileVLAPolicy, so export, serving and evaluation take an ensemble unchanged:
- `clip_text` is the members' CLIP text features side by side: [B, sum_m D_m];
- the recurrent memory is the members' LSTM states side by side on the hidden axis:
  (h, c) each [layers, B, sum_m hidden_m] when the members share `lstm_layers`, otherwise each member's
  [layers_m, B, hidden_m] is flattened into one row: [1, B, sum_m layers_m * hidden_m];
- `config` (EnsembleConfig) answers the shape questions a PolicyConfig answers (chunk, state_dim,
  window, token_length, lstm_layers, lstm_hidden, confidence_tolerance) for that layout.
The exported ONNX graph therefore has the same inputs and outputs, only a wider state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mobile_vla.errors import ConfigError
from mobile_vla.policy.config import PolicyConfig
from mobile_vla.policy.model import MobileVLAPolicy, PolicyOutput, StepOutput, build_policy, chunk_confidence

Memory = tuple[torch.Tensor, torch.Tensor]
# members must agree on these
SHARED_FIELDS = ("chunk", "state_dim", "token_length", "confidence_tolerance", "confidence_span")
COMBINE_RULE = "gaussian-mixture-moments"


@dataclass(frozen=True)
class EnsembleConfig:
    """The members' PolicyConfigs (+ where each came from); validated so the members can be combined."""

    members: tuple[PolicyConfig, ...]
    sources: tuple[str, ...] = ()  # provenance per member, e.g. "sweep tiny-asha trial 3f2a_00001"
    preset: str = field(default="ensemble", init=False)

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if len(members) < 2 or not all(isinstance(m, PolicyConfig) for m in members):
            raise ConfigError(
                f"EnsembleConfig.members: expected a list of at least 2 PolicyConfigs, got {len(members)} member(s)"
            )
        object.__setattr__(self, "members", members)
        sources = tuple(str(s) for s in self.sources) or tuple(f"member {i}" for i in range(len(members)))
        if len(sources) != len(members):
            raise ConfigError(f"EnsembleConfig.sources: {len(sources)} entries for {len(members)} members")
        object.__setattr__(self, "sources", sources)
        first = members[0]
        for name in SHARED_FIELDS:
            for index, member in enumerate(members[1:], start=1):
                if getattr(member, name) != getattr(first, name):
                    raise ConfigError(
                        f"EnsembleConfig.members[{index}].{name} = {getattr(member, name)!r}: members must share "
                        f"{name} (members[0] has {getattr(first, name)!r})"
                    )
        fed = sorted({m.state_input for m in members} - {"none"})
        if len(fed) > 1:
            raise ConfigError(f"EnsembleConfig.members: state_input {fed}: the members would need different states")
        if len({(m.kosmos.pretrained, m.kosmos.latent_query_num) for m in members}) > 1:
            raise ConfigError(
                "EnsembleConfig.members: members must share one instruction tokenizer "
                "(kosmos.pretrained and kosmos.latent_query_num differ)"
            )

    # --- the shape questions a PolicyConfig answers ---------------------------------------------
    @property
    def chunk(self) -> int:
        return self.members[0].chunk

    @property
    def state_dim(self) -> int:
        return self.members[0].state_dim

    @property
    def state_input(self) -> str:
        """What the state is (PolicyConfig.state_input): the one the members that read it share, else "none"."""
        return next((m.state_input for m in self.members if m.state_input != "none"), "none")

    @property
    def window(self) -> int:
        """Training history of the first member (serving is recurrent: any window works)."""
        return self.members[0].window

    @property
    def token_length(self) -> int:
        return self.members[0].token_length

    @property
    def confidence_tolerance(self) -> float:
        return self.members[0].confidence_tolerance

    @property
    def confidence_span(self) -> int:
        """The chunk steps, from k = 0, that the confidence averages (PolicyConfig.confidence_steps)."""
        return self.members[0].confidence_span

    @property
    def shared_layers(self) -> bool:
        return len({m.lstm_layers for m in self.members}) == 1

    @property
    def lstm_layers(self) -> int:
        return self.members[0].lstm_layers if self.shared_layers else 1

    @property
    def lstm_hidden(self) -> int:
        if self.shared_layers:
            return sum(m.lstm_hidden for m in self.members)
        return sum(m.lstm_layers * m.lstm_hidden for m in self.members)

    # --- serialisation (config.json) ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "combine": COMBINE_RULE,
            "members": [m.to_dict() for m in self.members],
            "sources": list(self.sources),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "EnsembleConfig") -> EnsembleConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"preset", "combine", "members", "sources"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}")
        if data.get("combine", COMBINE_RULE) != COMBINE_RULE:
            raise ConfigError(f"{source}: combine = {data.get('combine')!r}: this code combines {COMBINE_RULE!r}")
        members = data.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise ConfigError(f"{source}: members: expected a list of at least 2 member configs, got {members!r:.60}")
        configs = []
        for index, member in enumerate(members):
            where = f"{source}: members[{index}]"
            try:
                configs.append(PolicyConfig.from_dict(member, source=where))
            except ConfigError as exc:
                message = str(exc)
                raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
        return cls(members=tuple(configs), sources=tuple(data.get("sources") or ()))


class _TextFeatures:
    """What export reads as `model.clip.feature_dim`: the width of the ensemble's clip_text."""

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim


class EnsemblePolicy(nn.Module):
    """M trained policies run side by side: one combined action chunk and a confidence that falls as they disagree."""

    kind = "ensemble"  # save_policy writes it to config.json; load_policy dispatches on it

    def __init__(self, config: EnsembleConfig, load_pretrained: bool = False) -> None:
        super().__init__()
        if not isinstance(config, EnsembleConfig):
            raise ConfigError(f"EnsemblePolicy: expected an EnsembleConfig, got {type(config).__name__}")
        self.config = config
        self.members = nn.ModuleList(build_policy(m, load_pretrained=load_pretrained) for m in config.members)
        self.text_widths = [member.clip.feature_dim for member in self.members]

    @classmethod
    def from_members(cls, members: list[MobileVLAPolicy], sources: list[str] | None = None) -> EnsemblePolicy:
        """An ensemble holding copies of these trained policies' weights."""
        ensemble = cls(EnsembleConfig(members=tuple(m.config for m in members), sources=tuple(sources or ())))
        for target, member in zip(ensemble.members, members, strict=True):
            target.load_state_dict(member.state_dict())
        return ensemble.eval()

    @property
    def clip(self) -> _TextFeatures:
        return _TextFeatures(sum(self.text_widths))

    # --- memory layout ----------------------------------------------------------------------------
    def initial_memory(self, batch_size: int) -> Memory:
        return self._join([member.initial_memory(batch_size) for member in self.members])

    def _split(self, memory: Memory) -> list[Memory]:
        """(h, c) [layers, B, total] -> per member (h_m, c_m) [layers_m, B, hidden_m]."""
        configs = self.config.members
        if self.config.shared_layers:
            sizes = [m.lstm_hidden for m in configs]
            parts = [torch.split(state, sizes, dim=-1) for state in memory]
            return [(h, c) for h, c in zip(*parts, strict=True)]
        sizes = [m.lstm_layers * m.lstm_hidden for m in configs]
        parts = [torch.split(state[0], sizes, dim=-1) for state in memory]  # [B, layers_m * hidden_m] each
        return [
            tuple(p.unflatten(-1, (m.lstm_layers, m.lstm_hidden)).permute(1, 0, 2).contiguous() for p in pair)
            for pair, m in zip(zip(*parts, strict=True), configs, strict=True)
        ]

    def _join(self, memories: list[Memory]) -> Memory:
        if self.config.shared_layers:
            return tuple(torch.cat([m[i] for m in memories], dim=-1) for i in range(2))
        # [layers_m, B, hidden_m] -> [B, layers_m * hidden_m] -> joined [1, B, total]
        return tuple(
            torch.cat([m[i].permute(1, 0, 2).flatten(1) for m in memories], dim=-1).unsqueeze(0) for i in range(2)
        )

    # --- combination ------------------------------------------------------------------------------
    def _combine(self, actions: list[torch.Tensor], log_vars: list[torch.Tensor]):
        # per member [..., K, 3] -> actions [..., K, 3], log_var [..., K, 3], confidence [...]
        stacked = torch.stack(actions)  # [M, ..., K, 3]
        mean = stacked.mean(dim=0)
        own = torch.exp(torch.stack(log_vars)).mean(dim=0)  # the members' own variance
        disagreement = ((stacked - mean) ** 2).mean(dim=0)
        variance = own + disagreement
        config = self.config
        confidence = chunk_confidence(torch.sqrt(variance), config.confidence_tolerance, config.confidence_span)
        return mean, torch.log(variance), confidence

    # --- public API (= MobileVLAPolicy) -------------------------------------------------------------
    def encode_instruction(self, clip_input_ids: torch.Tensor) -> torch.Tensor:
        # [B, 77] -> [B, sum_m D_m]
        return torch.cat([member.encode_instruction(clip_input_ids) for member in self.members], dim=-1)

    def forward(self, batch: dict, memory: Memory | None = None) -> PolicyOutput:
        memories = self._split(memory) if memory is not None else [None] * len(self.members)
        outputs = [member(batch, mem) for member, mem in zip(self.members, memories, strict=True)]
        actions, log_var, confidence = self._combine([o.actions for o in outputs], [o.log_var for o in outputs])
        return PolicyOutput(actions, log_var, confidence, self._join([o.memory for o in outputs]))

    def step(
        self,
        images: torch.Tensor,
        state: torch.Tensor,
        tokens: dict,
        memory: Memory | None = None,
        clip_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Memory]:
        """One frame per robot: images [B, H, W, C], state [B, S] -> actions [B, K, 3], confidence [B]."""
        actions, _, confidence, memory = self.step_distribution(images, state, tokens, memory, clip_text)
        return actions, confidence, memory

    def step_distribution(self, images, state, tokens, memory=None, clip_text=None):
        """`step` plus the combined log-variance [B, K, 3] (evaluation and benchmarks read it)."""
        mean, log_var, confidence, memory, _ = self._step_members(images, state, tokens, memory, clip_text)
        return mean, log_var, confidence, memory

    def step_with_safety(self, images, state, tokens, memory=None, clip_text=None) -> StepOutput:
        """= MobileVLAPolicy.step_with_safety; the vision feature is the members' side by side [B, sum F_m]."""
        mean, log_var, confidence, memory, vision = self._step_members(images, state, tokens, memory, clip_text)
        confidence_now = chunk_confidence(torch.exp(0.5 * log_var), self.config.confidence_tolerance, 1)  # [B]
        return StepOutput(mean, confidence, memory, confidence_now, vision)

    @property
    def vision_feature_dim(self) -> int:
        return sum(member.vision_feature_dim for member in self.members)

    def _step_members(self, images, state, tokens, memory=None, clip_text=None):
        tokens = {key: torch.as_tensor(value) for key, value in tokens.items()}
        images, state = torch.as_tensor(images), torch.as_tensor(state)
        if clip_text is None:
            clip_text = self.encode_instruction(tokens["clip_input_ids"])
        memories = self._split(memory) if memory is not None else [None] * len(self.members)
        texts = torch.split(clip_text, self.text_widths, dim=-1)
        actions, log_vars, new_memories, visions = [], [], [], []
        for member, text, mem in zip(self.members, texts, memories, strict=True):
            mem = member.initial_memory(images.shape[0]) if mem is None else mem
            # the member's own step, keeping its log-variance (its public step returns only confidence)
            features, vision = member._frame_features_and_vision(images, state, tokens, text)  # [B, D], [B, F_m]
            visions.append(vision)
            out, mem = member._recurrent_step(features, mem)
            member_actions, member_log_var, _ = member._heads(out)
            actions.append(member_actions)
            log_vars.append(member_log_var)
            new_memories.append(mem)
        mean, log_var, confidence = self._combine(actions, log_vars)
        return mean, log_var, confidence, self._join(new_memories), torch.cat(visions, dim=-1)

    def parameter_counts(self) -> dict[str, int]:
        counts = {f"member_{i}": sum(p.numel() for p in m.parameters()) for i, m in enumerate(self.members)}
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def build_model(config, load_pretrained: bool = False):
    """A PolicyConfig builds a MobileVLAPolicy, an EnsembleConfig an EnsemblePolicy (checkpoint loading)."""
    if isinstance(config, EnsembleConfig):
        return EnsemblePolicy(config, load_pretrained=load_pretrained)
    return build_policy(config, load_pretrained=load_pretrained)
