"""The tiny policy can memorise two short episodes: the whole path (backbones, fusion, LSTM over the
window, chunk head, loss) carries enough signal to fit real targets."""

import numpy as np
import pytest
import torch

from mobile_vla.policy import build_policy, policy_loss


def _two_episodes(config, tokenizer, frames=8):
    """Two episodes of `frames` steps, as full windows: chunk targets are the next K actions, masked past the end."""
    rng = np.random.default_rng(0)
    t = np.arange(frames + config.chunk) / frames
    actions = np.stack(
        [
            np.stack([0.6 * np.ones_like(t), 0.3 * np.sin(3 * t), -0.5 * t], axis=-1),  # forward, weaving, turning
            np.stack([-0.2 + 0.4 * t, -0.4 * np.ones_like(t), 0.7 * np.cos(2 * t)], axis=-1),
        ]
    ).astype(np.float32)  # [2, frames + K, 3]
    targets = np.stack([actions[:, i : i + config.chunk] for i in range(frames)], axis=1)  # [2, T, K, 3]
    mask = np.stack([(i + np.arange(config.chunk)) < frames for i in range(frames)]).astype(np.float32)
    batch = {
        "images": rng.integers(0, 256, (2, frames, 224, 224, 3), dtype=np.uint8),
        "state": rng.normal(size=(2, frames, config.state_dim)).astype(np.float32),
        "actions": targets,
        "action_mask": np.broadcast_to(mask, (2, frames, config.chunk)).copy(),
        "frame_mask": np.ones((2, frames), np.float32),
        **tokenizer.encode(["go to the red box", "back away from the barrel on the left"]),
    }
    return {key: torch.from_numpy(value) for key, value in batch.items()}


@pytest.mark.slow  # 80 optimiser steps on 16 frames: half a minute on a loaded 2-core box
def test_tiny_overfits_two_episodes(tiny_config, tiny_tokenizer):
    # Frozen random backbones (a supported config: how `full` trains) keep this test to seconds on CPU.
    config = tiny_config.replace(freeze_kosmos=True, freeze_clip=True)
    torch.manual_seed(0)
    model = build_policy(config).train()
    batch = _two_episodes(config, tiny_tokenizer)
    steps = 80
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.15)
    for _ in range(steps):
        loss = policy_loss(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    weights = (batch["action_mask"] * batch["frame_mask"][..., None])[..., None].expand_as(out.actions)
    mae = ((out.actions - batch["actions"]).abs() * weights).sum() / weights.sum()
    assert mae.item() < 0.05, f"normalised MAE {mae.item():.3f} after {steps} steps"
    # the uncertainty head learned the errors are small: confidence rose from its initial level
    assert out.confidence.mean().item() > 0.5
