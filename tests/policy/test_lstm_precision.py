"""The LSTM runs in fp32 under bf16 autocast (autocast would run it in low precision, and on CUDA in
fp16 whatever the autocast dtype): its output and the h/c it hands to the next step stay fp32."""

from __future__ import annotations

import torch

from mobile_vla.policy import build_policy, policy_loss


def test_lstm_stays_fp32_under_bf16_autocast(tiny_config, tiny_tokenizer, make_batch):
    torch.manual_seed(0)
    model = build_policy(tiny_config).train()
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=2, frames=2)
    features = torch.randn(2, model.lstm.input_size)
    memory = model.initial_memory(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = model._recurrent_step(features.to(torch.bfloat16), memory)
        assert out.dtype == h.dtype == c.dtype == torch.float32
        output = model(batch)
        losses = policy_loss(output, batch)
    assert output.memory[0].dtype == output.memory[1].dtype == torch.float32
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    grads = [p.grad for p in model.lstm.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_without_autocast_the_lstm_step_is_unchanged(tiny_config):
    """No autocast (fp32 training, ONNX export): the step is the plain LSTM call, bit for bit."""
    torch.manual_seed(0)
    model = build_policy(tiny_config).eval()
    features = torch.randn(3, model.lstm.input_size)
    memory = model.initial_memory(3)
    with torch.no_grad():
        out, (h, c) = model._recurrent_step(features, memory)
        want, (want_h, want_c) = model.lstm(features.unsqueeze(1), memory)
    assert torch.equal(out, want.squeeze(1)) and torch.equal(h, want_h) and torch.equal(c, want_c)
