"""Tune fixtures: tiny member policies sharing one preprocessing (random init, no training)."""

from __future__ import annotations

import pytest
import torch

from mobile_vla.policy import build_policy, build_tokenizer, presets
from mobile_vla.policy.preprocessing import Preprocessing


@pytest.fixture(scope="session")
def tiny_preprocessing():
    config = presets.tiny()
    return Preprocessing(
        action_low=[-0.2, -0.3, -1.0],
        action_high=[0.6, 0.3, 1.0],
        state_mean=[0.1, 0.0, 0.0],
        state_std=[0.2, 0.1, 0.5],
        window=config.window,
        chunk=config.chunk,
        tokenizer=build_tokenizer(config),
    )


@pytest.fixture()
def make_member():
    """make_member(seed, **PolicyConfig changes) -> a tiny policy whose head outputs vary with its input."""

    def build(seed: int, **changes):
        torch.manual_seed(seed)
        model = build_policy(presets.tiny().replace(**changes)).eval()
        with torch.no_grad():  # the head starts near zero; spread it so members differ where their inputs do
            model.head[-1].weight.normal_(std=0.2)
        return model

    return build
