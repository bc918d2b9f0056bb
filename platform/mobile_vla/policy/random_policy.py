"""An untrained policy saved as a model folder: random weights and stand-in scaling, for benchmarks,
smoke runs and tests that need a real model folder but no trained model.

    model = save_random_policy("small", folder)                   # folder/policy/, seed 0
    save_random_policy("tiny", folder, seed=1, head_std=0.2)      # outputs that vary (parity means something)

An untrained model has no dataset behind it, so no manifest statistics to build its preprocessing
from (`Preprocessing.from_manifest`): `UNTRAINED_SCALING` stands in for them, numbers written out
once here. They are plausible for the generated data (linear_x forward-biased within 0.6 m/s,
linear_y within 0.3 m/s, angular_z within 1 rad/s; state centred) and fixed: benchmark results
recorded with them stay comparable. A caller with other numbers overrides some or all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mobile_vla.errors import ConfigError
from mobile_vla.policy import presets
from mobile_vla.policy.checkpoint import POLICY_DIR, save_policy
from mobile_vla.policy.config import PolicyConfig
from mobile_vla.policy.model import MobileVLAPolicy, build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.text import build_tokenizer

# the action range (q01, q99 per axis: linear_x, linear_y, angular_z) and state standardisation an
# untrained model is saved with, in place of a dataset's statistics
UNTRAINED_SCALING: dict[str, tuple[float, ...]] = {
    "action_low": (-0.3, -0.3, -1.0),
    "action_high": (0.6, 0.3, 1.0),
    "state_mean": (0.0, 0.0, 0.0),
    "state_std": (0.3, 0.2, 0.5),
}


def untrained_preprocessing(
    config: PolicyConfig, scaling: Mapping[str, Sequence[float]] | None = None
) -> Preprocessing:
    """The preprocessing of an untrained `config` model: `UNTRAINED_SCALING` (keys in `scaling`
    replace its numbers), the config's state size, window and chunk, and its tokenizer.
    """
    unknown = sorted(set(scaling or {}) - set(UNTRAINED_SCALING))
    if unknown:
        raise ConfigError(f"scaling key {unknown[0]!r}: expected one of {', '.join(map(repr, UNTRAINED_SCALING))}")
    numbers = {key: list(values) for key, values in {**UNTRAINED_SCALING, **(scaling or {})}.items()}
    return Preprocessing(
        **numbers,
        state_dim=config.state_dim,
        window=config.window,
        chunk=config.chunk,
        tokenizer=build_tokenizer(config),
    )


def save_random_policy(
    preset: str | PolicyConfig,
    folder: str | Path,
    seed: int = 0,
    head_std: float | None = None,
    scaling: Mapping[str, Sequence[float]] | None = None,
) -> MobileVLAPolicy:
    """Builds `preset` (a preset name or a PolicyConfig) with random weights under torch seed `seed`
    (no pretrained weights are loaded) and saves it with `untrained_preprocessing` as
    folder/policy/; returns the model (eval mode).

    `head_std`: redraw the last head layer's weights from N(0, head_std). The head starts near zero,
    so every answer is near the action range's middle; a spread makes outputs vary with the input
    (parity checks compare something, a simulated robot moves).
    """
    config = presets.get_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = build_policy(config, load_pretrained=False).eval()
    if head_std is not None:
        with torch.no_grad():
            model.head[-1].weight.normal_(std=head_std)
    save_policy(Path(folder) / POLICY_DIR, model, untrained_preprocessing(config, scaling))
    return model
