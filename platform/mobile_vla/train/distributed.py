"""Ray Train's process group as the training loop sees it: wrapping the model, collectives, full state.

    model = wrap_model(build_policy(config), "ddp", device)     # DDP via Ray, or FSDP2 per block
    loss_sum, count = sum_across_ranks([loss_sum, count], device)
    state = full_model_state(model, "fsdp")                     # a collective under FSDP: every rank calls it

Every helper degrades to the single-process case (one worker, or no process group at all), so the same
loop runs on one CPU worker in a test and on many GPUs in a job.
"""

from __future__ import annotations

import numpy as np
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

UNUSED_BY_POLICY = ("logit_scale", "logit_bias")  # CLIP's contrastive temperature: no path to the policy loss
BLOCK_SUFFIXES = ("EncoderLayer", "DecoderLayer", "ResidualAttentionBlock", "Block")  # FSDP shards each


def is_distributed() -> bool:
    """True when this process is one rank of a process group with more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_ranks(values: list[float], device) -> list[float]:
    """Element-wise sum of `values` over every rank (the values themselves when not distributed)."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_to_all(array: np.ndarray) -> np.ndarray:
    """Concatenates a numpy array from every rank along axis 0 (validation predictions; small)."""
    if not is_distributed():
        return array
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


def wrap_model(model, strategy: str, device):
    """DDP via Ray's prepare_model; FSDP2 (`fully_shard`) per transformer block, then the root.

    Parameters that never receive a gradient would make DDP's reducer wait forever (or error), so they
    are frozen first instead of paying for `find_unused_parameters=True` on every step.

    Raises:
        RuntimeError: FSDP was asked for while a 0-d parameter is trainable (it cannot be sharded).
    """
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in UNUSED_BY_POLICY:
            param.requires_grad_(False)

    if strategy == "ddp" or not is_distributed():
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if is_distributed() else None)
    model = model.to(device)
    # fully_shard refuses 0-d parameters; the only ones here are frozen (CLIP's logit_scale), so leaving
    # them replicated and outside FSDP changes nothing. A trainable one would silently diverge: refuse it.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    trainable = [n for n, p in model.named_parameters() if p.ndim == 0 and p.requires_grad]
    if trainable:
        raise RuntimeError(f"train.strategy = 'fsdp': trainable 0-d parameters {trainable} cannot be sharded")
    for module in model.modules():
        if type(module).__name__.endswith(BLOCK_SUFFIXES) and module is not model:
            fully_shard(module, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    return model


def unwrap(model):
    """The policy inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


def is_sharded(strategy: str) -> bool:
    """True when the weights are split over ranks (FSDP with more than one rank)."""
    return strategy == "fsdp" and is_distributed()


def full_model_state(model, strategy: str) -> dict:
    """Full (unsharded) CPU weights; a collective under FSDP, so every rank calls it."""
    if not is_sharded(strategy):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, strategy: str) -> dict:
    """The optimiser state as one unsharded dict; a collective under FSDP, so every rank calls it."""
    if not is_sharded(strategy):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, strategy: str) -> None:
    """Loads full (unsharded) model and optimiser states, sharding them again under FSDP."""
    if not is_sharded(strategy):
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
