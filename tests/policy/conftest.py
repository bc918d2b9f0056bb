"""Policy fixtures: the tiny preset, its tokenizer (built once) and synthetic batches."""

from __future__ import annotations

import numpy as np
import pytest

INSTRUCTIONS = ["go to the red box avoiding the barrel on the left", "turn right and stop at the green ball"]


@pytest.fixture(scope="session")
def tiny_config():
    from mobile_vla.policy import presets

    return presets.tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    from mobile_vla.policy import build_tokenizer

    return build_tokenizer(tiny_config)


@pytest.fixture(scope="session")
def make_batch():
    return build_batch


def build_batch(config, tokenizer, batch_size=2, frames=None, seed=0, instructions=None):
    """A training-shaped batch of torch tensors with random frames, state and normalised targets."""
    import torch

    rng = np.random.default_rng(seed)
    T = frames or config.window
    instructions = instructions or [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)]
    tokens = tokenizer.encode(instructions)
    batch = {
        "images": rng.integers(0, 256, (batch_size, T, 224, 224, 3), dtype=np.uint8),
        "state": rng.normal(size=(batch_size, T, config.state_dim)).astype(np.float32),
        "actions": rng.uniform(-0.8, 0.8, (batch_size, T, config.chunk, 3)).astype(np.float32),
        "action_mask": np.ones((batch_size, T, config.chunk), np.float32),
        "frame_mask": np.ones((batch_size, T), np.float32),
        **tokens,
    }
    return {key: torch.from_numpy(value) for key, value in batch.items()}
